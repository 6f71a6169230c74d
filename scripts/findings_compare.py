"""Fill the generated blocks of docs/analyses/compare.md from docs/results/compare/*/results.json:
chat-template/ (the default model with and without a chat template) and seeds/ (two seeds of
one design-choice variant), when present.

Run: python scripts/findings_compare.py [--check]
"""
from __future__ import annotations

from pathlib import Path

from findings_common import REPO, RESULTS, fmt_p, load_results, main_for

DOC = REPO / "docs" / "analyses" / "compare.md"


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pm(m: float | None, sd: float | None) -> str:
    return _f(m) if sd is None else f"{_f(m)} ± {_f(sd)}"


def _holm(p: float | None, shuffles: int, layers: int) -> str:
    """A Holm-adjusted permutation p; at its floor (layers / (shuffles + 1)) stated as 'p ≤ floor'."""
    floor = min(1.0, layers / (shuffles + 1))
    if p is not None and p <= floor + 1e-12:
        return f"p ≤ {floor:.3g}"
    return fmt_p(p)


def _table(r: dict) -> str:
    layers = r["layers"]
    shuffles = r["params"]["shuffles"]
    out = ["| tokens | MoE layer | n | overlap (load chance) | matched, cross-fitted | matched chance (± SD) "
           "| token-id null (± SD) | Holm p, beyond token identity |", "|---|---|---|---|---|---|---|---|"]
    blocks = [("all", r)] + [(name.replace("_", " "), b) for name, b in (r.get("by_phase") or {}).items()]
    for name, b in blocks:
        n = b.get("n_tokens") or [e.get("n_tokens") for e in r["per_layer"]]
        for i, layer in enumerate(layers):
            get = lambda key: (b.get(key) or [None] * (i + 1))[i]  # noqa: E731
            out.append(f"| {name} | {layer} | {n[i]:,} | {_f(get('per_layer_overlap'))} ({_f(get('per_layer_load_chance'))}) | "
                       f"{_f(get('per_layer_overlap_matched_crossfit'))} | "
                       f"{_pm(get('per_layer_matched_chance'), get('per_layer_matched_chance_sd'))} | "
                       f"{_pm(get('per_layer_overlap_matched_token_null'), get('per_layer_overlap_matched_token_null_sd'))} | "
                       f"{_holm(get('per_layer_overlap_matched_token_null_p_holm'), shuffles, len(layers))} |")
    a = r["alignment"]
    # no machine paths: the last two components of an absolute model path (".../<variant>/model")
    name = lambda m: "/".join(Path(m).parts[-2:]) if m and Path(m).is_absolute() else m  # noqa: E731
    head = (f"A: `{name(r['traces']['a']['model'])}`, B: `{name(r['traces']['b']['model'])}`. {a['mode']} mode ({a['texts']}); "
            f"{a['n_prompt_aligned']:,} prompt tokens aligned ({100 * a['share_prompt_matched_a']:.1f}% of A's), "
            f"{a['n_generated_aligned']:,} generated positions"
            + (f" ({100 * a['generated_same_token_share']:.1f}% with the same token on both sides)"
               if a.get("generated_same_token_share") is not None else "")
            + f". E = {r['n_experts']}, k = {r['top_k']}: k/E = {_f(r['expected_overlap_chance'])}. "
            f"{shuffles} shuffles per chance level (smallest p {1 / (shuffles + 1):.3g} before Holm, "
            f"{min(1.0, len(layers) / (shuffles + 1)):.3g} after Holm over {len(layers)} layers).")
    return head + "\n\n" + "\n".join(out)


def render() -> dict:
    blocks = {}
    for name in ("chat-template", "seeds"):
        if (RESULTS / "compare" / name / "results.json").exists():
            blocks[f"compare-{name}"] = _table(load_results("compare", f"{name}/results.json"))
    return {DOC: blocks}


if __name__ == "__main__":
    main_for(render)
