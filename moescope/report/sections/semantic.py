"""Report section of the semantic routing analysis (moescope.analysis.semantic)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moescope.report.sections import Section, figure_data_uri

FIGURES = (
    ("semantic_sense_pairs", "Left: mean kappa at the target word per MoE layer for same-sense and different-sense "
     "pairs (means over lemmas), unrelated words (the overlap expert load alone gives) and chance (0); bands: 95% "
     "bootstrap CIs resampling lemmas. "
     "Right: the same - different gap over all pairs, within pairs whose target token ids are identical and "
     "within the others; stars: Holm-adjusted p < 0.05."),
    ("semantic_substitution", "Mean kappa between the original word and a good substitute or a control word in "
     "the same sentence, per MoE layer; bands: 95% bootstrap CIs."),
)

TEMPLATE = """\
<p class="baseline-note">kappa = (o − e) / (1 − e) with o = |S<sub>a</sub> ∩ S<sub>b</sub>| / k the share of the
target's top-{{ k }} experts two contexts have in common and e = k / E = {{ chance }} its value for two independent
uniform draws, so 0 is chance and 1 identical expert sets ({{ subword }} subword of multi-token words). Baselines:
chance, unrelated words (a target against another pair's target) and, for the token-identity control, pairs whose
target token ids are identical, because identical tokens route alike whatever they mean.</p>
{% if wic %}<h3>Same vs different sense</h3>
<table class="values">
<thead><tr><th>MoE layer</th><th>same sense</th><th>different sense</th><th>unrelated</th><th>gap [95% CI]</th>
<th>p</th><th>Holm p</th><th>rank-biserial</th><th>gap, identical token ids [95% CI]</th><th>p</th></tr></thead>
<tbody>
{% for r in wic %}<tr><th scope="row">{{ r.layer }}</th><td class="num">{{ r.same }}</td><td class="num">{{ r.diff }}</td>
<td class="num">{{ r.unrelated }}</td><td class="num">{{ r.gap }}</td><td class="num">{{ r.p }}</td>
<td class="num">{{ r.p_holm }}</td><td class="num">{{ r.effect }}</td><td class="num">{{ r.id_gap }}</td><td class="num">{{ r.id_p }}</td></tr>
{% endfor %}</tbody></table>
<p class="note">{{ n_same }} same-sense and {{ n_diff }} different-sense pairs ({{ wic_source }}); {{ n_id_same }} and
{{ n_id_diff }} of them have identical target token ids. The design is paired by lemma: same and different are the
means over the {{ n_lemmas }} lemmas with pairs of both labels of each lemma's mean kappa; p: Wilcoxon signed-rank
on the per-lemma gaps, two-sided; Holm: adjusted across the {{ n_layers }} layers; CIs: bootstrap resampling
lemmas.</p>{% endif %}
{% if control %}<h3>Trained model minus its randomly initialised copies</h3>
<table class="values">
<thead><tr><th>MoE layer</th><th>gap, this model</th><th>gap, random init (mean of {{ n_seeds }} seeds)</th>
<th>difference of gaps [95% CI]</th><th>p</th><th>Holm p</th></tr></thead>
<tbody>
{% for r in control %}<tr><th scope="row">{{ r.layer }}</th><td class="num">{{ r.gap }}</td><td class="num">{{ r.random }}</td>
<td class="num">{{ r.diff }}</td><td class="num">{{ r.p }}</td><td class="num">{{ r.p_holm }}</td></tr>
{% endfor %}</tbody></table>
<p class="note">The same probe sentences through randomly initialised copies of the model (seeds {{ seeds }}): what
the probe design gives without training. Per lemma ({{ n_control }} lemmas), the trained gap minus the mean of the
copies' gaps; Wilcoxon signed-rank, bootstrap over lemmas, Holm across layers.</p>{% endif %}
{% if sub %}<h3>Substitution</h3>
<table class="values">
<thead><tr><th>MoE layer</th><th>good substitute</th><th>control</th><th>gap [95% CI]</th><th>p</th><th>Holm p</th>
<th>rank-biserial</th></tr></thead>
<tbody>
{% for r in sub %}<tr><th scope="row">{{ r.layer }}</th><td class="num">{{ r.sub }}</td><td class="num">{{ r.ctrl }}</td>
<td class="num">{{ r.gap }}</td><td class="num">{{ r.p }}</td><td class="num">{{ r.p_holm }}</td><td class="num">{{ r.effect }}</td></tr>
{% endfor %}</tbody></table>
<p class="note">{{ n_items }} items ({{ sub_source }}): kappa of the original word with a good substitute vs with
a control in the same sentence, averaged per item. p: Wilcoxon signed-rank on the per-item differences, two-sided;
Holm: adjusted across the {{ n_layers }} layers.</p>{% endif %}
{% if unaligned %}<p class="note warn">{{ unaligned }} context(s) had no target token (cut off by the context length?)
and were left out.</p>{% endif %}
{% for fig in figures %}<figure><img src="{{ fig.uri }}" alt="{{ fig.name }}"><figcaption>{{ fig.caption }}</figcaption></figure>
{% endfor %}
"""


def _f(x: Any, spec: str = "+.3f") -> str:
    return "n/a" if x is None else format(float(x), spec)


def _p(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.2g}"


def _ci(r: dict[str, Any], stem: str, i: int) -> str:
    return f"{_f(r[stem][i])} [{_f(r[stem + '_ci_low'][i], '+.2f')}, {_f(r[stem + '_ci_high'][i], '+.2f')}]"


def render(results: dict[str, Any], out_dir: Path, env: Any) -> Section:
    """The semantic section: per-layer tables (sense pairs with the token-identity control, substitution), figures."""
    r = results
    layers = r["layers"]
    wic = [{"layer": layer, "same": _f(r["same_sense_kappa"][i]), "diff": _f(r["different_sense_kappa"][i]),
            "unrelated": _f((r.get("unrelated_kappa") or [None] * len(layers))[i]), "gap": _ci(r, "difference", i),
            "p": _p(r["p_value"][i]), "p_holm": _p(r["p_value_holm"][i]), "effect": _f(r["effect_size"][i], "+.2f"),
            "id_gap": _ci(r, "identical_tokens_difference", i), "id_p": _p(r["identical_tokens_p_value"][i])}
           for i, layer in enumerate(layers)] if "same_sense_kappa" in r else []
    sub = [{"layer": layer, "sub": _f(r["substitute_kappa"][i]), "ctrl": _f(r["control_kappa"][i]),
            "gap": _ci(r, "substitution_difference", i), "p": _p(r["substitution_p_value"][i]),
            "p_holm": _p(r["substitution_p_value_holm"][i]), "effect": _f(r["substitution_effect_size"][i], "+.2f")}
           for i, layer in enumerate(layers)] if "substitute_kappa" in r else []
    control = [{"layer": layer, "gap": _f(r["difference"][i]), "random": _f(r["random_init_difference"][i]),
                "diff": _ci(r, "trained_minus_random_difference", i),
                "p": _p(r["trained_minus_random_p_value"][i]), "p_holm": _p(r["trained_minus_random_p_value_holm"][i])}
               for i, layer in enumerate(layers)] if "trained_minus_random_difference" in r else []
    figures = []
    for name, caption in FIGURES:
        path = Path(out_dir) / "figures" / f"{name}.png"
        if path.is_file():
            figures.append({"name": name, "caption": caption, "uri": figure_data_uri(path)})
    sources = r.get("probe_sources") or {}
    html = env.from_string(TEMPLATE).render(
        k=r["top_k"], chance=_f(r["chance_overlap"], ".4g"), subword=r.get("subword", "first"), wic=wic, sub=sub,
        n_same=r.get("n_pairs_same"), n_diff=r.get("n_pairs_different"),
        n_id_same=r.get("identical_tokens_n_pairs_same"), n_id_diff=r.get("identical_tokens_n_pairs_different"),
        wic_source=", ".join(sources.get("sense_pairs") or ["unknown source"]),
        sub_source=", ".join(sources.get("substitution") or ["unknown source"]),
        n_items=r.get("n_items"), n_layers=len(layers), unaligned=r.get("n_unaligned_contexts"), figures=figures,
        n_lemmas=r.get("n_lemmas"), control=control, n_seeds=len(r.get("random_init_seeds") or []),
        seeds=", ".join(str(x) for x in r.get("random_init_seeds") or []), n_control=r.get("n_lemmas_trained_vs_random"))
    return Section(key="semantic", title="Semantic routing: same word, same meaning, same experts?",
                   summary=_summary(r), html=html)


def _best(r: dict[str, Any], key: str) -> int | None:
    values = np.array([np.nan if v is None else v for v in r.get(key) or []], float)
    return None if not np.isfinite(values).any() else int(np.nanargmax(values))


def _summary(r: dict[str, Any]) -> str:
    parts = []
    layers = r["layers"]
    i = _best(r, "difference")
    if i is not None:
        n_sig = sum(p is not None and p < 0.05 for p in r["p_value_holm"])
        parts.append(
            f"Same- and different-sense pairs of the same lemma differ in how many of the target's experts they "
            f"share in {n_sig} of {len(layers)} MoE layers (Holm p < 0.05, paired by lemma). The same − different gap is largest at layer {layers[i]}: "
            f"{_ci(r, 'difference', i)} kappa (same {_f(r['same_sense_kappa'][i])}, different "
            f"{_f(r['different_sense_kappa'][i])}, chance 0, unrelated words "
            f"{_f((r.get('unrelated_kappa') or [None] * len(layers))[i])}); among pairs whose target token ids are "
            f"identical it is {_ci(r, 'identical_tokens_difference', i)}."
        )
    j = _best(r, "substitution_difference")
    if j is not None:
        parts.append(
            f"The good substitute − control gap in overlap with the original word is largest at layer "
            f"{layers[j]}: {_ci(r, 'substitution_difference', j)} kappa (Holm p = "
            f"{_p(r['substitution_p_value_holm'][j])})."
        )
    if "trained_minus_random_p_value_holm" in r:
        n_sig = sum(p is not None and p < 0.05 for p in r["trained_minus_random_p_value_holm"])
        parts.append(f"Against {len(r['random_init_seeds'])} randomly initialised copies on the same probes, the "
                     f"trained model's same − different gap is larger in {n_sig} of {len(layers)} layers "
                     f"(Holm p < 0.05, paired by lemma).")
    return " ".join(parts) or "No sense pairs or substitution items could be analysed."
