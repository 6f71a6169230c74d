"""Fill the generated blocks of docs/analyses/design-choices.md from
docs/results/design-choices/results.json (the several-seed run the doc describes).

Run: python scripts/findings_design_choices.py [--check]
"""
from __future__ import annotations

from findings_common import REPO, load_results, main_for

DOC = REPO / "docs" / "analyses" / "design-choices.md"


def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return f"{0.0 if abs(x) < 0.5 * 10 ** -digits else x:.{digits}f}"  # no "-0.000"


def _pm(m: float | None, sd: float | None, digits: int = 3) -> str:
    return _f(m, digits) if sd is None else f"{_f(m, digits)} ± {_f(sd, digits)}"


def render() -> dict:
    r = load_results("design-choices")
    p = r["params"]
    base, m = p["base_config"], p["measurement"]
    v0 = r["variants"][0]
    seeds = p["seeds"]
    head = (f"{r['n_variants']} variants: routing {', '.join(p['routing'])} × top-k {', '.join(map(str, p['top_k']))} × "
            f"router {', '.join(p['router'])} × seeds {', '.join(map(str, seeds))}; "
            f"{base['model']['num_layers']} MoE layers, {base['model']['n_experts']} experts, hidden "
            f"{base['model']['hidden_size']}, {v0['tokens']:,} training tokens per variant; "
            f"{v0['measured_tokens']:,} validation tokens routed per variant, {m['shuffles']} shuffles per chance level "
            f"(smallest p {1 / (m['shuffles'] + 1):.3g}). Unigram baseline perplexity {_f(r['unigram_mean_ppl'], 1)}.")
    rows = ["| cell | mean ppl ± SD over seeds | domain NMI (chance) [vocabulary-only router] "
            "| token-type NMI above within-sequence chance ± SD | token-id NMI corrected | experts follow (per seed) |",
            "|---|---|---|---|---|---|"]
    verdicts = {}
    for v in r["variants"]:
        verdicts.setdefault(f"{v['routing']}-top{v['top_k']}-{v['router']}", []).append(v["specialises_by"])
    for c in r["cells"]:
        rows.append(f"| {c['name']} | {_pm(c['mean_ppl'], c['mean_ppl_sd'], 1)} | "
                    f"{_f(c['domain_nmi'])} ({_f(c['domain_nmi_chance'])}) [{_f(c.get('domain_nmi_vocabulary_control'))}] | "
                    f"{_pm(c['token_type_nmi_within_sequence_excess'], c.get('token_type_nmi_within_sequence_excess_sd'))} | "
                    f"{_f(c['token_id_nmi_excess'])} | {', '.join(verdicts.get(c['name'], []))} |")
    f = r["findings"]
    ratio = lambda x: (f"{_f(x['ratio'])} (same-seed {_pm(x.get('ratio_mean', x['ratio']), x.get('ratio_sd'))}, "  # noqa: E731
                       f"range {_f(x.get('ratio_min'))}–{_f(x.get('ratio_max'))}, n = {x.get('ratio_n')})")
    bullets = ["- Frozen ÷ learned perplexity: " + "; ".join(
        f"{x['routing']} top-{x['top_k']} {ratio(x)}" for x in f["frozen_vs_learned"]) + "."]
    bullets.append("- Top-1 ÷ top-2 perplexity: " + "; ".join(
        f"{x['routing']} {x['router']} {ratio(x)}" for x in f["top1_vs_top2"]) + ".")
    for routing, e in f["by_routing"].items():
        v = e["verdicts"]
        bullets.append(f"- {routing}-level routing: experts follow token types in {v['token types']}, domains in "
                       f"{v['domains']}, neither in {v['neither']} of {sum(v.values())} trained variants; mean domain NMI above chance {_f(e['domain_nmi_excess'])}, of the vocabulary-only router "
                       f"{_f(e.get('domain_nmi_vocabulary_control_excess'))}; token-type NMI above the within-sequence "
                       f"chance {_f(e['token_type_nmi_within_sequence_excess'])}.")
    return {DOC: {"design-choices-seeds": head + "\n\n" + "\n".join(rows) + "\n\n" + "\n".join(bullets)}}


if __name__ == "__main__":
    main_for(render)
