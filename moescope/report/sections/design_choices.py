"""Report section of `moescope experiment design-choices`: perplexity per variant next to the
unigram baseline, expert specialisation (NMI) next to permutation chance, load balance."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from moescope.report.sections import Section, embedded_figures
from moescope.report.sections.generic import format_value as fv

TEMPLATE = """\
<p class="baseline-note">Baselines: perplexity next to a unigram model of the same validation tokens (no
context at all: {{ unigram }}); every NMI next to its permutation chance (mean over {{ shuffles }} label
shuffles); load next to the fair share (busiest expert ÷ 1/E = 1 when balanced).</p>
<table class="values">
<thead><tr><th>variant</th><th>seeds</th><th>mean ppl (± sd)</th><th>domain NMI (chance) [vocabulary-only router]</th>
<th>token-type NMI (chance) [within-sequence chance]</th><th>token-id NMI corrected (raw)</th>
<th>busiest expert ÷ fair</th><th>dead experts</th><th>experts follow</th></tr></thead>
<tbody>{% for r in rows %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody>
</table>
<ul class="muted">
<li><b>NMI</b>: normalised mutual information between the expert chosen (each of a token's k choices counts)
and a label of the token, I / mean(H(label), H(expert)), averaged over the MoE layers; 0 = independent, 1 = each
determines the other. <b>Domain</b> labels are shuffled between whole sequences (a sequence-level router makes one
choice per sequence); <b>token types</b> ({{ types }}) across all tokens, and within each sequence for the stricter
chance in square brackets (what the sequence's domain and token mix already explain).
<b>Token id</b> NMI is biased upward by its thousands of classes: the shuffled-label mean is subtracted.
The <b>vocabulary-only router</b> sends each token to the experts its token id gets most often in the other half of the
sequences: its domain NMI is what the domains' different vocabularies explain.</li>
<li><b>Experts follow</b> (ours): the label whose NMI rises more above its control, among those beyond chance
(p ≤ 0.05 for the layer mean): token types must beat both shuffles and are scored above the within-sequence chance;
domains must beat the between-sequence shuffles and the vocabulary-only router and are scored above it; else "neither".</li>
<li>Load: the training window before the last evaluation, mean over layers; dead experts summed over layers.</li>
</ul>
<h4>Validation perplexity per domain</h4>
<table class="values"><thead><tr><th>variant</th>{% for d in domains %}<th>{{ d }}</th>{% endfor %}</tr></thead>
<tbody>{% for r in domain_rows %}<tr>{% for cell in r %}<td class="num">{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody>
</table>
{% for fig in figures %}<figure><img src="{{ fig.uri }}" alt="{{ fig.name }}"><figcaption>{{ fig.name }}</figcaption></figure>{% endfor %}
{% if profiles %}<details><summary>What each expert receives most (lift over its overall share; 1 = chance), at each
variant's layer of largest token-type or domain NMI above chance</summary>
{% for p in profiles %}<h4>{{ p.name }}, layer {{ p.layer }}</h4>
<table class="values"><thead><tr><th>expert</th><th>token types</th><th>domains</th></tr></thead>
<tbody>{% for r in p.rows %}<tr>{% for cell in r %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{% endfor %}</details>{% endif %}
"""


def _n(value: Any) -> str:
    """An NMI (0..1) to 4 decimals: the chance levels are often below 0.001."""
    return "n/a" if value is None else f"{0.0 if abs(value) < 5e-5 else value:.4f}"  # no "-0.0000"


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _by_cell(variants: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for v in variants:
        groups[f"{v['routing']}-top{v['top_k']}-{v['router']}"].append(v)
    return groups


def _rows(r: dict[str, Any]) -> list[list[str]]:
    groups = _by_cell(r["variants"])
    rows = []
    for c in r["cells"]:
        vs = groups.get(c["name"], [])
        load = _mean([_mean(v["load"]["max_over_fair"]) for v in vs])
        dead = _mean([float(sum(v["load"]["dead"])) for v in vs])
        within = _mean([v["token_type_nmi_within_sequence"]["mean"]["chance"] for v in vs])
        sd = f" ± {fv(c['mean_ppl_sd'])}" if c.get("mean_ppl_sd") is not None else ""
        rows.append([c["name"], fv(len(c["seeds"])), f"{fv(c['mean_ppl'])}{sd}",
                     f"{_n(c['domain_nmi'])} ({_n(c['domain_nmi_chance'])}) [{_n(c.get('domain_nmi_vocabulary_control'))}]",
                     f"{_n(c['token_type_nmi'])} ({_n(c['token_type_nmi_chance'])}) [{_n(within)}]",
                     f"{_n(c['token_id_nmi_excess'])} ({_n(c['token_id_nmi'])})", fv(load), fv(dead),
                     c["specialises_by"]])
    return rows


def _domain_rows(r: dict[str, Any], domains: list[str]) -> list[list[str]]:
    groups = _by_cell(r["variants"])
    rows = [[name] + [fv(_mean([v["domains"][d]["ppl"] for v in vs if d in v["domains"]])) for d in domains]
            for name, vs in groups.items()]
    first = r["variants"][0]["domains"]
    rows.append(["unigram baseline"] + [fv(first[d]["unigram_ppl"]) if d in first else "n/a" for d in domains])
    return rows


def _profiles(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for v in r["variants"]:
        if not v.get("experts"):
            continue
        excess = [max(t["excess"], d["excess"]) for t, d in zip(v["token_type_nmi"]["layers"], v["domain_nmi"]["layers"])]
        i = max(range(len(excess)), key=lambda j: excess[j])
        prof = v["experts"][i]
        rows = [[str(e), ", ".join(f"{name} ({fv(lift)})" for name, lift in tt),
                 ", ".join(f"{name} ({fv(lift)})" for name, lift in dom)]
                for e, (tt, dom) in enumerate(zip(prof["token_type"], prof["domain"]))]
        out.append({"name": v["name"], "layer": v["moe_layers"][i], "rows": rows})
    return out


def _summary(r: dict[str, Any]) -> str:
    cells, f = r["cells"], r["findings"]
    best = min(cells, key=lambda c: c["mean_ppl"])
    tokens = r["variants"][0]["tokens"]
    parts = [f"{r['n_variants']} variants trained on {tokens:,} tokens each. Lowest validation perplexity: "
             f"{best['name']} ({fv(best['mean_ppl'])}; unigram baseline {fv(r['unigram_mean_ppl'])})."]
    if f.get("frozen_vs_learned"):
        ratios = [x["ratio"] for x in f["frozen_vs_learned"]]
        parts.append(f"A frozen random router's perplexity is {fv(f['frozen_vs_learned_mean_ratio'])}× the learned "
                     f"router's on average (range {fv(min(ratios))}–{fv(max(ratios))}; 1 = as good).")
        spread = [x for x in f["frozen_vs_learned"] + f.get("top1_vs_top2", []) if x.get("ratio_sd") is not None]
        if spread:
            parts.append("Same-seed ratios, mean ± SD over seeds: " + "; ".join(
                (f"frozen/learned {x['routing']} top-{x['top_k']}" if "top_k" in x else f"top-1/top-2 {x['routing']} "
                 f"{x['router']}") + f" {fv(x['ratio'])} ± {fv(x['ratio_sd'])} (n={x['ratio_n']})" for x in spread) + ".")
    for routing, e in f.get("by_routing", {}).items():
        v = e["verdicts"]
        parts.append(f"{routing.capitalize()}-level routing: experts follow token types in {v['token types']}, "
                     f"domains in {v['domains']}, neither in {v['neither']} of {sum(v.values())} cells (NMI above "
                     f"chance: token type {_n(e['token_type_nmi_excess'])}, of which "
                     f"{_n(e['token_type_nmi_within_sequence_excess'])} beyond what each sequence's token mix explains; "
                     f"domain {_n(e['domain_nmi_excess'])}).")
    return " ".join(parts)


def render(results: dict[str, Any], out_dir: Path, env: Any) -> Section:
    """The design-choices section: variant table against baselines, per-domain perplexity, figures, expert profiles."""
    r = results
    domains = list(r.get("domains") or sorted(r["variants"][0]["domains"]))
    figures = embedded_figures(r, out_dir)
    from moescope.analysis.specialisation import TOKEN_TYPES

    html = env.from_string(TEMPLATE).render(
        unigram=fv(r["unigram_mean_ppl"]), shuffles=(r.get("params") or {}).get("measurement", {}).get("shuffles", "?"),
        rows=_rows(r), types=", ".join(TOKEN_TYPES), domains=domains, domain_rows=_domain_rows(r, domains),
        figures=figures, profiles=_profiles(r))
    return Section(key="design-choices", title="Design choices (routing level, top-k, router)", summary=_summary(r),
                   html=html)
