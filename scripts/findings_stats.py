"""Fill the generated blocks of docs/analyses/stats.md from docs/results/stats/default/results.json.

Run: python scripts/findings_stats.py [--check]   (the results come from the commands in the doc)
"""
from __future__ import annotations

from findings_common import REPO, fmt_p, load_results, main_for

DOC = REPO / "docs" / "analyses" / "stats.md"


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render() -> dict:
    r = load_results("stats", "default/results.json")
    load, co = r["load"], r["coactivation"]
    tok = r.get("token_specialisation") or {}
    rows = ["| MoE layer | tokens | load entropy / max | KL from uniform (chance) | co-activation dispersion (chance ± SD) "
            "| largest pair ratio (rank-matched chance ± SD; p) | token purity (chance) |",
            "|---|---|---|---|---|---|---|"]
    for i, layer in enumerate(r["moe_layers"]):
        c = co["per_layer"][i]
        flag = " **beyond**" if c["beyond_chance"] else ""
        rows.append(
            f"| {layer} | {r['n_tokens'][i]:,} | {_f(load['normalised_entropy'][i])} | "
            f"{_f(load['kl_uniform_bits'][i], 4)} ({_f(load['kl_uniform_chance_bits'][i], 4)}) | "
            f"{_f(c['dispersion'], 2)} ({_f(c['dispersion_chance'], 2)} ± {_f(c['dispersion_chance_sd'], 2)}){flag} | "
            f"{_f(c['max_ratio'], 2)} ({_f(c['max_ratio_chance'], 2)} ± {_f(c['max_ratio_chance_sd'], 2)}; "
            f"{fmt_p(c['max_ratio_p_value'], c['ratio_chance_draws'])}) | "
            f"{_f(tok['token_purity'][i]) if tok else 'n/a'} ({_f(tok['token_purity_chance'][i]) if tok else 'n/a'}) |")
    n_beyond = sum(c["beyond_chance"] for c in co["per_layer"])
    ratios = [c["dispersion"] / c["dispersion_chance"] for c in co["per_layer"] if c["dispersion_chance"]]
    w = r.get("weights") or {}
    text = [
        f"{len(r['moe_layers'])} MoE layers, E = {r['n_experts']}, k = {r['top_k']}; router: {r['router']}.",
        "",
        "\n".join(rows),
        "",
        f"- Co-activation is beyond chance (dispersion > chance + 3 SD and ≥ 1.5 × chance) at {n_beyond} of "
        f"{len(ratios)} layers; the dispersion is {min(ratios):.1f}–{max(ratios):.1f} × its chance level.",
        f"- Null: {co['null']}.",
        f"- Weights: range 0–{w.get('weight_max', 1.0):g}; mean sum of a token's k weights "
        f"{_f(min(w['sum_mean']))}–{_f(max(w['sum_mean']))}." if w else "- The trace has no weights.",
    ]
    return {DOC: {"stats-default-model": "\n".join(text)}}


if __name__ == "__main__":
    main_for(render)
