"""Findings of docs/analyses/agreement.md, from docs/results/agreement/ (scripts/study_agreement_precision.sh).

    python scripts/findings_agreement.py          # rewrite the generated blocks
    python scripts/findings_agreement.py --check  # exit 1 when the doc is stale
"""
from __future__ import annotations

from findings_common import REPO, load_results, main_for

DOC = REPO / "docs" / "analyses" / "agreement.md"
GENERATE = 16  # new tokens per prompt: a setting of scripts/study_agreement_precision.sh (its default), not a result


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def render() -> dict:
    bf16 = load_results("agreement")
    fp32 = load_results("agreement", "fp32_replay/results.json")
    layers = bf16["moe_layers"]
    n_rows = sum(bf16["per_layer_n"])
    flipped = round(bf16["share_rows_flipped"] * n_rows)
    lo, hi = min(bf16["per_layer_set_agreement"]), max(bf16["per_layer_set_agreement"])
    ci_lo, ci_hi = bf16["set_agreement_ci"]
    headline = (
        f"Over {bf16['n_tokens_compared']:,} tokens ({bf16['alignment']['n_sequence_pairs']} built-in prompts with "
        f"their generated continuations; {bf16['n_tokens_unaligned']} unaligned), running the built-in model in "
        f"bfloat16 instead of float32 changes the top-{bf16['top_k']} expert set of "
        f"**{_pct(bf16['share_rows_flipped'])}** of token-layer routing decisions ({flipped:,} of {n_rows:,}; set "
        f"agreement {_pct(1 - bf16['share_rows_flipped'])}, 95% CI {_pct(ci_lo)}–{_pct(ci_hi)} resampling whole "
        f"sequences); "
        f"per layer, set agreement is {_pct(lo)}–{_pct(hi)}, top-1 agreement {_pct(bf16['top1_agreement'])} overall, "
        f"mean overlap/k {_pct(bf16['mean_overlap'])}. Chance (independent uniform draws) is "
        f"{_pct(bf16['chance_set_agreement'])} for the set.\n\n"
        f"The control, a float32 replay of the same tokens against the float32 `generate()` capture "
        f"(teacher-forced forward vs KV-cached decoding, same precision), agrees on "
        f"**{_pct(fp32['set_agreement'], 3)}** of {sum(fp32['per_layer_n']):,} token-layer decisions: the flips "
        f"above are precision, not the replay.\n"
    )
    rows = ["| MoE layer | rows | top-k set | 95% CI | top-1 | overlap / k | prompt set | generated set |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, layer in enumerate(layers):
        lo, hi = bf16["per_layer_set_agreement_ci"][i]
        rows.append(f"| {layer} | {bf16['per_layer_n'][i]:,} | {_pct(bf16['per_layer_set_agreement'][i])} | "
                    f"{_pct(lo)}–{_pct(hi)} | "
                    f"{_pct(bf16['per_layer_top1_agreement'][i])} | {_pct(bf16['per_layer_mean_overlap'][i])} | "
                    f"{_pct(bf16['by_phase']['prompt']['per_layer_set_agreement'][i])} | "
                    f"{_pct(bf16['by_phase']['generated']['per_layer_set_agreement'][i])} |")
    m = bf16["margin"]
    margin_rows = ["| float32 margin (logits) | rows | set agreement | mismatches | cumulative share of mismatches |",
                   "| --- | --- | --- | --- | --- |"]
    edges = m["edges"]
    for i, e in enumerate(edges):
        span = f"{e:g} – {edges[i + 1]:g}" if i + 1 < len(edges) else f"≥ {e:g}"
        margin_rows.append(f"| {span} | {m['n'][i]:,} | {_pct(m['set_agreement'][i])} | {m['mismatches'][i]:,} | "
                           f"{_pct((m['cumulative_share_of_mismatches'] or [None] * len(edges))[i], 1)} |")
    # cumulative share through bucket i = share below edges[i + 1]
    below = dict(zip(edges[1:], m["cumulative_share_of_mismatches"]))
    rows_below = dict(zip(edges[1:], m["cumulative_share_of_rows"]))
    no_flip_from = next((edges[i] for i in range(len(edges)) if all(x == 0 for x in m["mismatches"][i:])), None)
    margin_text = (
        "\n".join(margin_rows) + "\n\n"
        f"Mismatches concentrate at small margins, as expected of rounding: {_pct(below[0.01], 1)} of them sit at "
        f"a float32 margin below 0.01 logit, where only {_pct(rows_below[0.01], 1)} of all decisions lie "
        f"({_pct(below[0.1], 1)} below 0.1, where {_pct(rows_below[0.1], 1)} lie); "
        f"decisions with a margin of {no_flip_from:g} logit or more never flipped. Position 0 (the first "
        f"token, no context) agrees at {_pct(bf16['by_position']['set_agreement'][0])}; prompt and generated tokens "
        f"agree alike ({_pct(bf16['by_phase']['prompt']['set_agreement'])} vs "
        f"{_pct(bf16['by_phase']['generated']['set_agreement'])}).\n"
    )
    gen = load_results("agreement", "bf16_generate/results.json")
    al = gen["alignment"]
    g_lo, g_hi = gen["set_agreement_ci"]
    generate_text = (
        f"Generating in bfloat16 instead of float32 (greedy, same prompts) changed the continuation of "
        f"**{al['n_pairs_prefix_only']} of {al['n_sequence_pairs']}** prompts within "
        f"{GENERATE} generated tokens: those pairs are compared up to the first differing token ({al['n_tokens_unaligned_a']:,} float32 and "
        f"{al['n_tokens_unaligned_b']:,} bfloat16 tokens after a divergence are left out). On the "
        f"{gen['n_tokens_compared']:,} tokens both runs share, set agreement is {_pct(gen['set_agreement'])} "
        f"(95% CI {_pct(g_lo)}–{_pct(g_hi)}), as in the replay comparison; generated tokens "
        f"{_pct(gen['by_phase']['generated']['set_agreement'])}.\n"
    )
    return {DOC: {"agreement-headline": headline, "agreement-layers": "\n".join(rows) + "\n",
                  "agreement-margin": margin_text, "agreement-generate": generate_text}}


if __name__ == "__main__":
    main_for(render)
