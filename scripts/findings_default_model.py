"""Generated findings of docs/default-model.md from the shipped model card (card.json).

    .venv/bin/python scripts/findings_default_model.py            # rewrite the blocks
    .venv/bin/python scripts/findings_default_model.py --check    # exit 1 if a block is stale

card.json (moescope/data/default_model, committed) is this study's results file: it is written by
``python -m moescope.train.export`` and re-measured from the shipped files by
``python -m moescope.train.export --remeasure moescope/data/default_model --corpus runs/corpus``.
"""
from __future__ import annotations

import json
import math

from findings_common import REPO, fmt_p, load_results, main_for

MODEL_DIR = REPO / "moescope" / "data" / "default_model"
CARD = MODEL_DIR / "card.json"


def stored_dtype() -> str:
    """The dtype of the shipped weights, from the safetensors header (no tensor is loaded)."""
    import struct

    with open(MODEL_DIR / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    dtypes = sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return "/".join({"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(d, d) for d in dtypes)


def what_it_is_block(card: dict) -> str:
    """The model's facts from its shipped config.json and card.json (training section)."""
    config = json.loads((MODEL_DIR / "config.json").read_text(encoding="utf-8"))
    training = card["training"]
    cfg = training["config"]
    params = training["parameters"]
    corpus_tokens = sum(d["train_tokens"] for d in training["data"])
    window = cfg["data"]["seq_len"]
    batch = cfg["optim"]["batch_size"]
    renorm = "renormalised" if config.get("norm_topk_prob") else "not renormalised (OLMoE's default)"
    return "\n".join([
        "| | |",
        "| --- | --- |",
        f"| architecture | transformers `{config['architectures'][0]}` (no custom code) |",
        f"| layers | {config['num_hidden_layers']}, every one an MoE layer |",
        f"| hidden size, heads | {config['hidden_size']}, {config['num_attention_heads']} attention heads "
        f"({config['num_key_value_heads']} key/value heads) |",
        f"| experts | {config['num_experts']} per layer, each an MLP of width {config['intermediate_size']}; "
        f"top-{config['num_experts_per_tok']}, {renorm} |",
        f"| vocabulary | {training['vocab_size']:,} (byte-level BPE trained on the corpus by `moescope data`) |",
        f"| parameters | {params['total'] / 1e6:.1f}M in all, {params['active'] / 1e6:.1f}M active per token; "
        f"{stored_dtype()} safetensors, loads as {config.get('dtype', 'float32')} |",
        f"| context | trained on windows of {window} tokens (positions up to {config['max_position_embeddings']:,} allowed) |",
        f"| training tokens | {training['tokens']:,} ({training['steps']:,} steps of {batch} × {window}; "
        f"{training['tokens'] / corpus_tokens:.2f} of an epoch of the {corpus_tokens / 1e6:.0f}M-token corpus) |",
        f"| training time | {training['hours']} hours on {cfg['threads']} CPU cores (see [benchmarks.md](benchmarks.md)) |",
    ])


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def perplexity_block(card: dict) -> str:
    ppl = card["perplexity"]
    domains = ppl["domains"]
    model = " / ".join(f"{d['ppl']:.1f}" for d in domains.values())
    unigram = " / ".join(f"{d['unigram_ppl']:,.0f}" for d in domains.values())
    unigram_mean = math.exp(sum(math.log(d["unigram_ppl"]) for d in domains.values()) / len(domains))
    return "\n".join([
        "| | default model | baseline |",
        "| --- | --- | --- |",
        f"| validation perplexity, mean over the {len(domains)} domains (geometric) | **{ppl['mean_ppl']:.1f}** | "
        f"unigram {unigram_mean:,.0f} |",
        f"| per domain: {' / '.join(domains)} | {model} | {unigram} |",
        "",
        f"Perplexity is {unigram_mean / ppl['mean_ppl']:.0f}× below the unigram baseline on average (geometric means).",
    ])


def card_signatures_block(card: dict) -> str:
    sig = card["domain_signatures"]
    n = sig["permutations"]
    run = load_results("signatures", "default-model-domains/results.json")
    differing = sorted(k for k, v in sig.items() if k in run and v != run[k])
    same = ("Every one of these values is identical to the `moescope analyze signatures` run in the table above "
            "(same texts, same seed)." if not differing else
            f"They differ from the `moescope analyze signatures` run above in: {', '.join(differing)}.")
    return (f"The card's own domain-signature figures (card.json, {sig['n_sequences']} held-out texts, "
            f"{sig['cv_repeats']} × {sig['folds']}-fold CV grouped by {sig['group_field']}): routing signature "
            f"{pct(sig['cv_accuracy_mean'])} [{pct(sig['cv_accuracy_ci_low'])}, {pct(sig['cv_accuracy_ci_high'])}] "
            f"against chance {pct(sig['chance_accuracy'])} (labels permuted {pct(sig['permutation_accuracy_mean'])}, "
            f"{fmt_p(sig['permutation_p_value'], n)}), bag of token ids {pct(sig['bag_of_tokens_accuracy_mean'])}, "
            f"token-id routing control {pct(sig['token_id_control_accuracy_mean'])}; routing − token-id control "
            f"{100 * sig['adds_over_token_id_control']:+.1f} points "
            f"[{100 * sig['adds_over_token_id_control_ci_low']:+.1f}, {100 * sig['adds_over_token_id_control_ci_high']:+.1f}], "
            f"p = {sig['adds_over_token_id_control_p_value']:.3g}. " + same)


def render() -> dict:
    card = json.loads(CARD.read_text(encoding="utf-8"))
    return {REPO / "docs" / "default-model.md": {"default-model-what-it-is": what_it_is_block(card),
                                                 "default-model-perplexity": perplexity_block(card),
                                                 "default-model-card-signatures": card_signatures_block(card)}}


if __name__ == "__main__":
    main_for(render)
