"""Report section of `moescope analyze stats`: expert load, co-activation, transitions,
token and label specialisation, weights and phases, each next to its chance level."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moescope.report.sections import Section, embedded_figures
from moescope.report.sections.generic import format_value as fv

TEMPLATE = """\
{% for note in notes %}<p class="note warn">{{ note }}</p>{% endfor %}
<p class="baseline-note">Chance levels: a router that sends every token to a uniformly random set of
{{ k }} of {{ e }} experts (co-activation: one that keeps each expert's load and this router's selection rule).
Entropies, KL divergences and mutual information are in bits.</p>
<p class="muted">This model's router: {{ router }}.</p>
<table class="values">
<thead><tr><th>MoE layer</th><th>tokens</th><th>load entropy / max</th><th>KL from uniform (chance)</th>
<th>dead</th><th>rare</th><th>largest / smallest share ÷ fair</th><th>co-activation dispersion (chance ± SD)</th>
<th>token purity (chance)</th><th>label MI (95% of shuffles) [p]</th></tr></thead>
<tbody>{% for r in rows %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody>
</table>
<ul class="muted">
<li><b>Load entropy</b>: how evenly a layer spreads its assignments over the experts ({{ hmax }} bits = perfectly even).
<b>KL from uniform</b> is the gap to even in bits; the chance column is what a uniform router shows from sampling noise alone.</li>
<li><b>Dead</b> experts got no token; <b>rare</b> ones got less than {{ rare_pct }} of their fair share (1/E of the assignments).</li>
<li><b>Co-activation dispersion</b>: how far the counts of expert pairs chosen together for the same token stray from a
random pairing that keeps each expert's load; about {{ disp_chance }} by chance, larger means experts form teams.</li>
<li><b>Token purity</b>: share of assignments that go to each token id's own {{ k }} most frequent experts; 1 means
routing is a function of the token id alone. The chance column is the same measure for routing that ignores token ids.</li>
<li><b>Label MI</b>: how much the expert choice tells about the sequence's label; compared with the same
number after shuffling labels across sequences.</li>
</ul>
{% if pairs %}<h4>Most co-activated expert pairs, layer {{ focus }}</h4>
<p class="muted">Expected counts: random pairing that keeps each expert's load under this router's selection rule
({{ rule }}). The chance ratio is what the pair at the same rank shows by chance (mean ± SD of Poisson draws around the
expected counts): the largest of many ratios is above 1 even without teams. Largest ratio vs chance: p = {{ pair_p }}.</p>
<table class="values"><thead><tr><th>experts</th><th>tokens with both</th><th>expected by chance</th><th>ratio</th><th>chance ratio at this rank</th></tr></thead>
<tbody>{% for r in pairs %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>{% endif %}
{% if transitions %}<h4>Layer-to-layer transitions</h4>
<p class="muted">Mutual information between the experts a token uses at one MoE layer and at the next, against its
value for independent layers; the largest lift is how much more often the most common transition occurs than chance.</p>
<table class="values"><thead><tr><th>from → to</th><th>tokens</th><th>MI bits (chance)</th><th>largest lift</th>
<th>top transition (P(b | a))</th></tr></thead>
<tbody>{% for r in transitions %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>{% endif %}
{% if tokens %}<h4>Token specialisation, layer {{ focus }}</h4>
<p class="muted">For the experts with the most specialised tokens: the tokens they receive most relative to
the token's frequency (lift 1 = chance; tokens seen at least {{ min_count }} times; p: binomial tail).</p>
<table class="values"><thead><tr><th>expert</th><th>tokens (lift, p)</th></tr></thead>
<tbody>{% for r in tokens %}<tr><td class="num">{{ r[0] }}</td><td>{{ r[1] }}</td></tr>{% endfor %}</tbody></table>{% endif %}
{% if labels %}<h4>Experts preferred by each label, layer {{ label_layer }} (largest label MI)</h4>
<table class="values"><thead><tr><th>label</th><th>experts (lift over their overall share)</th></tr></thead>
<tbody>{% for r in labels %}<tr><td>{{ r[0] }}</td><td>{{ r[1] }}</td></tr>{% endfor %}</tbody></table>{% endif %}
{% if weights %}<h4>Routing weights</h4>
<p class="muted">Mean weight of each rank (equal weights would be {{ uniform_w }}) and mean sum of a token's k weights.
{% if w_max != 1 %}This router scales its weights: they range over 0–{{ w_max }}, and the histograms are binned on that range.{% endif %}</p>
<table class="values"><thead><tr><th>MoE layer</th><th>mean weight by rank</th><th>mean sum</th></tr></thead>
<tbody>{% for r in weights %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{% else %}<p class="muted">The trace records no routing weights: weight distributions are not shown.</p>{% endif %}
{% if phases %}<h4>Prompt vs generated tokens</h4>
<table class="values"><thead><tr><th>MoE layer</th><th>tokens prompt / generated</th><th>entropy / max: prompt, generated</th>
<th>dead: prompt, generated</th><th>Jensen-Shannon bits (chance)</th></tr></thead>
<tbody>{% for r in phases %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{% else %}<p class="muted">No generated tokens in the trace: no prompt/generated comparison.</p>{% endif %}
{% for fig in figures %}<figure><img src="{{ fig.uri }}" alt="{{ fig.name }}"><figcaption>{{ fig.name }}</figcaption></figure>{% endfor %}
"""


def _pm(mean: Any, sd: Any) -> str:
    """'mean ± sd' (just the mean when there is no SD)."""
    return fv(mean) if sd is None else f"{fv(mean)} ± {fv(sd)}"


def _i(values: Any, i: int) -> Any:
    return values[i] if isinstance(values, list) and i < len(values) else None


def _rows(r: dict[str, Any]) -> list[list[str]]:
    load, co = r["load"], r.get("coactivation")
    tok, lab = r.get("token_specialisation"), r.get("label_specialisation")
    rows = []
    for i, layer in enumerate(r["moe_layers"]):
        c = _i(co["per_layer"], i) if co else None
        rows.append([
            str(layer), fv(_i(r.get("n_tokens"), i)),
            f"{fv(_i(load['entropy_bits'], i))} / {fv(load['entropy_max_bits'])}",
            f"{fv(_i(load['kl_uniform_bits'], i))} ({fv(_i(load['kl_uniform_chance_bits'], i))})",
            fv(_i(load["n_dead"], i)), fv(_i(load["n_rare"], i)),
            f"{fv(_i(load['max_share_over_fair'], i))} / {fv(_i(load['min_share_over_fair'], i))}",
            f"{fv(c['dispersion'])} ({_pm(c['dispersion_chance'], c.get('dispersion_chance_sd'))})" if c else "n/a",
            f"{fv(_i(tok['token_purity'], i))} ({fv(_i(tok['token_purity_chance'], i))})" if tok else "n/a",
            f"{fv(_i(lab['mi_bits'], i))} ({fv(_i(lab.get('mi_permutation_p95_bits'), i))}) [{fv(_i(lab.get('mi_p_value'), i))}]"
            if lab else "n/a"])
    return rows


def _token_rows(r: dict[str, Any], index: int, experts: int = 8, per_expert: int = 5) -> list[list[str]]:
    tok = r.get("token_specialisation")
    if not tok or index >= len(tok["experts"]):
        return []
    by_expert = tok["experts"][index]
    ranked = sorted(by_expert.items(), key=lambda kv: -(kv[1][0]["lift"] if kv[1] else 0))[:experts]
    rows = []
    for expert, entries in ranked:
        shown = ", ".join(f"{e['token'] if e.get('token') is not None else '#' + str(e['token_id'])!r} "
                          f"({fv(e['lift'])}, {fv(e['p_value'])})" for e in entries[:per_expert])
        rows.append([str(expert), shown])
    return rows


def _label_rows(r: dict[str, Any]) -> tuple[Any, list[list[str]]]:
    lab = r.get("label_specialisation")
    if not lab or not lab.get("mi_bits"):
        return None, []
    best = max(range(len(lab["mi_bits"])), key=lambda i: lab["mi_bits"][i])
    rows = [[name, ", ".join(f"{e} ({fv(l)})" for e, l in experts)] for name, experts in lab["top_experts"][best].items()]
    return r["moe_layers"][best], rows


def _summary(r: dict[str, Any]) -> str:
    load = r["load"]
    norm = [x for x in load.get("normalised_entropy") or [] if x is not None]
    parts = [f"Over {len(r['moe_layers'])} MoE layers (E={r['n_experts']}, top-{r['top_k']}), the load entropy is "
             f"{fv(min(norm) if norm else None)}–{fv(max(norm) if norm else None)} of its maximum; "
             f"{sum(load['n_dead'])} dead and {sum(load['n_rare'])} rare expert slots in all."]
    co = r.get("coactivation")
    if co:
        disp = [(c["dispersion"], i) for i, c in enumerate(co["per_layer"]) if c["dispersion"] is not None]
        if disp:
            d, i = max(disp)
            c = co["per_layer"][i]
            chance, sd = c["dispersion_chance"], c.get("dispersion_chance_sd")
            beyond = c.get("beyond_chance", chance is not None and d > chance + 3 * (sd or 0.1 * chance))
            where = f"layer {r['moe_layers'][i]} (dispersion {fv(d)}, chance {_pm(chance, sd)})"
            parts.append(f"Expert pairs deviate most from random pairing under this router's selection rule at {where}."
                         if beyond else f"Expert pairs do not deviate clearly from random pairing under this router's "
                         f"selection rule at any layer (largest: {where}).")
    tok = r.get("token_specialisation")
    if tok and tok.get("token_purity"):
        excess = [p - c for p, c in zip(tok["token_purity"], tok["token_purity_chance"])]
        i = max(range(len(excess)), key=lambda j: excess[j])
        if excess[i] > 0.05:
            parts.append(f"Routing follows the token id most at layer {r['moe_layers'][i]} (token purity "
                         f"{fv(tok['token_purity'][i])} vs {fv(tok['token_purity_chance'][i])} by chance).")
        else:
            parts.append("At no layer does routing follow the token id clearly more than chance "
                         f"(largest token-purity excess {excess[i]:+.3f}).")
    lab = r.get("label_specialisation")
    if lab and lab.get("mi_p_value") is not None:
        ps = lab.get("mi_p_value_holm") or lab["mi_p_value"]
        sig = [r["moe_layers"][i] for i, p in enumerate(ps) if p is not None and p <= 0.05]
        held = "Holm-adjusted p ≤ 0.05" if lab.get("mi_p_value_holm") is not None else "p ≤ 0.05"
        parts.append(f"The label {lab['label']!r} changes expert choice beyond label shuffles ({held}) at "
                     f"{len(sig)} of {len(lab['mi_p_value'])} layers" + (f" ({', '.join(map(str, sig))})." if sig else "."))
    return " ".join(parts)


def render(results: dict[str, Any], out_dir: Path, env: Any) -> Section:
    """The stats section: per-layer table against chance, top pairs, transitions, tokens, labels, weights, phases."""
    r = results
    layers = r["moe_layers"]
    focus = r.get("focus_layer", layers[len(layers) // 2])
    fi = layers.index(focus) if focus in layers else 0
    co = r.get("coactivation")
    pairs = [[f"{p[0]} + {p[1]}", fv(p[2]), fv(p[3]), fv(p[4]), _pm(p[5] if len(p) > 5 else None, p[6] if len(p) > 6 else None)]
             for p in (co["per_layer"][fi]["top_pairs"] if co else [])[:8]]
    pair_p = co["per_layer"][fi].get("max_ratio_p_value") if co else None
    trans = [[f"{t['from_layer']} → {t['to_layer']}", fv(t["n_tokens"]), f"{fv(t['mi_bits'])} ({fv(t['mi_chance_bits'])})",
              fv(t["max_lift"]),
              f"{t['top_transitions'][0][0]} → {t['top_transitions'][0][1]} ({fv(t['top_transitions'][0][3])})"
              if t["top_transitions"] else "n/a"] for t in ((r.get("transitions") or {}).get("per_pair") or [])]
    w = r.get("weights")
    weights = [[str(layer), " / ".join(fv(x) for x in w["mean_by_rank"][i]), fv(w["sum_mean"][i])]
               for i, layer in enumerate(layers)] if w else []
    ph = r.get("phases")
    phases = [[str(layer), f"{fv(ph['prompt']['n_tokens'][i])} / {fv(ph['generated']['n_tokens'][i])}",
               f"{fv(ph['prompt']['normalised_entropy'][i])}, {fv(ph['generated']['normalised_entropy'][i])}",
               f"{ph['prompt']['n_dead'][i]}, {ph['generated']['n_dead'][i]}",
               f"{fv(ph['js_bits'][i])} ({fv(ph['js_chance_bits'][i])})"] for i, layer in enumerate(layers)] if ph else []
    label_layer, labels = _label_rows(r)
    figures = embedded_figures(r, out_dir)
    html = env.from_string(TEMPLATE).render(
        notes=r.get("notes") or [], k=r["top_k"], e=r["n_experts"], hmax=fv(r["load"]["entropy_max_bits"]),
        rare_pct=f"{r['load']['rare_fraction']:.0%}",
        disp_chance=fv((co["per_layer"][0]["dispersion_chance"] if co and co["per_layer"] else 1.0)),
        router=r.get("router") or "not recorded", rule=(co or {}).get("null", "any pair allowed"), pair_p=fv(pair_p),
        rows=_rows(r), focus=focus, pairs=pairs, transitions=trans, tokens=_token_rows(r, fi),
        min_count=(r.get("token_specialisation") or {}).get("min_count"), labels=labels, label_layer=label_layer,
        weights=weights, uniform_w=fv((w or {}).get("uniform_weight", 1 / r["top_k"])),
        w_max=(w or {}).get("weight_max", 1.0), phases=phases, figures=figures)
    return Section(key="stats", title="Routing statistics", summary=_summary(r), html=html)
