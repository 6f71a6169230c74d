"""Export a training run as a shippable model: fp16 safetensors, tokenizer, a model card.

    python -m moescope.train.export runs/default-model moescope/data/default_model
    python -m moescope.train.export --remeasure moescope/data/default_model --corpus runs/corpus

The second form re-measures the card of an exported model from its shipped files, without the
training run: it keeps card.json's training facts, checks that the corpus has the validation split
the card recorded, and recomputes the measured figures through the same `measure` as the export.

The weights are stored in float16 (half the bytes) while the config says float32, so the
model loads in float32 on a CPU through the ordinary ``from_pretrained`` path. The card is
measured on the exported files, through moescope's own loader:

- validation perplexity per domain next to a unigram model of the training tokens;
- whether routing tells the domains apart: routing signatures of held-out texts of every
  domain (moescope.analysis.signatures: ridge tuned in each training fold, repeated CV grouped
  by source document) next to chance, label permutation, a bag-of-token-ids classifier and the
  token-id routing control, with paired differences (CI, p) against the last two.

card.json holds all of it; README.md is rendered from card.json (moescope.train.card).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moescope.errors import DataError, MoescopeError
from moescope.train.card import corpus_fingerprint, render_card, training_facts
from moescope.train.config import TrainConfig, config_from_dict, load_config


def domain_probe_file(corpus_dir: Path, out: Path, *, per_domain: int = 40, chars: int = 600, seed: int = 0,
                      min_per_domain: int = 5) -> tuple[list[str], list[str]]:
    """Write to `out` a JSONL of held-out texts, `per_domain` per domain, each ~`chars` characters cut at
    a line end, from the corpus validation split (never seen in training), with a `domain` field and a
    `doc_id` field naming the validation document the piece was cut from (the signatures group their
    cross-validation folds by it, so pieces of one document never sit in both train and test).
    Domains with fewer than `min_per_domain` such texts (too few to cross-validate) are left out.
    Returns (domains written, domains left out)."""
    import random

    rng = random.Random(seed)
    lines, kept, left_out = [], [], []
    for path in sorted((corpus_dir / "text").glob("*.val.jsonl")):
        domain = path.name.split(".")[0]
        docs = [json.loads(x)["text"] for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        pieces = _pieces(docs, chars)
        if len(pieces) < min_per_domain:  # a small validation split: shorter pieces, enough to cross-validate
            pieces = _pieces(docs, max(80, sum(map(len, docs)) // (2 * min_per_domain)))
        rng.shuffle(pieces)
        if len(pieces) < min_per_domain:
            left_out.append(domain)
            continue
        kept.append(domain)
        lines += [json.dumps({"text": p, "domain": domain, "doc_id": f"{domain}-{d}"}, ensure_ascii=False)
                  for d, p in pieces[:per_domain]]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return kept, left_out


def _pieces(docs: list[str], chars: int) -> list[tuple[int, str]]:
    """(document index, piece): consecutive pieces of ~`chars` characters of each document, cut at a
    line end when one is near."""
    pieces = []
    for d, doc in enumerate(docs):
        for start in range(0, max(1, len(doc) - chars // 2), chars):
            piece = doc[start : start + chars]
            cut = piece.rfind("\n")
            piece = piece[: cut] if cut > chars // 2 else piece
            if len(piece.strip()) > chars // 4:
                pieces.append((d, piece.strip()))
    return pieces


def save_fp16(model_dir: Path, out_dir: Path) -> None:
    """Write model_dir's model as float16 safetensors (config dtype float32) plus its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"  # compute dtype on load; the stored fp16 weights are upcast
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def capture_domain_probes(model: Any, tokenizer: Any, corpus_dir: Path, work_dir: Path) -> tuple[Path, list[str], list[str]]:
    """Capture the routing of the held-out domain texts (`domain_probe_file`) into work_dir/trace.
    Returns (trace directory, domains captured, domains left out); nothing is captured when fewer
    than two domains have enough held-out text. The card and scripts/findings_signatures.py both
    measure the domain signatures on this trace."""
    from moescope.capture.dataset import RunOptions, capture_dataset

    probes = work_dir / "domains.jsonl"
    kept, left_out = domain_probe_file(corpus_dir, probes)
    if len(kept) >= 2:
        capture_dataset(model, tokenizer, probes, work_dir / "trace", run=RunOptions(batch_size=8, max_length=256))
    return work_dir / "trace", kept, left_out


def measure(model_dir: Path, cfg: TrainConfig, *, threads: int = 2, permutations: int = 200) -> dict[str, Any]:
    """The card's measured sections for the model in `model_dir` on the corpus `cfg.data.corpus`:
    ``corpus`` (its validation fingerprint), ``perplexity`` per domain next to a unigram model, and
    ``domain_signatures`` (routing signatures of held-out texts of every domain, moescope's signature
    statistics with folds grouped by source document). Used by both `export` and `remeasure`."""
    from moescope.capture.loading import load_model
    from moescope.store.reader import open_trace
    from moescope.train.batches import TokenCorpus
    from moescope.train.trainer import evaluate

    torch.set_num_threads(threads)
    model, tokenizer = load_model(str(model_dir))
    corpus = TokenCorpus(cfg.data.corpus, cfg.data.domains, cfg.data.mixing)
    result: dict[str, Any] = {"corpus": corpus_fingerprint(Path(cfg.data.corpus)),
                              "perplexity": evaluate(model, corpus, cfg)}
    try:
        from moescope.analysis.signatures import routing_signatures
    except ImportError:
        return result
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir, kept, left_out = capture_domain_probes(model, tokenizer, Path(cfg.data.corpus), Path(tmp))
        if len(kept) < 2:
            return result  # fewer than two domains with enough held-out text: nothing to separate
        trace = open_trace(trace_dir)
        try:  # folds grouped by source document (doc_id, found automatically)
            sig = routing_signatures(trace, label="domain", permutations=permutations, figures=False)
            ungrouped_note = None
        except DataError:  # a domain's validation pieces come from a single document: no grouped CV possible
            sig = routing_signatures(trace, label="domain", group="none", permutations=permutations, figures=False)
            ungrouped_note = ("a domain's held-out pieces come from one document, so folds could not be grouped by "
                              "document: pieces of one document sit in train and test and accuracy is optimistic")
    result["domain_signatures"] = {k: _plain(sig.values.get(k)) for k in SIGNATURE_KEYS}
    result["domain_signatures"].update(permutations=sig.params.get("permutations", permutations),
                                       n_sequences=sig.values.get("n_sequences"), domains_left_out=left_out,
                                       ungrouped_note=ungrouped_note)
    return result


#: The routing-signature values kept in card.json (see moescope.analysis.signatures for their meaning).
SIGNATURE_KEYS = (
    "cv_accuracy_mean", "cv_accuracy_sd", "cv_accuracy_ci_low", "cv_accuracy_ci_high", "cv_repeats", "folds",
    "group_field", "n_groups", "macro_f1", "permutation_accuracy_mean", "permutation_p_value",
    "permutation_p_value_text", "load_balanced_accuracy_mean", "bag_of_tokens_accuracy_mean",
    "bag_of_tokens_accuracy_ci_low", "bag_of_tokens_accuracy_ci_high", "token_id_control_accuracy_mean",
    "token_id_control_accuracy_ci_low", "token_id_control_accuracy_ci_high", "adds_over_bag_of_tokens",
    "adds_over_bag_of_tokens_ci_low", "adds_over_bag_of_tokens_ci_high", "adds_over_bag_of_tokens_p_value",
    "adds_over_token_id_control", "adds_over_token_id_control_ci_low", "adds_over_token_id_control_ci_high",
    "adds_over_token_id_control_p_value", "per_layer_accuracy", "per_layer_p_value_holm", "within_cosine_mean",
    "across_cosine_mean", "cohens_d", "chance_accuracy", "uniform_chance_accuracy")


def _plain(value: Any) -> Any:
    """numpy values as JSON-ready Python values."""
    return value.tolist() if hasattr(value, "tolist") else value


def write_card(model_dir: Path, card: dict[str, Any]) -> None:
    """Write card.json and README.md (rendered from it) into `model_dir`."""
    (model_dir / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (model_dir / "README.md").write_text(render_card(card), encoding="utf-8")


def export(run_dir: str | Path, out_dir: str | Path, *, threads: int = 2, permutations: int = 200) -> Path:
    """Export run_dir/model into out_dir with a measured model card; returns out_dir."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "model" / "config.json").exists():
        raise MoescopeError(f"{run_dir} has no finished model (model/config.json); finish `moescope train` first")
    started = time.perf_counter()
    save_fp16(run_dir / "model", out_dir)
    if (run_dir / "metrics.jsonl").exists():
        from moescope.train.curves import plot_training_curves

        plot_training_curves(run_dir / "metrics.jsonl", out_dir / "training_curves.png")
    measured = measure(out_dir, load_config(run_dir / "config.yaml"), threads=threads, permutations=permutations)
    write_card(out_dir, {"training": training_facts(run_dir, out_dir), **measured})
    print(f"exported {out_dir} in {time.perf_counter() - started:.0f} s")
    return out_dir


def remeasure(model_dir: str | Path, corpus_dir: str | Path, *, threads: int = 2,
              permutations: int = 200) -> dict[str, Any]:
    """Re-measure an exported model's card from its shipped files, without the training run: keeps
    card.json's ``training`` section, recomputes the measured sections on `corpus_dir` (which must hold
    the same validation split as the card recorded) and rewrites card.json and README.md. Returns the card."""
    model_dir, corpus_dir = Path(model_dir), Path(corpus_dir)
    card_path = model_dir / "card.json"
    if not card_path.exists():
        raise MoescopeError(f"{model_dir} has no card.json; export the model with `python -m moescope.train.export`")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    if "training" not in card:
        raise MoescopeError(f"{card_path} has no 'training' section (an older card); re-export it from its run "
                            "directory with `python -m moescope.train.export RUN_DIR OUT`")
    fingerprint = corpus_fingerprint(corpus_dir)
    recorded = card.get("corpus", {}).get("validation_files")
    if recorded is not None and recorded != fingerprint["validation_files"]:
        changed = sorted(k for k in set(recorded) | set(fingerprint["validation_files"])
                         if recorded.get(k) != fingerprint["validation_files"].get(k))
        raise MoescopeError(f"{corpus_dir}'s validation split differs from the one the card was measured on "
                            f"({', '.join(changed[:4])}); rebuild it with the recipe in card.json's 'corpus' section")
    config = copy.deepcopy(card["training"]["config"])
    config["data"]["corpus"] = str(corpus_dir)
    measured = measure(model_dir, config_from_dict(config), threads=threads, permutations=permutations)
    card = {"training": card["training"], **measured}
    write_card(model_dir, card)
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="finished training run (moescope train --out)")
    parser.add_argument("out_dir", nargs="?", help="where to write the exported model")
    parser.add_argument("--remeasure", metavar="MODEL_DIR",
                        help="re-measure MODEL_DIR's card from its shipped files (no run directory needed)")
    parser.add_argument("--corpus", default="runs/corpus", help="corpus for --remeasure (moescope data --out)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--permutations", type=int, default=200)
    args = parser.parse_args()
    try:
        if args.remeasure:
            if args.run_dir or args.out_dir:
                raise MoescopeError("give either RUN_DIR OUT_DIR or --remeasure MODEL_DIR, not both")
            remeasure(args.remeasure, args.corpus, threads=args.threads, permutations=args.permutations)
            print(f"re-measured {args.remeasure}/card.json and README.md")
        elif args.run_dir and args.out_dir:
            export(args.run_dir, args.out_dir, threads=args.threads, permutations=args.permutations)
        else:
            raise MoescopeError("give RUN_DIR OUT_DIR to export, or --remeasure MODEL_DIR --corpus CORPUS_DIR")
    except MoescopeError as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
