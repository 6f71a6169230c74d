"""Fill the generated blocks of docs/analyses/geometry.md (and the geometry line of
docs/default-model.md) from docs/results/geometry/default/results.json.

Run: python scripts/findings_geometry.py [--check]
"""
from __future__ import annotations

from findings_common import REPO, fmt_p, load_results, main_for

DOC = REPO / "docs" / "analyses" / "geometry.md"


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _g(entry: dict, *path: str):
    for key in path:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def _range(values: list) -> str:
    vals = [v for v in values if v is not None]
    return f"{min(vals):.2f}–{max(vals):.2f}" if vals else "n/a"


def render() -> dict:
    r = load_results("geometry", "default/results.json")
    n_router = r["params"]["random_routers"]
    head = ("| MoE layer | tokens | ρ(cos, overlap) [Mantel p] | ρ, different id | nearest / random neighbour "
            "| same, different id | token-id predictor | mean-direction share (1/H) "
            "| router logit share (random routers: mean ± SD) | Holm p: blinder / more aligned "
            "| visit cosine within / across / load chance |")
    rows = [head, "|" + "---|" * 11]
    for i, e in enumerate(r["per_layer"]):
        md = e.get("mean_direction") or {}
        v = r["visits"][i]["all"] if i < len(r["visits"]) else {}
        mantel = _g(e, "pairs", "random", "spearman_overlap_mantel_p")
        rows.append(
            f"| {e['layer']} | {e['n_tokens']:,} | {_f(_g(e, 'pairs', 'random', 'spearman_overlap'))} "
            f"[{fmt_p(mantel, r['params']['permutations'])}] | {_f(_g(e, 'pairs', 'diff_token', 'spearman_overlap'))} | "
            f"{_f(_g(e, 'neighbours', 'any', 'nn_overlap'))} / {_f(_g(e, 'neighbours', 'any', 'random_overlap'))} | "
            f"{_f(_g(e, 'neighbours', 'diff_token', 'nn_overlap'))} / {_f(_g(e, 'neighbours', 'diff_token', 'random_overlap'))} | "
            f"{_f(_g(e, 'neighbours', 'same_token', 'random_overlap'))} | "
            f"{_f(md.get('mean_direction_share'))} ({_f(md.get('mean_direction_share_chance'))}) | "
            f"{_f(md.get('router_mean_logit_share'))} ({_f(md.get('router_mean_logit_share_null_mean'))} ± "
            f"{_f(md.get('router_mean_logit_share_null_sd'))}) | "
            f"{fmt_p(md.get('router_mean_logit_share_p_lower_holm'))} / {fmt_p(md.get('router_mean_logit_share_p_upper_holm'))} | "
            f"{_f(v.get('within'))} / {_f(v.get('across'))} / {_f(v.get('load_chance'))} |")
    phases = ["| phase | tokens | ρ(cos, overlap) per layer | nearest / random neighbour per layer | random-pair overlap per layer |",
              "|---|---|---|---|---|"]
    for phase, entries in (r.get("by_phase") or {}).items():
        phases.append(f"| {phase} | {entries[0]['n_tokens']:,} | "
                      + ", ".join(_f(_g(e, 'pairs', 'random', 'spearman_overlap')) for e in entries) + " | "
                      + ", ".join(f"{_f(_g(e, 'neighbours', 'any', 'nn_overlap'), 2)} / "
                                  f"{_f(_g(e, 'neighbours', 'any', 'random_overlap'), 2)}" for e in entries) + " | "
                      + ", ".join(_f(_g(e, 'pairs', 'random', 'overlap')) for e in entries) + " |")
    md = [e.get("mean_direction") or {} for e in r["per_layer"]]
    blind = [e["layer"] for e, m in zip(r["per_layer"], md) if (m.get("router_mean_logit_share_p_lower_holm") or 1) <= 0.05]
    aligned = [e["layer"] for e, m in zip(r["per_layer"], md) if (m.get("router_mean_logit_share_p_upper_holm") or 1) <= 0.05]
    below_iso = [e["layer"] for e, m in zip(r["per_layer"], md)
                 if m.get("router_mean_logit_share") is not None
                 and m["router_mean_logit_share"] < m["router_mean_logit_share_isotropic"]]
    k, E = r["top_k"], r["n_experts"]
    sentences = [
        f"E = {E}, k = {k}: chance overlap k/E = {_f(r['expected_overlap_chance'])}. "
        f"{n_router} random routers per layer for the mean-direction null; Holm across layers.",
        "",
        "\n".join(rows),
        "",
        "\n".join(phases),
        "",
        f"- Nearest hidden-space neighbour: overlap {_range(r['nn_overlap'])} against "
        f"{_range(r['random_neighbour_overlap'])} for a random neighbour; among different token ids "
        f"{_range(r['nn_overlap_diff_token'])} (random {_range(r['random_neighbour_overlap_diff_token'])}); "
        f"another occurrence of the same token id {_range(r['random_neighbour_overlap_same_token'])}.",
        f"- Mean direction: {_range(r['mean_direction_share'])} of the second moment (1/H = "
        f"{_f(r['mean_direction_share_chance'][0], 4)}). Router logit share below the isotropic value at layers "
        f"{', '.join(map(str, below_iso)) or 'none'}; blinder to the mean than random routers (Holm p ≤ 0.05) at layers "
        f"{', '.join(map(str, blind)) or 'none'}; more aligned than random routers at layers "
        f"{', '.join(map(str, aligned)) or 'none'}.",
        f"- Visit vectors: halves of one sequence {_range(r['visit_cosine_within'])}, halves of different sequences "
        f"{_range(r['visit_cosine_across'])}, load-matched chance {_range(r['visit_cosine_load_chance'])}.",
    ]
    return {DOC: {"geometry-default-model": "\n".join(sentences)}}


if __name__ == "__main__":
    main_for(render)
