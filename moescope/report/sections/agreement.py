"""Report section of `moescope analyze agreement`: routing agreement of two runs of one model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moescope.report.sections import Section, embedded_figures
from moescope.report.sections.generic import format_value

TEMPLATE = """\
{% for note in notes %}<p class="note warn">{{ note }}</p>{% endfor %}
<p class="baseline-note">Same computation: agreement 1.0. Two independent uniform top-{{ k }} draws among {{ e }}
experts: set agreement {{ chance_set }}, overlap/k {{ chance_overlap }}.</p>
<p>{{ n_compared }} tokens compared in {{ n_pairs }} sequence pairs aligned by token ids; {{ n_unaligned }} tokens
unaligned. Overall: set agreement <strong>{{ set_agreement }}</strong>, top-1 {{ top1 }}, overlap/k {{ overlap }}.</p>
<table class="values">
<thead><tr><th>MoE layer</th><th>rows</th><th>top-k set</th><th>95% CI (sequences resampled)</th><th>top-1</th><th>overlap / k</th>
<th>prompt set</th><th>generated set</th><th>rows in A only</th><th>rows in B only</th></tr></thead>
<tbody>{% for r in rows %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody>
</table>
{% if margin %}<h4>By router margin (k-th − (k+1)-th logit, trace {{ margin_source }})</h4>
<table class="values"><thead><tr><th>margin ≥</th><th>rows</th><th>set agreement</th><th>mismatches</th></tr></thead>
<tbody>{% for r in margin %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>{% endif %}
{% if worst %}<h4>Tokens with the most disagreeing layers</h4>
<table class="values"><thead><tr><th>seq A</th><th>seq B</th><th>pos</th><th>phase</th><th>token</th><th>layers</th></tr></thead>
<tbody>{% for r in worst %}<tr>{% for cell in r %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>{% endif %}
{% for fig in figures %}<figure><img src="{{ fig.uri }}" alt="{{ fig.name }}"><figcaption>{{ fig.name }}</figcaption></figure>{% endfor %}
"""


def render(results: dict[str, Any], out_dir: Path, env: Any) -> Section:
    """Per-layer agreement table, the margin table, the worst tokens and the figures (all text escaped)."""
    layers = results.get("moe_layers") or []
    col = lambda key, i: format_value((results.get(key) or [None] * len(layers))[i])  # noqa: E731
    phase = lambda ph, i: format_value(((results.get("by_phase") or {}).get(ph) or {}).get(  # noqa: E731
        "per_layer_set_agreement", [None] * len(layers))[i])
    cis = results.get("per_layer_set_agreement_ci") or [[None, None]] * len(layers)
    ci = lambda i: f"{format_value(cis[i][0])} – {format_value(cis[i][1])}"  # noqa: E731
    rows = [[layer, col("per_layer_n", i), col("per_layer_set_agreement", i), ci(i), col("per_layer_top1_agreement", i),
             col("per_layer_mean_overlap", i), phase("prompt", i), phase("generated", i),
             col("per_layer_rows_only_a", i), col("per_layer_rows_only_b", i)] for i, layer in enumerate(layers)]
    margin = results.get("margin") or {}
    margin_rows = [[format_value(e), format_value(n), format_value(r), format_value(m)]
                   for e, n, r, m in zip(margin.get("edges") or [], margin.get("n") or [],
                                         margin.get("set_agreement") or [], margin.get("mismatches") or [])]
    worst = [[w.get("seq_id_a"), w.get("seq_id_b"), w.get("pos"), w.get("phase"),
              repr(w.get("token")) if w.get("token") is not None else w.get("token_id"), w.get("n_layers_disagree")]
             for w in results.get("worst_tokens") or []]
    align = results.get("alignment") or {}
    html = env.from_string(TEMPLATE).render(
        notes=results.get("notes") or [], k=results.get("top_k"), e=results.get("n_experts"),
        chance_set=format_value(results.get("chance_set_agreement")),
        chance_overlap=format_value(results.get("chance_mean_overlap")),
        n_compared=format_value(results.get("n_tokens_compared")), n_pairs=format_value(align.get("n_sequence_pairs")),
        n_unaligned=format_value(results.get("n_tokens_unaligned")),
        set_agreement=format_value(results.get("set_agreement")), top1=format_value(results.get("top1_agreement")),
        overlap=format_value(results.get("mean_overlap")), rows=rows, margin=margin_rows,
        margin_source=str(margin.get("source", "")).upper(), worst=worst, figures=embedded_figures(results, out_dir))
    summary = (f"Top-k set agreement {format_value(results.get('set_agreement'))} over "
               f"{format_value(results.get('n_tokens_compared'))} aligned tokens "
               f"(chance {format_value(results.get('chance_set_agreement'))}).")
    return Section(key="agreement", title="Routing agreement of two runs", summary=summary, html=html)
