"""The default model's card: the facts of its training run and its measured figures (card.json),
and the README.md rendered from them.

card.json is the single source of the card: ``render_card(card)`` writes README.md from it and
nothing else, so the README's figures are card.json's (a test renders the shipped card.json and
compares it with the shipped README.md). Its sections:

- ``training``: facts of the training run, fixed once the model is trained (config, tokens, steps,
  hours, parameters, training data, expert load at the end of training, training curves);
- ``corpus``: which corpus the figures were measured on (builder version, arguments, SHA-256 of
  every validation file), so a re-measurement can check it sees the same held-out texts;
- ``perplexity`` and ``domain_signatures``: measured on the exported files
  (``moescope.train.export.measure``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from moescope.errors import MoescopeError


def training_facts(run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The card's ``training`` section from a finished run directory (config.yaml, result.json,
    metrics.jsonl) and the exported model directory (weights size, training curves)."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    run = json.loads((run_dir / "result.json").read_text())
    corpus_info = json.loads((Path(cfg["data"]["corpus"]) / "corpus.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    last_routing = metrics[-1].get("routing", {}) if metrics else {}
    return {
        "config": cfg,
        "tokens": run["tokens"],
        "steps": run["steps"],
        "hours": round(run["seconds"] / 3600, 1),
        "parameters": {"total": run["parameters"]["total"], "active": run["parameters"]["active"]},
        "vocab_size": corpus_info["tokenizer"]["vocab_size"],
        "stored_mb": round(sum(p.stat().st_size for p in out_dir.glob("*.safetensors")) / 1e6, 1),
        "data": [{"name": d["name"], "description": d["description"], "licence": d["licence"],
                  "train_tokens": d["train"]["tokens"]} for d in corpus_info["domains"]],
        "end_of_training_load": {str(layer): {"load_entropy": r["load_entropy"], "max_over_fair": r["max_over_fair"],
                                              "dead_experts": len(r["dead"])} for layer, r in last_routing.items()},
        "training_curves": "training_curves.png" if (out_dir / "training_curves.png").exists() else None,
    }


def corpus_fingerprint(corpus_dir: Path) -> dict[str, Any]:
    """The card's ``corpus`` section: builder version, arguments and SHA-256 of every validation file
    (text and tokens) of the corpus, from its corpus.json."""
    path = Path(corpus_dir) / "corpus.json"
    if not path.exists():
        raise MoescopeError(f"{corpus_dir} has no corpus.json; build it with `moescope data --out {corpus_dir}`")
    info = json.loads(path.read_text())
    return {"builder_version": info.get("builder_version"), "arguments": info.get("arguments"),
            "validation_files": {k: v for k, v in sorted(info["files"].items()) if ".val." in k or "/val" in k}}


def render_card(card: dict[str, Any]) -> str:
    """README.md of the model, rendered from card.json's contents only (markdown)."""
    t = card["training"]
    cfg = t["config"]
    m, o, data = cfg["model"], cfg["optim"], cfg["data"]
    lines = [
        f"# {cfg.get('name', 'moescope default model')}",
        "",
        "The built-in default model of moescope: a small mixture-of-experts causal language model trained from",
        "scratch by `moescope train` on an offline multi-domain corpus, so that every capture and analysis has a",
        "real MoE to run on without downloads. It is a research toy, not an assistant: expect fluent-looking",
        "nonsense. Reproduce it with `scripts/train_default_model.sh`.",
        "",
        "This card is rendered from `card.json` beside it. Re-measure it from the shipped files (no retraining) with",
        "`python -m moescope.train.export --remeasure moescope/data/default_model --corpus runs/corpus`.",
        "",
        "## Architecture",
        "",
        f"transformers `OlmoeForCausalLM`: hidden {m['hidden_size']}, {m['num_layers']} layers (all MoE), "
        f"{m['num_heads']} attention heads, {m['n_experts']} experts of {m['expert_size']} per layer, top-{m['top_k']} "
        f"({'renormalised' if m.get('norm_topk_prob') else 'not renormalised'}), tied embeddings, vocabulary "
        f"{t['vocab_size']:,} (byte-level BPE). {t['parameters']['total'] / 1e6:.1f}M parameters, "
        f"{t['parameters']['active'] / 1e6:.1f}M active per token. Stored as float16 safetensors ({t['stored_mb']:.1f} MB); "
        "loads as float32.",
        "",
        "## Training",
        "",
        f"- tokens seen: {t['tokens']:,} ({o['batch_size']} x {data['seq_len']} tokens per step, "
        f"{t['steps']:,} steps), domains mixed {data.get('mixing', 'proportional')}ly",
        f"- AdamW lr {o['lr']}, cosine to {o['min_lr_ratio']}x, warm-up {o['warmup_steps']} steps, weight decay "
        f"{o['weight_decay']}; load-balancing loss {m['aux_loss_coef']} "
        f"({'on every layer separately' if m.get('balance') == 'per_layer' else 'pooled over layers, as transformers does'}), "
        f"router z-loss {m['z_loss_coef']}",
        f"- training time: {t['hours']:.1f} hours on 2 CPU cores (shared machine), seed {cfg['seed']}",
        "",
        "## Data",
        "",
        "| domain | source | licence | train tokens |",
        "| --- | --- | --- | ---: |",
        *(f"| {d['name']} | {d['description']} | {d['licence']} | {d['train_tokens']:,} |" for d in t["data"]),
        "",
        "WordNet's example sentences are held out of the training data: they are the semantic-routing probes.",
        "Details: docs/data.md.",
        "",
        *_perplexity_lines(card["perplexity"]),
        *_signature_lines(card.get("domain_signatures")),
    ]
    if t.get("training_curves"):
        lines += ["", "## Training curves", "",
                  f"![validation perplexity and load imbalance during training]({t['training_curves']})"]
    if t.get("end_of_training_load"):
        lines += ["", "## Expert load at the end of training (per layer)", "",
                  "| layer | load entropy (1 = balanced) | busiest expert / fair share | dead experts |",
                  "| --- | ---: | ---: | ---: |"]
        for layer, r in t["end_of_training_load"].items():
            lines.append(f"| {layer} | {r['load_entropy']:.3f} | {r['max_over_fair']:.2f} | {r['dead_experts']} |")
    lines.append("")
    return "\n".join(lines)


def _perplexity_lines(ppl: dict[str, Any]) -> list[str]:
    unigram_mean = math.exp(sum(math.log(d["unigram_ppl"]) for d in ppl["domains"].values()) / len(ppl["domains"]))
    return [
        "## Validation perplexity (cross-entropy only) next to a unigram baseline",
        "",
        "| domain | model | unigram | tokens |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {d['ppl']:.1f} | {d['unigram_ppl']:.1f} | {d['tokens']:,} |" for name, d in ppl["domains"].items()),
        f"| **mean** (of log-perplexities) | **{ppl['mean_ppl']:.1f}** | {unigram_mean:.1f} | |",
    ]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(sig: dict[str, Any], prefix: str) -> str:
    lo, hi = sig.get(f"{prefix}_ci_low"), sig.get(f"{prefix}_ci_high")
    return f"[95% CI {_pct(lo)} to {_pct(hi)}]" if lo is not None and hi is not None else ""


def _p_text(p: float, n: int | None) -> str:
    """A permutation p-value as text; at the floor 1/(n+1) written "p ≤ …" (it is a bound, not a value)."""
    if n and p <= 1 / (n + 1) + 1e-12:
        return f"p ≤ {1 / (n + 1):.3g}"
    return f"p = {p:.3g}"


def _adds_lines(sig: dict[str, Any]) -> list[str]:
    """What routing adds over each token-identity baseline (paired, same folds), and the plain verdict."""
    out = []
    for key, name in (("adds_over_token_id_control", "the token-id routing control"),
                      ("adds_over_bag_of_tokens", "the bag of token ids")):
        if sig.get(key) is None or sig.get(f"{key}_ci_low") is None:
            continue
        lo, hi = sig[f"{key}_ci_low"], sig[f"{key}_ci_high"]
        verdict = ("routing adds significantly" if lo > 0 else
                   "routing does significantly worse" if hi < 0 else
                   "routing does **not** add significantly (the CI includes 0)")
        out.append(f"- Routing vs {name}: {100 * sig[key]:+.1f} points (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}, "
                   f"paired on the same folds, p = {sig[f'{key}_p_value']:.2g}): {verdict}.")
    return out


def _signature_lines(sig: dict[str, Any] | None) -> list[str]:
    if not sig:
        return []
    n_perm = sig.get("permutations")
    holm = sig.get("per_layer_p_value_holm") or []
    layers = ", ".join(f"layer {i}: {_pct(a)}" for i, a in enumerate(sig["per_layer_accuracy"]))
    significant = sum(p < 0.05 for p in holm)
    return [
        "",
        "## Routing and the domains",
        "",
        f"Routing signatures (per text, per layer, how often each expert was chosen) of {sig['n_sequences']} "
        "held-out validation texts, classified by domain with a linear classifier (penalty tuned inside each "
        "training fold; "
        + (f"{sig['cv_repeats']} x {sig['folds']}-fold cross-validation grouped by source document, so pieces of "
           "one document never sit in both train and test; " if sig.get("group_field") else
           f"{sig.get('cv_repeats')} x {sig.get('folds')}-fold cross-validation, not grouped by document; ")
        + "95% CIs over the repeated folds). Every control is fitted and tuned like the signature classifier"
        + (f"; left out, too few validation texts: {', '.join(sig['domains_left_out'])}"
           if sig.get("domains_left_out") else "") + ":",
        "",
        "| classifier | accuracy |",
        "| --- | ---: |",
        f"| routing signature | **{_pct(sig['cv_accuracy_mean'])}** {_ci(sig, 'cv_accuracy')} |",
        f"| chance (share of the most common domain) | {_pct(sig['chance_accuracy'])} |",
        f"| same classifier, labels permuted ({_p_text(sig['permutation_p_value'], n_perm)}, {n_perm} permutations) "
        f"| {_pct(sig['permutation_accuracy_mean'])} |",
        f"| load-balancing control (layer counts kept, selections re-drawn) | {_pct(sig['load_balanced_accuracy_mean'])} |",
        f"| bag of token ids (no routing at all) | {_pct(sig['bag_of_tokens_accuracy_mean'])} "
        f"{_ci(sig, 'bag_of_tokens_accuracy')} |",
        f"| token-id routing control (each token gets its id's usual experts, learnt in the training fold) "
        f"| {_pct(sig['token_id_control_accuracy_mean'])} {_ci(sig, 'token_id_control_accuracy')} |",
        "",
        "What holds and what does not:",
        "",
        (f"- Routing tells the domains apart above chance ({_pct(sig['cv_accuracy_mean'])} against "
         f"{_pct(sig['chance_accuracy'])}; {_p_text(sig['permutation_p_value'], n_perm)} against permuted labels)."
         if sig["permutation_p_value"] < 0.05 else
         f"- Routing does **not** tell the domains apart better than permuted labels "
         f"({_p_text(sig['permutation_p_value'], n_perm)})."),
        *_adds_lines(sig),
        *([f"- Caveat: {sig['ungrouped_note']}."] if sig.get("ungrouped_note") else []),
        "",
        f"Per-layer accuracy: {layers}; {significant} of {len(holm)} layers above permuted labels with "
        "Holm-adjusted p < 0.05.",
        "",
        "These domains differ in their vocabulary first: read the routing signal next to the two token-identity "
        "controls before calling it topical.",
    ]
