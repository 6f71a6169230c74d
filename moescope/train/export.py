"""Export a training run as a shippable model: fp16 safetensors, tokenizer, a model card.

    python -m moescope.train.export runs/default-model moescope/data/default_model

The weights are stored in float16 (half the bytes) while the config says float32, so the
model loads in float32 on a CPU through the ordinary ``from_pretrained`` path. The card is
measured on the exported files, through moescope's own loader:

- validation perplexity per domain next to a unigram model of the training tokens;
- whether routing tells the domains apart: routing signatures of held-out texts of every
  domain (logistic regression, cross-validated) next to chance, label permutation, a
  bag-of-token-ids classifier and the token-id routing control.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from moescope.errors import DataError, MoescopeError


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


def measure(out_dir: Path, run_dir: Path, *, threads: int = 2, permutations: int = 200) -> dict[str, Any]:
    """Perplexity per domain and domain separability of routing, for the exported model."""
    from moescope.capture.dataset import RunOptions, capture_dataset
    from moescope.capture.loading import load_model
    from moescope.store.reader import open_trace
    from moescope.train.batches import TokenCorpus
    from moescope.train.config import load_config
    from moescope.train.trainer import evaluate

    torch.set_num_threads(threads)
    cfg = load_config(run_dir / "config.yaml")
    model, tokenizer = load_model(str(out_dir))
    corpus = TokenCorpus(cfg.data.corpus, cfg.data.domains, cfg.data.mixing)
    perplexity = evaluate(model, corpus, cfg)
    result: dict[str, Any] = {"perplexity": perplexity}
    try:
        from moescope.analysis.signatures import routing_signatures
    except ImportError:
        return result
    with tempfile.TemporaryDirectory() as tmp:
        probes = Path(tmp) / "domains.jsonl"
        kept, left_out = domain_probe_file(Path(cfg.data.corpus), probes)
        if len(kept) < 2:
            return result  # fewer than two domains with enough held-out text: nothing to separate
        capture_dataset(model, tokenizer, probes, Path(tmp) / "trace", run=RunOptions(batch_size=8, max_length=256))
        trace = open_trace(Path(tmp) / "trace")
        try:  # folds grouped by source document (doc_id, found automatically)
            sig = routing_signatures(trace, label="domain", permutations=permutations, figures=False)
            ungrouped_note = None
        except DataError:  # a domain's validation pieces come from a single document: no grouped CV possible
            sig = routing_signatures(trace, label="domain", group="none", permutations=permutations, figures=False)
            ungrouped_note = ("a domain's held-out pieces come from one document, so folds could not be grouped by "
                              "document: pieces of one document sit in train and test and accuracy is optimistic")
    keys = ("cv_accuracy_mean", "cv_accuracy_sd", "cv_accuracy_ci_low", "cv_accuracy_ci_high", "cv_repeats", "folds",
            "group_field", "n_groups", "macro_f1", "permutation_accuracy_mean", "permutation_p_value",
            "permutation_p_value_text", "load_balanced_accuracy_mean", "bag_of_tokens_accuracy_mean",
            "token_id_control_accuracy_mean", "adds_over_bag_of_tokens", "adds_over_bag_of_tokens_ci_low",
            "adds_over_bag_of_tokens_ci_high", "adds_over_bag_of_tokens_p_value", "adds_over_token_id_control",
            "adds_over_token_id_control_ci_low", "adds_over_token_id_control_ci_high",
            "adds_over_token_id_control_p_value", "per_layer_accuracy", "per_layer_p_value_holm",
            "within_cosine_mean", "across_cosine_mean", "cohens_d", "chance_accuracy", "uniform_chance_accuracy")
    result["domain_signatures"] = {k: _plain(sig.values.get(k)) for k in keys}
    result["domain_signatures"]["chance"] = sig.values.get("chance_accuracy")
    result["domain_signatures"]["n_sequences"] = sig.values.get("n_sequences")
    result["domain_signatures"]["domains_left_out"] = left_out
    result["domain_signatures"]["ungrouped_note"] = ungrouped_note
    return result


def _plain(value: Any) -> Any:
    """numpy values as JSON-ready Python values."""
    return value.tolist() if hasattr(value, "tolist") else value


def _card_ci(sig: dict[str, Any], prefix: str, pct: Any) -> str:
    lo, hi = sig.get(f"{prefix}_ci_low"), sig.get(f"{prefix}_ci_high")
    return f"[95% CI {pct(lo)} to {pct(hi)}]" if lo is not None and hi is not None else f"± {pct(sig[prefix + '_sd'])}"


def _card_p(sig: dict[str, Any]) -> str:
    return sig.get("permutation_p_value_text") or f"p = {sig['permutation_p_value']:.3g}"


def _card_adds(sig: dict[str, Any]) -> list[str]:
    """Lines on what routing adds over each token-identity baseline (paired, same folds)."""
    out = []
    for key, name in (("adds_over_token_id_control", "the token-id routing control"),
                      ("adds_over_bag_of_tokens", "the bag of token ids")):
        if sig.get(key) is not None and sig.get(f"{key}_ci_low") is not None:
            out.append(f"Routing vs {name}: {100 * sig[key]:+.1f} points (95% CI {100 * sig[key + '_ci_low']:+.1f} to "
                       f"{100 * sig[key + '_ci_high']:+.1f}, paired on the same folds, p = {sig[key + '_p_value']:.2g}).")
    return out


def model_card(run_dir: Path, out_dir: Path, measured: dict[str, Any]) -> str:
    """The README.md of the exported model, in markdown."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    run = json.loads((run_dir / "result.json").read_text())
    corpus_info = json.loads((Path(cfg["data"]["corpus"]) / "corpus.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last_routing = metrics[-1]["routing"] if metrics else {}
    m, o = cfg["model"], cfg["optim"]
    params = run["parameters"]
    size_mb = sum(p.stat().st_size for p in out_dir.glob("*.safetensors")) / 1e6
    ppl = measured["perplexity"]
    lines = [
        f"# {cfg.get('name', 'moescope default model')}",
        "",
        "The built-in default model of moescope: a small mixture-of-experts causal language model trained from",
        "scratch by `moescope train` on an offline multi-domain corpus, so that every capture and analysis has a",
        "real MoE to run on without downloads. It is a research toy, not an assistant: expect fluent-looking",
        "nonsense. Reproduce it with `scripts/train_default_model.sh`.",
        "",
        "## Architecture",
        "",
        f"transformers `OlmoeForCausalLM`: hidden {m['hidden_size']}, {m['num_layers']} layers (all MoE), "
        f"{m['num_heads']} attention heads, {m['n_experts']} experts of {m['expert_size']} per layer, top-{m['top_k']} "
        f"({'renormalised' if m.get('norm_topk_prob') else 'not renormalised'}), tied embeddings, vocabulary "
        f"{corpus_info['tokenizer']['vocab_size']:,} (byte-level BPE). {params['total'] / 1e6:.1f}M parameters, "
        f"{params['active'] / 1e6:.1f}M active per token. Stored as float16 safetensors ({size_mb:.1f} MB); loads as "
        "float32.",
        "",
        "## Training",
        "",
        f"- tokens seen: {run['tokens']:,} ({o['batch_size']} x {cfg['data']['seq_len']} tokens per step, "
        f"{run['steps']:,} steps), domains mixed {cfg['data'].get('mixing', 'proportional')}ly",
        f"- AdamW lr {o['lr']}, cosine to {o['min_lr_ratio']}x, warm-up {o['warmup_steps']} steps, weight decay "
        f"{o['weight_decay']}; load-balancing loss {m['aux_loss_coef']} "
        f"({'on every layer separately' if m.get('balance') == 'per_layer' else 'pooled over layers, as transformers does'}), "
        f"router z-loss {m['z_loss_coef']}",
        f"- training time: {run['seconds'] / 3600:.1f} hours on 2 CPU cores (shared machine), seed {cfg['seed']}",
        "",
        "## Data",
        "",
        "| domain | source | licence | train tokens |",
        "| --- | --- | --- | ---: |",
    ]
    for d in corpus_info["domains"]:
        lines.append(f"| {d['name']} | {d['description']} | {d['licence']} | {d['train']['tokens']:,} |")
    lines += [
        "",
        "WordNet's example sentences are held out of the training data: they are the semantic-routing probes.",
        "Details: docs/data.md.",
        "",
        "## Validation perplexity (cross-entropy only) next to a unigram baseline",
        "",
        "| domain | model | unigram | tokens |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, d in ppl["domains"].items():
        lines.append(f"| {name} | {d['ppl']:.1f} | {d['unigram_ppl']:.1f} | {d['tokens']:,} |")
    lines.append(f"| **mean** (of log-perplexities) | **{ppl['mean_ppl']:.1f}** | "
                 f"{math.exp(sum(math.log(d['unigram_ppl']) for d in ppl['domains'].values()) / len(ppl['domains'])):.1f} | |")
    sig = measured.get("domain_signatures")
    if sig:
        pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
        lines += [
            "",
            "## Routing separates the domains",
            "",
            f"Routing signatures (per text, per layer, how often each expert was chosen) of {sig['n_sequences']} "
            "held-out validation texts, classified by domain with a cross-validated linear classifier (penalty tuned "
            "inside each training fold; "
            + ("folds grouped by source document, so pieces of one document never sit in both train and test; "
               if sig.get("group_field") else "folds not grouped by document; ")
            + "95% CIs over the repeated folds)"
            + (f" (left out, too few validation texts: {', '.join(sig['domains_left_out'])})"
               if sig.get("domains_left_out") else "") + ":",
            "",
            "| classifier | accuracy |",
            "| --- | ---: |",
            f"| routing signature | **{pct(sig['cv_accuracy_mean'])}** {_card_ci(sig, 'cv_accuracy', pct)} |",
            f"| chance (the most common domain) | {pct(sig['chance'])} |",
            f"| same, labels permuted ({_card_p(sig)}) | {pct(sig['permutation_accuracy_mean'])} |",
            f"| load-balancing control (layer counts kept, selections re-drawn) | {pct(sig['load_balanced_accuracy_mean'])} |",
            f"| bag of token ids (no routing at all) | {pct(sig['bag_of_tokens_accuracy_mean'])} |",
            f"| token-id routing control (each token gets its id's usual experts in the training fold) "
            f"| {pct(sig['token_id_control_accuracy_mean'])} |",
            "",
            *_card_adds(sig),
            *([f"Caveat: {sig['ungrouped_note']}."] if sig.get("ungrouped_note") else []),
            "Per-layer accuracy: " + ", ".join(f"layer {i}: {pct(a)}" for i, a in enumerate(sig["per_layer_accuracy"])) + ".",
            "Much of it is vocabulary: compare with the two token-identity controls before reading routing as topical.",
        ]
    if (out_dir / "training_curves.png").exists():
        lines += ["", "## Training curves", "", "![validation perplexity and load imbalance during training](training_curves.png)"]
    if last_routing:
        lines += ["", "## Expert load at the end of training (per layer)", "",
                  "| layer | load entropy (1 = balanced) | busiest expert / fair share | dead experts |",
                  "| --- | ---: | ---: | ---: |"]
        for layer, r in last_routing.items():
            lines.append(f"| {layer} | {r['load_entropy']:.3f} | {r['max_over_fair']:.2f} | {len(r['dead'])} |")
    lines.append("")
    return "\n".join(lines)


def export(run_dir: str | Path, out_dir: str | Path, *, threads: int = 2, permutations: int = 200) -> Path:
    """Export run_dir/model into out_dir with a measured model card; returns out_dir."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "model" / "config.json").exists():
        raise MoescopeError(f"{run_dir} has no finished model (model/config.json); finish `moescope train` first")
    started = time.perf_counter()
    save_fp16(run_dir / "model", out_dir)
    measured = measure(out_dir, run_dir, threads=threads, permutations=permutations)
    if (run_dir / "metrics.jsonl").exists():
        from moescope.train.curves import plot_training_curves

        plot_training_curves(run_dir / "metrics.jsonl", out_dir / "training_curves.png")
    (out_dir / "README.md").write_text(model_card(run_dir, out_dir, measured), encoding="utf-8")
    (out_dir / "card.json").write_text(json.dumps(measured, indent=2) + "\n", encoding="utf-8")
    print(f"exported {out_dir} in {time.perf_counter() - started:.0f} s")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--permutations", type=int, default=200)
    args = parser.parse_args()
    export(args.run_dir, args.out_dir, threads=args.threads, permutations=args.permutations)


if __name__ == "__main__":
    main()
