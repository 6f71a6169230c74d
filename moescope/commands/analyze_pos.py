"""`moescope analyze pos`: is part of speech written in the routing path? (against word-form and chance baselines)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from moescope.commands._model_options import ALLOW_PICKLE, DEVICE, DTYPE, MODEL, REVISION, TRUST_REMOTE_CODE

console = Console(stderr=True)


def register(app: typer.Typer, *, analyze_app: typer.Typer, **_: Any) -> None:
    """Add `moescope analyze pos`."""

    @analyze_app.command("pos")
    def pos(
        out: Path = typer.Option(..., "--out", help="Directory for results.json, figures/ and (when capturing) trace/."),
        model: Optional[str] = MODEL,
        conllu: Optional[Path] = typer.Option(None, "--conllu", help="Gold-tagged sentences (CoNLL-U) to capture and analyse."),
        data: Optional[Path] = typer.Option(None, "--data", help="Texts (.txt / .jsonl / .parquet) to tag with spaCy, capture and analyse."),
        trace: Optional[Path] = typer.Option(None, "--trace", help="Analyse an existing trace whose tokens table has a upos column."),
        first_subword_only: bool = typer.Option(False, "--first-subword-only", help="Keep only each word's first subword token."),
        folds: int = typer.Option(5, "--folds", help="Stratified cross-validation folds."),
        repeats: int = typer.Option(3, "--repeats", help="Repetitions of the K-fold split (fresh shuffles)."),
        cv_groups: str = typer.Option("sentence", "--cv-groups", help="'sentence': no sentence in both train and test; 'token': ungrouped."),
        seed: int = typer.Option(0, "--seed", help="Seed of the subsample, folds, shuffles, permutations and t-SNE."),
        max_tokens: int = typer.Option(20_000, "--max-tokens", help="Tokens the probe trains on at most (seeded subsample of whole sentences)."),
        shuffles: int = typer.Option(100, "--shuffles", help="Tag permutations of the probe's token-identity null (and shuffles of the naive KL / Spec null)."),
        permutations: Optional[int] = typer.Option(None, "--permutations", help="Permutations of the token-identity null (default: 100 x tags x layers)."),
        tsne_points: int = typer.Option(1500, "--tsne-points", help="Routing paths in the t-SNE figure (0: none)."),
        ablation: Optional[str] = typer.Option(None, "--ablation", help="Comma-separated numbers of layers to drop (default: ~1, L/4, L/2, 3L/4, L-1)."),
        batch_size: int = typer.Option(16, "--batch-size", help="Sentences per forward pass when capturing."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Longest sentence in tokens (longer ones are truncated)."),
        device: str = DEVICE,
        dtype: str = DTYPE,
        spacy_model: Optional[str] = typer.Option(None, "--spacy-model", help="spaCy pipeline for --data (default: en_core_web_sm)."),
        mwt: str = typer.Option("first", "--mwt", help="CoNLL-U multiword tokens: tag of the 'first' word, or 'join' all tags."),
        text_field: str = typer.Option("text", "--text-field", help="Field holding the text in --data .jsonl / .parquet."),
        revision: Optional[str] = REVISION,
        trust_remote_code: bool = TRUST_REMOTE_CODE,
        allow_pickle: bool = ALLOW_PICKLE,
    ) -> None:
        """Predict Universal POS tags from routing paths (ridge probe, CV grouped by sentence) vs word-form, word-level,
        majority baselines and against the probe on tags permuted within token ids; expert specialisation and KL from
        uniform per POS and layer against a token-identity null; t-SNE; layer ablation."""
        from moescope.analysis.pos import PosParams, pos_analysis
        from moescope.inference import format_p
        from moescope.capture.loading import LoadOptions
        from moescope.errors import MoescopeError
        from moescope.pos.pipeline import load_tagged

        if trace is not None and (conllu is not None or data is not None):
            raise MoescopeError("--trace analyses an already tagged trace: drop --conllu / --data, or drop --trace")
        try:
            steps = tuple(int(x) for x in ablation.split(",")) if ablation else None
        except ValueError:
            raise MoescopeError(f"--ablation takes comma-separated integers such as 1,2,4, not {ablation!r}") from None
        if folds < 2:
            raise MoescopeError(f"--folds must be 2 or more, not {folds}")
        if repeats < 1:
            raise MoescopeError(f"--repeats must be 1 or more, not {repeats}")
        if cv_groups not in ("sentence", "token"):
            raise MoescopeError(f"--cv-groups must be 'sentence' or 'token', not {cv_groups!r}")
        if permutations is not None and permutations < 1:
            raise MoescopeError(f"--permutations must be 1 or more, not {permutations}")
        params = PosParams(folds=folds, repeats=repeats, cv_groups=cv_groups, seed=seed, max_tokens=max_tokens,
                           n_shuffles=shuffles, tsne_points=tsne_points, ablation=steps,
                           token_null_permutations=permutations)
        coverage = None
        if trace is None:
            load = LoadOptions(device=device, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                               allow_pickle=allow_pickle)
            trace, tag_source, coverage = _capture(out, model, load, conllu, data, spacy_model, mwt, text_field,
                                                   batch_size, max_length, seed)
        tokens, routes, opened = load_tagged(trace, first_subword_only=first_subword_only)
        if coverage is None:
            tag_source = opened.manifest.get("capture", {}).get("tags") or f"upos column of {trace}"
        n_tagged = tokens.num_rows - tokens.column("upos").null_count
        console.print(f"analysing {n_tagged:,} tagged tokens ({repeats} x {folds}-fold probe grouped by {cv_groups}, "
                      f"{len(opened.moe_layers)} MoE layers) ...")
        result = pos_analysis(tokens, routes, n_experts=opened.n_experts, top_k=opened.top_k, moe_layers=opened.moe_layers,
                              params=params, tag_source=tag_source,
                              trace=os.path.relpath(Path(trace).resolve(), out.resolve()))  # the report resolves it from OUT
        result.values["first_subword_only"] = first_subword_only
        result.values["model"] = opened.model.get("name_or_path")
        if coverage is not None:
            result.values["alignment"] = coverage
        path = result.save(out)
        v = result.values
        t = v["probe_minus_word_form"]
        console.print(
            f"[green]POS probe[/] accuracy {v['probe_accuracy']:.3f} (macro-F1 {v['macro_f1']:.3f}); word form "
            f"{v['word_form_accuracy']:.3f} (seen ids {v['word_form_accuracy_seen']:.3f}, unseen "
            f"{v['word_form_accuracy_unseen']:.3f}), word level {v['word_level_accuracy']:.3f}, majority "
            f"{v['majority_accuracy']:.3f}, tags permuted within token ids {v['token_null_probe_accuracy']:.3f} "
            f"({format_p(v['probe_p_value_token_null'], shuffles)}); probe - word form "
            f"{t['difference']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], {format_p(t['p_value'])}  ->  {path}"
        )


def _capture(out: Path, model: str | None, load: Any, conllu: Path | None, data: Path | None, spacy_model: str | None,
             mwt: str, text_field: str, batch_size: int, max_length: int | None, seed: int) -> tuple[Path, str, dict]:
    """Tag the input, capture it into OUT/trace with tagged tokens; (trace dir, tag source, coverage)."""
    from moescope.capture.dataset import RunOptions
    from moescope.capture.loading import load_model
    from moescope.commands.capture import progress_bar
    from moescope.pos.pipeline import capture_tagged, tagged_input

    tagged, tag_source = tagged_input(conllu=conllu, data=data, spacy_model=spacy_model, mwt=mwt, text_field=text_field)
    console.print(f"{len(tagged):,} sentences, {sum(len(t.upos) for t in tagged):,} words; tags: {tag_source}")
    console.print(f"loading {model or 'the built-in default model'} ...")
    loaded, tokenizer = load_model(model, load)
    run = RunOptions(batch_size=batch_size, max_length=max_length, seed=seed)
    started = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("capturing", total=len(tagged), rate="-")

        def progress(done: int, total: int, tokens: int) -> None:
            bar.update(task, completed=done, rate=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}")

        trace, coverage = capture_tagged(loaded, tokenizer, tagged, out, run=run, tag_source=tag_source,
                                         model_name=model, progress=progress)
    console.print(f"tagged trace: {trace} ({coverage['tagged_tokens']:,} of {coverage['tokens']:,} tokens tagged)")
    return trace, tag_source, coverage
