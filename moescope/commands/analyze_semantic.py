"""`moescope analyze semantic`: do routers send a word to the same experts when it means the same thing?"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from moescope.commands._model_options import ALLOW_PICKLE, DEVICE, DTYPE, MODEL, REVISION, TRUST_REMOTE_CODE

console = Console(stderr=True)


def register(app: typer.Typer, *, analyze_app: typer.Typer, **_: object) -> None:
    @analyze_app.command("semantic")
    def semantic(
        out: Path = typer.Option(..., "--out", help="Output directory: probes.jsonl, trace/, results.json, figures/."),
        model: Optional[str] = MODEL,
        trace: Optional[Path] = typer.Option(None, "--trace", help="Analyse this existing trace instead of capturing one."),
        probes: Optional[Path] = typer.Option(None, "--probes", help="Probe file (probes.jsonl) to capture, or that --trace was captured from."),
        wic: Optional[Path] = typer.Option(None, "--wic", help="Sense pairs from a WiC split folder (e.g. WiC_dataset/dev) instead of WordNet."),
        swords: Optional[Path] = typer.Option(None, "--swords", help="Substitution items from a SWORDS .json(.gz) instead of WordNet."),
        pairs: int = typer.Option(2000, "--pairs", help="Sense pairs (half same-sense, half different-sense)."),
        items: int = typer.Option(500, "--items", help="Substitution items (0: none)."),
        seed: int = typer.Option(0, "--seed", help="Seed of probe sampling and of the bootstrap."),
        subword: str = typer.Option("first", "--subword", help="Target tokens of multi-token words: first, last or mean."),
        n_boot: int = typer.Option(2000, "--n-boot", help="Bootstrap resamples for confidence intervals."),
        random_init_seeds: Optional[str] = typer.Option(None, "--random-init-seeds", help="Comma-separated seeds (3 or more, e.g. 0,1,2): also run the probes through randomly initialised copies of the model and test the trained-minus-random gap."),
        batch_size: int = typer.Option(16, "--batch-size", help="Sentences per forward pass."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Longest sentence in tokens (default: the model's context)."),
        device: str = DEVICE,
        dtype: str = DTYPE,
        wordnet: Optional[Path] = typer.Option(None, "--wordnet", help="WordNet 3.0 dict folder (default /usr/share/wordnet)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different trace already at OUT/trace."),
        revision: Optional[str] = REVISION,
        trust_remote_code: bool = TRUST_REMOTE_CODE,
        allow_pickle: bool = ALLOW_PICKLE,
    ) -> None:
        """Expert overlap of a word across contexts: same vs different sense, good substitute vs control, per layer."""
        from moescope.analysis.semantic import SemanticParams
        from moescope.errors import MoescopeError
        from moescope.semantic.align import SUBWORD_MODES
        from moescope.semantic.pipeline import analyse_trace, build_probes, read_probes, write_probes

        if subword not in SUBWORD_MODES:
            raise MoescopeError(f"--subword must be one of {', '.join(SUBWORD_MODES)}, not {subword!r}")
        if n_boot < 100:
            raise MoescopeError(f"--n-boot {n_boot} is too few for a confidence interval; use 1000 or more")
        seeds = _seeds(random_init_seeds)
        if trace is not None and (wic or swords or (model and not seeds)):
            raise MoescopeError("--trace analyses an existing capture; --model (except for --random-init-seeds), --wic "
                                "and --swords only apply when capturing")
        if probes is not None and (wic or swords):
            raise MoescopeError("--probes already holds the probe sentences; drop --wic / --swords, or drop --probes")
        if trace is None and probes is None and (pairs < 0 or items < 0 or (pairs < 4 and items < 2)):
            raise MoescopeError("--pairs and --items must be 0 or more, and give something to test (e.g. --pairs 200)")
        params = SemanticParams(subword=subword, n_boot=n_boot, seed=seed)
        out.mkdir(parents=True, exist_ok=True)
        if trace is None:
            if probes is None:
                records = build_probes(n_pairs=pairs, n_items=items, seed=seed, wic=wic, swords=swords, wordnet=wordnet)
                probes = write_probes(out / "probes.jsonl", records)
                console.print(f"probes: {len(records):,} sentences -> {probes}")
            else:
                read_probes(probes)  # fail on a malformed file before loading a model
            trace = out / "trace"
            _capture(model, probes, trace, batch_size=batch_size, max_length=max_length, device=device, dtype=dtype,
                     seed=seed, overwrite=overwrite, revision=revision, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle)
        result = analyse_trace(trace, probes, params=params)
        if trace.resolve().parent == out.resolve():
            result.trace = trace.name  # relative to the results: the output directory stays movable
        if seeds:
            result.values.update(_random_init(model, seeds, out, trace, probes, params, result.values,
                                              batch_size=batch_size, max_length=max_length, device=device,
                                              dtype=dtype, overwrite=overwrite, revision=revision,
                                              trust_remote_code=trust_remote_code))
        path = result.save(out)
        print_table(result.values)
        console.print(f"[green]results[/]: {path}")


def _seeds(text: str | None) -> list[int]:
    """The --random-init-seeds list; a one-line error unless it is 3 or more distinct integers."""
    from moescope.errors import MoescopeError

    if text is None:
        return []
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MoescopeError(f"--random-init-seeds takes comma-separated integers such as 0,1,2, not {text!r}") from None
    if len(set(seeds)) < 3:
        raise MoescopeError(f"--random-init-seeds needs at least 3 distinct seeds (e.g. 0,1,2), got {text!r}")
    return seeds


def _random_init(model: str | None, seeds: list[int], out: Path, trace: Path, probes: Path | None, params: Any,
                 trained: dict[str, Any], *, batch_size: int, max_length: int | None, device: str, dtype: str,
                 overwrite: bool, revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """Capture and analyse the same probes on randomly initialised copies (OUT/random-init/seed-N/), one per
    seed; returns the result keys of the trained-minus-random test."""
    from moescope.analysis.semantic_control import random_init_control
    from moescope.capture.loading import LoadOptions
    from moescope.semantic.pipeline import analyse_trace, trace_contexts, write_probes
    from moescope.semantic.random_init import random_init_copy
    from moescope.store.reader import open_trace

    if probes is None:  # the probes the trace carries, as a file to capture
        contexts = trace_contexts(open_trace(trace)).to_pylist()
        probes = write_probes(out / "random-init" / "probes.jsonl",
                              [{k: v for k, v in r.items() if k != "seq_id" and v is not None} for r in contexts])
    load = LoadOptions(device=device, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    randoms = []
    for seed in seeds:
        where = out / "random-init" / f"seed-{seed}"
        copy = random_init_copy(model, seed, where / "model", load)
        console.print(f"random-init copy, seed {seed}: {copy}")
        _capture(str(copy), probes, where / "trace", batch_size=batch_size, max_length=max_length, device=device,
                 dtype=dtype, seed=params.seed, overwrite=overwrite, revision=None, trust_remote_code=False,
                 allow_pickle=False)
        r = analyse_trace(where / "trace", probes, params=params)
        r.trace = "trace"
        r.save(where)
        randoms.append(r.values)
    return random_init_control(trained, randoms, seeds, n_boot=params.n_boot, confidence=params.confidence,
                               seed=params.seed)


def _capture(model: str | None, probes: Path, trace: Path, *, batch_size: int, max_length: int | None, device: str,
             dtype: str, seed: int, overwrite: bool, **load: Any) -> None:
    from moescope.capture.data import TextDataset
    from moescope.capture.dataset import RunOptions
    from moescope.capture.loading import LoadOptions, load_model
    from moescope.capture.recorder import CaptureOptions
    from moescope.commands.capture import print_summary, run_with_progress

    console.print(f"loading {model or 'the built-in default model'} ...")
    loaded, tokenizer = load_model(model, LoadOptions(device=device, dtype=dtype, **load))
    run = RunOptions(batch_size=batch_size, max_length=max_length, seed=seed)
    manifest = run_with_progress(loaded, tokenizer, TextDataset(probes), trace, CaptureOptions(seed=seed), run,
                                 model, overwrite)
    print_summary(trace, manifest)


def _fmt(x: Any, spec: str = "+.3f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def _table(v: dict[str, Any], title: str, columns: list[tuple[str, str, str]]) -> Table:
    """One row per layer; columns are (header, result key, format); key "<stem>:ci" prints a CI."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header, _, _ in [("layer", "", ""), *columns]:
        table.add_column(header, justify="right", no_wrap=True)
    for i, layer in enumerate(v["layers"]):
        cells = []
        for _, key, spec in columns:
            if key.endswith(":ci"):
                stem = key[:-3]
                cells.append(f"[{_fmt(v[stem + '_ci_low'][i], spec)}, {_fmt(v[stem + '_ci_high'][i], spec)}]")
            else:
                cells.append(_fmt(v[key][i], spec))
        table.add_row(str(layer), *cells)
    return table


def print_table(v: dict[str, Any]) -> None:
    """Per-layer tables: sense pairs (same, different, gap [CI], p, effect, gap within identical
    target tokens) and substitution (substitute, control, gap [CI], p); kappa 0 = chance."""
    if "same_sense_kappa" in v:
        console.print(_table(v, f"sense pairs: kappa at the target ({v.get('subword')} subword; 0 = chance)", [
            ("same", "same_sense_kappa", "+.3f"), ("diff", "different_sense_kappa", "+.3f"),
            ("gap", "difference", "+.3f"), ("95% CI", "difference:ci", "+.2f"), ("p", "p_value", ".1e"),
            ("Holm p", "p_value_holm", ".1e"), ("r", "effect_size", "+.2f"),
            ("gap|id", "identical_tokens_difference", "+.3f")]))
        console.print(
            f"{v['n_pairs_same']} same- / {v['n_pairs_different']} different-sense pairs, paired by lemma "
            f"({v['n_lemmas']} lemmas with both); p: Wilcoxon signed-rank on per-lemma gaps, two-sided; Holm across "
            f"layers; r: matched rank-biserial; gap|id: the gap within the {v['identical_tokens_n_pairs_same']} / "
            f"{v['identical_tokens_n_pairs_different']} pairs whose target token ids are identical"
        )
    if "substitute_kappa" in v:
        console.print(_table(v, "substitution: kappa with the original word", [
            ("substitute", "substitute_kappa", "+.3f"), ("control", "control_kappa", "+.3f"),
            ("gap", "substitution_difference", "+.3f"), ("95% CI", "substitution_difference:ci", "+.2f"),
            ("p", "substitution_p_value", ".1e"), ("Holm p", "substitution_p_value_holm", ".1e"),
            ("r", "substitution_effect_size", "+.2f")]))
        console.print(f"{v['n_items']} items; p: Wilcoxon signed-rank, two-sided; Holm across layers; "
                      "r: matched rank-biserial")
    if "trained_minus_random_difference" in v:
        console.print(_table(v, f"trained minus random-init gap (seeds {v['random_init_seeds']}; paired by lemma)", [
            ("trained", "difference", "+.3f"), ("random", "random_init_difference", "+.3f"),
            ("diff", "trained_minus_random_difference", "+.3f"),
            ("95% CI", "trained_minus_random_difference:ci", "+.2f"),
            ("p", "trained_minus_random_p_value", ".1e"), ("Holm p", "trained_minus_random_p_value_holm", ".1e")]))
    if v.get("n_unaligned_contexts"):
        console.print(f"[yellow]{v['n_unaligned_contexts']} context(s) had no target token (truncated?) and were left out[/]")
