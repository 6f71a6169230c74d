"""Report section of `moescope analyze geometry`: routing next to hidden-state geometry."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moescope.report.sections import Section, embedded_figures
from moescope.report.sections.generic import format_value

TEMPLATE = """\
{% for note in notes %}<p class="note warn">{{ note }}</p>{% endfor %}
<p class="baseline-note">Chance for two independent uniform top-{{ k }} draws among {{ e }} experts:
overlap k/E = {{ chance }}, at least one shared expert {{ share_chance }}. Every row compares with a
random neighbour or random pair drawn from the same tokens.</p>
<table class="values">
<thead><tr><th>MoE layer</th><th>tokens</th><th>ρ(cos, overlap) [Mantel p]</th><th>ρ, different id</th>
<th>ρ, same id</th><th>overlap: nearest / random neighbour</th><th>same, different id</th>
<th>token-id predictor</th><th>mean-direction share (1/H)</th>
<th>router logit share (random routers: mean ± SD) [Holm p, lower / higher]</th></tr></thead>
<tbody>{% for r in rows %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody>
</table>
{% if visits %}<h4>Per-sequence visit frequencies (cosine)</h4>
<table class="values"><thead><tr><th>MoE layer</th><th>sequences</th><th>within (even vs odd positions)</th>
<th>across sequences</th><th>chance, actual loads</th><th>chance, uniform</th><th>prompt vs own rollout</th>
<th>prompt vs other rollouts</th></tr></thead>
<tbody>{% for r in visits %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>{% endif %}
{% if phases %}<h4>Prompt vs generated tokens</h4>
<table class="values"><thead><tr><th>phase</th><th>MoE layer</th><th>tokens</th><th>ρ(cos, overlap)</th>
<th>ρ, different id</th><th>NN overlap</th><th>random neighbour</th><th>random-pair overlap</th></tr></thead>
<tbody>{% for r in phases %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{% else %}<p class="muted">No generated tokens in the trace: every number is over prompt (prefill) tokens.</p>{% endif %}
{% for fig in figures %}<figure><img src="{{ fig.uri }}" alt="{{ fig.name }}"><figcaption>{{ fig.name }}</figcaption></figure>{% endfor %}
"""


def _g(entry: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(entry, dict):
            return None
        entry = entry.get(key)
    return entry


def _pair(value: Any, reference: Any) -> str:
    return f"{format_value(value)} ({format_value(reference)})"


def _router_share(md: dict[str, Any]) -> str:
    """The router's mean-direction logit share next to random routers (or the isotropic value)."""
    share = md.get("router_mean_logit_share")
    if md.get("router_mean_logit_share_null_mean") is None:
        return _pair(share, md.get("router_mean_logit_share_isotropic"))
    return (f"{format_value(share)} ({format_value(md['router_mean_logit_share_null_mean'])} ± "
            f"{format_value(md['router_mean_logit_share_null_sd'])}) "
            f"[{format_value(md.get('router_mean_logit_share_p_lower_holm'))} / "
            f"{format_value(md.get('router_mean_logit_share_p_upper_holm'))}]")


def _slash(a: Any, b: Any) -> str:
    return f"{format_value(a)} / {format_value(b)}"


def _median(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return float(np.median(vals)) if vals else None


def render(results: dict[str, Any], out_dir: Path, env: Any) -> Section:
    """The geometry section: per-layer table, visit frequencies, phase split and figures."""
    rows = []
    for e in results.get("per_layer") or []:
        rows.append([e["layer"], format_value(e.get("n_tokens")),
                     f"{format_value(_g(e, 'pairs', 'random', 'spearman_overlap'))} "
                     f"[{format_value(_g(e, 'pairs', 'random', 'spearman_overlap_mantel_p'))}]",
                     format_value(_g(e, "pairs", "diff_token", "spearman_overlap")),
                     format_value(_g(e, "pairs", "same_token", "spearman_overlap")),
                     _slash(_g(e, "neighbours", "any", "nn_overlap"), _g(e, "neighbours", "any", "random_overlap")),
                     _slash(_g(e, "neighbours", "diff_token", "nn_overlap"),
                            _g(e, "neighbours", "diff_token", "random_overlap")),
                     format_value(_g(e, "neighbours", "same_token", "random_overlap")),
                     _pair(_g(e, "mean_direction", "mean_direction_share"),
                           _g(e, "mean_direction", "mean_direction_share_chance")),
                     _router_share(e.get("mean_direction") or {})])
    visits = []
    for v in results.get("visits") or []:
        visits.append([v["layer"], format_value(_g(v, "all", "n_sequences")), format_value(_g(v, "all", "within")),
                       format_value(_g(v, "all", "across")), format_value(_g(v, "all", "load_chance")),
                       format_value(_g(v, "all", "uniform_chance")),
                       format_value(_g(v, "prompt_vs_rollout", "same_sequence")),
                       format_value(_g(v, "prompt_vs_rollout", "other_sequences"))])
    phases = []
    for phase, entries in (results.get("by_phase") or {}).items():
        for e in entries:
            phases.append([phase, e["layer"], format_value(e.get("n_tokens")),
                           format_value(_g(e, "pairs", "random", "spearman_overlap")),
                           format_value(_g(e, "pairs", "diff_token", "spearman_overlap")),
                           format_value(_g(e, "neighbours", "any", "nn_overlap")),
                           format_value(_g(e, "neighbours", "any", "random_overlap")),
                           format_value(_g(e, "pairs", "random", "overlap"))])
    figures = embedded_figures(results, out_dir)
    html = env.from_string(TEMPLATE).render(
        notes=results.get("notes") or [], k=results.get("top_k"), e=results.get("n_experts"),
        chance=format_value(results.get("expected_overlap_chance")),
        share_chance=format_value(results.get("share_at_least_one_chance")),
        rows=rows, visits=visits, phases=phases, figures=figures)
    return Section(key="geometry", title="Routing and hidden-state geometry", summary=_summary(results), html=html)


def _summary(results: dict[str, Any]) -> str:
    rho = _median(results.get("spearman_cosine_overlap") or [])
    rho_diff = _median(results.get("spearman_cosine_overlap_diff_token") or [])
    nn = _median(results.get("nn_overlap") or [])
    rnd = _median(results.get("random_neighbour_overlap") or [])
    layers = len(results.get("layers") or [])
    return (f"Over {layers} MoE layers, hidden-state cosine and routing overlap have a median Spearman ρ of "
            f"{format_value(rho)} ({format_value(rho_diff)} for pairs of different tokens, i.e. beyond token "
            f"identity). The nearest neighbour in hidden space shares a median {format_value(nn)} of a token's "
            f"experts, against {format_value(rnd)} for a random neighbour and chance k/E = "
            f"{format_value(results.get('expected_overlap_chance'))}.")
