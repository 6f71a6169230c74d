"""Report section of `moescope analyze signatures`: do routing signatures tell labels apart,
and by more than chance, load balance and token identity?"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moescope.report.sections import Section, embedded_figures
from moescope.report.sections.generic import format_value as fv

TEMPLATE = """\
{% for note in notes %}<p class="note warn">{{ note }}</p>{% endfor %}
<p class="baseline-note">{{ n }} sequences, labels from the field <code>{{ label }}</code>
({% for name, count in per_label %}{{ name }}: {{ count }}{{ ", " if not loop.last }}{% endfor %}); {{ phase }} tokens;
logistic regression, {{ folds }}-fold stratified cross-validation. Chance (always the most common label): {{ chance }}.</p>
<table class="values">
<thead><tr><th>measure</th><th>value</th><th>baseline</th><th>what it means</th></tr></thead>
<tbody>{% for r in rows %}<tr><th scope="row">{{ r[0] }}</th><td class="num">{{ r[1] }}</td>
<td class="num">{{ r[2] }}</td><td>{{ r[3] }}</td></tr>{% endfor %}</tbody>
</table>
<h4>Per MoE layer</h4>
<table class="values"><thead><tr><th>MoE layer</th>{% for l in layers %}<th>{{ l }}</th>{% endfor %}</tr></thead>
<tbody><tr><th scope="row">CV accuracy</th>{% for a in per_layer %}<td class="num">{{ a }}</td>{% endfor %}</tr>
<tr><th scope="row">cosine within − across</th>{% for a in gaps %}<td class="num">{{ a }}</td>{% endfor %}</tr></tbody></table>
<h4>Tokens seen</h4>
<table class="values"><thead><tr><th>first n tokens</th>{% for n in first_n %}<th>{{ n }}</th>{% endfor %}</tr></thead>
<tbody><tr><th scope="row">CV accuracy</th>{% for a in first_acc %}<td class="num">{{ a }}</td>{% endfor %}</tr></tbody></table>
{% if confusion %}<h4>Confusion matrix (out-of-fold; rows: true label)</h4>
<table class="values"><thead><tr><th></th>{% for name in labels %}<th>{{ name }}</th>{% endfor %}</tr></thead>
<tbody>{% for name, row in confusion %}<tr><th scope="row">{{ name }}</th>{% for c in row %}<td class="num">{{ c }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>{% endif %}
{% for fig in figures %}<figure><img src="{{ fig.uri }}" alt="{{ fig.name }}"><figcaption>{{ fig.name }}</figcaption></figure>{% endfor %}
"""


def _pm(mean: Any, sd: Any) -> str:
    return fv(mean) if sd is None else f"{fv(mean)} ± {fv(sd)}"


def _signed(value: Any) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _rows(r: dict[str, Any]) -> list[list[str]]:
    rows = [
        ["cosine within labels", _pm(r["within_cosine_mean"], r["within_cosine_sd"]),
         f"across labels {_pm(r['across_cosine_mean'], r['across_cosine_sd'])}",
         "How alike two sequences' signatures are when they share a label, against when they do not."],
        ["Cohen's d", fv(r["cohens_d"]), f"load-balanced control {fv(r.get('load_balanced_cohens_d'))}",
         "The within/across gap in pooled standard deviations; about 0 when signatures carry no label."],
        ["CV accuracy", _pm(r["cv_accuracy_mean"], r["cv_accuracy_sd"]), f"chance {fv(r['chance_accuracy'])}",
         "Share of held-out sequences whose label the signature predicts (mean ± sd over folds)."],
        ["macro-F1", fv(r["macro_f1"]), "", "Accuracy's counterpart that weighs every label equally."],
    ]
    if r.get("permutation_accuracy_mean") is not None:
        rows.append(["label permutation", _pm(r["permutation_accuracy_mean"], r.get("permutation_accuracy_sd")),
                     f"p = {fv(r['permutation_p_value'])}",
                     f"The same classifier on {len(r.get('permutation_accuracies') or [])} label shuffles; p is the share "
                     "of shuffles doing at least as well as the real labels (smallest possible 1/(shuffles+1))."])
    if r.get("load_balanced_accuracy_mean") is not None:
        rows.append(["load-balancing control", _pm(r["load_balanced_accuracy_mean"], r.get("load_balanced_accuracy_sd")),
                     "chance if loads alone explain nothing",
                     "Each expert keeps its total use per layer, but which sequences get it is re-drawn at random."])
    if r.get("bag_of_tokens_accuracy_mean") is not None:
        rows.append(["bag of token ids", _pm(r["bag_of_tokens_accuracy_mean"], r.get("bag_of_tokens_accuracy_sd")),
                     f"signature adds {_signed(r.get('adds_over_bag_of_tokens'))}",
                     "The same classifier on which tokens a sequence contains (tf-idf), with no routing at all."])
        rows.append(["token-id routing control",
                     _pm(r["token_id_control_accuracy_mean"], r.get("token_id_control_accuracy_sd")),
                     f"signature adds {_signed(r.get('adds_over_token_id_control'))}",
                     "Signatures rebuilt as if every token went to its token id's usual experts: what routing by "
                     "token identity alone would give."])
    return rows


def _summary(r: dict[str, Any]) -> str:
    text = (f"Routing signatures predict the {r['label']!r} label of held-out sequences with accuracy "
            f"{_pm(r['cv_accuracy_mean'], r['cv_accuracy_sd'])} against chance {fv(r['chance_accuracy'])}")
    if r.get("permutation_accuracy_mean") is not None:
        text += f" and {fv(r['permutation_accuracy_mean'])} on shuffled labels (p = {fv(r['permutation_p_value'])})"
    text += "."
    if r.get("token_id_control_accuracy_mean") is not None:
        text += (f" Token identity alone reaches {fv(r['token_id_control_accuracy_mean'])} (token-id routing) and "
                 f"{fv(r['bag_of_tokens_accuracy_mean'])} (bag of token ids), so routing adds "
                 f"{_signed(r.get('adds_over_token_id_control'))} and {_signed(r.get('adds_over_bag_of_tokens'))}.")
    layers, acc = r.get("moe_layers") or [], r.get("per_layer_accuracy") or []
    if acc:
        best = max(range(len(acc)), key=lambda i: acc[i])
        text += f" The most separable single layer is {layers[best]} ({fv(acc[best])})."
    return text


def render(results: dict[str, Any], out_dir: Path, env: Any) -> Section:
    """The signatures section: headline numbers next to their baselines, per-layer and tokens-seen curves, figures."""
    r = results
    labels = [str(x) for x in r.get("labels") or []]
    confusion = list(zip(labels, r.get("confusion_matrix") or []))
    figures = embedded_figures(r, out_dir)
    n_tokens = r.get("first_n_tokens") or []
    first_n = [str(n) for n in n_tokens[:-1]] + (["all"] if n_tokens else [])
    html = env.from_string(TEMPLATE).render(
        notes=r.get("notes") or [], n=r["n_sequences"], label=r["label"], per_label=list(zip(labels, r.get("n_per_label") or [])),
        phase=r.get("phase", "prompt"), folds=r.get("folds"), chance=fv(r.get("chance_accuracy")), rows=_rows(r),
        layers=r.get("moe_layers") or [], per_layer=[fv(a) for a in r.get("per_layer_accuracy") or []],
        gaps=[fv(g) for g in r.get("per_layer_cosine_gap") or []], first_n=first_n,
        first_acc=[fv(a) for a in r.get("first_n_accuracy") or []], labels=labels,
        confusion=[(name, [fv(c) for c in row]) for name, row in confusion], figures=figures)
    source = Path(str(r.get("trace") or "")).name
    title = f"Routing signatures by {r['label']}" + (f" ({source})" if source else "")
    return Section(key="signatures", title=title, summary=_summary(r), html=html)
