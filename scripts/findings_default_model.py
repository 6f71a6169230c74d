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

CARD = REPO / "moescope" / "data" / "default_model" / "card.json"


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
    return {REPO / "docs" / "default-model.md": {"default-model-perplexity": perplexity_block(card),
                                                 "default-model-card-signatures": card_signatures_block(card)}}


if __name__ == "__main__":
    main_for(render)
