"""Report section of `moescope analyze compare` and `analyze chat-template`: routing overlap of two traces."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moescope.report.sections import Section, embedded_figures
from moescope.report.sections.generic import format_value

TEMPLATE = """\
{% for note in notes %}<p class="note warn">{{ note }}</p>{% endfor %}
<p class="baseline-note">Chance for two independent uniform top-{{ k }} draws among {{ e }} experts: overlap
k/E = {{ chance }}; at least one shared expert 1 − C(E−k,k)/C(E,k) = {{ share_chance }}. The matched overlap is
fitted on the tokens it scores (optimistic); the cross-fitted one is fitted on the other half of the sequences,
the matched chance is the cross-fitted procedure run on shuffled token pairs (mean ± SD of {{ shuffles }} shuffles), and
the token-id null shuffles B's routing only among occurrences of the same token id: what token identity alone explains
when both models route each token id alike (Holm p across layers: agreement beyond token identity).</p>
<p>A: <code>{{ trace_a }}</code> (model {{ model_a }}); B: <code>{{ trace_b }}</code> (model {{ model_b }}).</p>
<p>Alignment: <strong>{{ mode }}</strong> ({{ texts }}); {{ n_prompt }} prompt tokens aligned
({{ share_a }} of A's, {{ share_b }} of B's){% if n_gen %}, {{ n_gen }} generated tokens{% endif %}.</p>
<table class="values">
<thead><tr><th>MoE layer</th><th>tokens</th><th>overlap</th><th>≥1 shared</th><th>chance given loads</th>
<th>matched (in-sample)</th><th>matched (cross-fitted)</th><th>matched chance</th><th>token-id null [Holm p]</th>
<th>matching stable across halves</th>
<th>random-pair overlap in A / B</th></tr></thead>
<tbody>{% for r in rows %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody>
</table>
{% if phases %}<h4>By phase</h4><table class="values"><thead><tr><th>tokens</th><th>MoE layer</th><th>n</th>
<th>overlap</th><th>chance given loads</th><th>matched (cross-fitted)</th><th>matched chance</th><th>token-id null [Holm p]</th></tr></thead>
<tbody>{% for r in phases %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>{% endif %}
{% if deep %}<h4>Shallow vs deep layers (mean overlap)</h4><table class="values"><thead><tr><th>tokens</th>
<th>shallow layers</th><th>overlap</th><th>deep layers</th><th>overlap</th></tr></thead>
<tbody>{% for r in deep %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>{% endif %}
{% for fig in figures %}<figure><img src="{{ fig.uri }}" alt="{{ fig.name }}"><figcaption>{{ fig.name }}</figcaption></figure>{% endfor %}
"""


def render(results: dict[str, Any], out_dir: Path, env: Any) -> Section:
    """The compare section: alignment, per-layer overlap with its chance levels, phases, figures."""
    align = results.get("alignment") or {}
    rows = []
    for e in results.get("per_layer") or []:
        rows.append([e["layer"], format_value(e.get("n_tokens")), format_value(e.get("overlap")),
                     format_value(e.get("share_at_least_one")), format_value(e.get("load_chance")),
                     format_value(e.get("overlap_matched")), format_value(e.get("overlap_matched_crossfit")),
                     _pm(e.get("matched_chance"), e.get("matched_chance_sd")),
                     f"{_pm(e.get('matched_token_null'), e.get('matched_token_null_sd'))} "
                     f"[{format_value(e.get('matched_token_null_p_holm'))}]",
                     format_value(e.get("matching_fold_agreement")),
                     f"{format_value(e.get('a_pair_overlap'))} / {format_value(e.get('b_pair_overlap'))}"])
    phases = []
    for name, block in (results.get("by_phase") or {}).items():
        for i, layer in enumerate(results.get("layers") or []):
            get = lambda key: (block.get(key) or [None] * (i + 1))[i]  # noqa: E731
            phases.append([name.replace("_", " "), layer, format_value(get("n_tokens")),
                           format_value(get("per_layer_overlap")), format_value(get("per_layer_load_chance")),
                           format_value(get("per_layer_overlap_matched_crossfit")),
                           _pm(get("per_layer_matched_chance"), get("per_layer_matched_chance_sd")),
                           f"{_pm(get('per_layer_overlap_matched_token_null'), get('per_layer_overlap_matched_token_null_sd'))} "
                           f"[{format_value(get('per_layer_overlap_matched_token_null_p_holm'))}]"])
    deep = [[name.replace("_", " "), ", ".join(map(str, d.get("shallow_layers") or [])),
             format_value(d.get("shallow_overlap")), ", ".join(map(str, d.get("deep_layers") or [])),
             format_value(d.get("deep_overlap"))] for name, d in (results.get("deep_vs_shallow") or {}).items()]
    figures = embedded_figures(results, out_dir)
    traces, params_in = results.get("traces") or {}, results.get("params") or {}
    html = env.from_string(TEMPLATE).render(
        notes=list(align.get("notes") or []) + list(results.get("notes") or []),
        k=results.get("top_k"), e=results.get("n_experts"),
        chance=format_value(results.get("expected_overlap_chance")),
        share_chance=format_value(results.get("share_at_least_one_chance")),
        mode=align.get("mode", "n/a"), texts=align.get("texts", "n/a"),
        n_prompt=format_value(align.get("n_prompt_aligned")), n_gen=align.get("n_generated_aligned"),
        share_a=_percent(align.get("share_prompt_matched_a")), share_b=_percent(align.get("share_prompt_matched_b")),
        rows=rows, phases=phases, deep=deep, figures=figures, shuffles=(results.get("params") or {}).get("shuffles", 1),
        trace_a=traces.get("a", {}).get("path", params_in.get("trace_a", "n/a")),
        model_a=traces.get("a", {}).get("model", params_in.get("model_a", "n/a")),
        trace_b=traces.get("b", {}).get("path", params_in.get("trace_b", "n/a")),
        model_b=traces.get("b", {}).get("model", params_in.get("model_b", "n/a")))
    params = results.get("params") or {}
    chat = params.get("kind") == "chat-template"
    title = "Routing with and without a chat template" if chat else "Routing overlap of two traces"
    return Section(key="compare", title=title, summary=_summary(results, chat), html=html)


def _pm(mean: Any, sd: Any) -> str:
    return format_value(mean) if sd is None else f"{format_value(mean)} ± {format_value(sd)}"


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def _summary(results: dict[str, Any], chat: bool) -> str:
    """One sentence on prompt tokens (prefill; generated tokens can collapse and inflate a pooled mean)."""
    block = (results.get("by_phase") or {}).get("prompt") or results
    nums = lambda key: [v for v in block.get(key) or [] if isinstance(v, (int, float))]  # noqa: E731
    mean = lambda xs: format_value(sum(xs) / len(xs)) if xs else "n/a"  # noqa: E731
    what = "the same user text with and without the chat template" if chat else "the two traces"
    return (f"On aligned prompt tokens, {what} share a mean {mean(nums('per_layer_overlap'))} of their experts "
            f"per MoE layer with raw expert ids (chance given the loads {mean(nums('per_layer_load_chance'))}, "
            f"k/E = {format_value(results.get('expected_overlap_chance'))}), and "
            f"{mean(nums('per_layer_overlap_matched_crossfit'))} after cross-fitted expert matching (matching on "
            f"shuffled tokens: {mean(nums('per_layer_matched_chance'))}; shuffled only among occurrences of the same "
            f"token id: {mean(nums('per_layer_overlap_matched_token_null'))}).")
