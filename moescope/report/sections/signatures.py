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
{{ design }} Chance: {{ chance }} (always the most common label; uniform guessing {{ uniform }}).</p>
<table class="values">
<thead><tr><th>measure</th><th>value</th><th>baseline</th><th>what it means</th></tr></thead>
<tbody>{% for r in rows %}<tr><th scope="row">{{ r[0] }}</th><td class="num">{{ r[1] }}</td>
<td class="num">{{ r[2] }}</td><td>{{ r[3] }}</td></tr>{% endfor %}</tbody>
</table>
<h4>Per MoE layer</h4>
<table class="values"><thead><tr><th>MoE layer</th>{% for l in layers %}<th>{{ l }}</th>{% endfor %}</tr></thead>
<tbody><tr><th scope="row">CV accuracy</th>{% for a in per_layer %}<td class="num">{{ a }}</td>{% endfor %}</tr>
<tr><th scope="row">95% CI</th>{% for a in layer_ci %}<td class="num">{{ a }}</td>{% endfor %}</tr>
<tr><th scope="row">permutation p, Holm across layers</th>{% for a in layer_p %}<td class="num">{{ a }}</td>{% endfor %}</tr>
{% if layer_ctrl %}<tr><th scope="row">token-id control</th>{% for a in layer_ctrl %}<td class="num">{{ a }}</td>{% endfor %}</tr>{% endif %}
<tr><th scope="row">cosine within − across</th>{% for a in gaps %}<td class="num">{{ a }}</td>{% endfor %}</tr></tbody></table>
{% if best %}<p>{{ best }}</p>{% endif %}
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


def _ci(r: dict[str, Any], prefix: str) -> str:
    """'0.912 [0.871, 0.953]' from prefix_mean (or prefix) and prefix_ci_low/high."""
    mean = r.get(f"{prefix}_mean", r.get(prefix))
    lo, hi = r.get(f"{prefix}_ci_low"), r.get(f"{prefix}_ci_high")
    if lo is None or hi is None:
        return fv(mean)
    return f"{fv(mean)} [{fv(lo)}, {fv(hi)}]"


def _adds(r: dict[str, Any], name: str) -> str:
    """'signature adds +0.120 [+0.05, +0.19], p = 0.002' (paired, same folds)."""
    d = r.get(name)
    if d is None:
        return "n/a"
    lo, hi, p = r.get(f"{name}_ci_low"), r.get(f"{name}_ci_high"), r.get(f"{name}_p_value")
    text = f"signature adds {d:+.3f}"
    if lo is not None and hi is not None:
        text += f" [{lo:+.3f}, {hi:+.3f}]"
    return text + (f", p = {fv(p)}" if p is not None else "")


def _p_text(r: dict[str, Any]) -> str:
    return r.get("permutation_p_value_text") or f"p = {fv(r.get('permutation_p_value'))}"


def _design(r: dict[str, Any]) -> str:
    repeats = r.get("cv_repeats") or 1
    grouped = (f"grouped by the field '{r['group_field']}' ({r.get('n_groups')} groups: a group is never split "
               "between train and test)") if r.get("group_field") else "not grouped (each sequence on its own)"
    return (f"Ridge classifier with its penalty tuned inside every training fold; {repeats} × {r.get('folds')}-fold "
            f"stratified cross-validation, {grouped}; 95% CIs from the corrected resampled t over all folds.")


def _rows(r: dict[str, Any]) -> list[list[str]]:
    rows = [
        ["cosine within labels", _pm(r["within_cosine_mean"], r["within_cosine_sd"]),
         f"across labels {_pm(r['across_cosine_mean'], r['across_cosine_sd'])}",
         "How alike two sequences' signatures are when they share a label, against when they do not."],
        ["Cohen's d", fv(r["cohens_d"]), f"load-balanced control {fv(r.get('load_balanced_cohens_d'))}",
         "The within/across gap in pooled standard deviations; about 0 when signatures carry no label."],
        ["CV accuracy", _ci(r, "cv_accuracy"), f"chance {fv(r['chance_accuracy'])}",
         "Share of held-out sequences whose label the signature predicts (mean over repeats, 95% CI)."],
        ["macro-F1", fv(r["macro_f1"]), "", "Accuracy's counterpart that weighs every label equally."],
    ]
    if r.get("permutation_accuracy_mean") is not None:
        rows.append(["label permutation", _pm(r["permutation_accuracy_mean"], r.get("permutation_accuracy_sd")),
                     _p_text(r),
                     f"The identical procedure on {len(r.get('permutation_accuracies') or [])} label shuffles (whole groups "
                     "shuffled within each test fold); p = (1 + shuffles doing at least as well) / (1 + shuffles), "
                     "so its floor is 1/(shuffles+1)."])
    if r.get("load_balanced_accuracy_mean") is not None:
        rows.append(["load-balancing control", _pm(r["load_balanced_accuracy_mean"], r.get("load_balanced_accuracy_sd")),
                     "chance if loads alone explain nothing",
                     "Each expert keeps its total use per layer, but which sequences get it is re-drawn at random."])
    if r.get("bag_of_tokens_accuracy_mean") is not None:
        rows.append(["bag of token ids", _ci(r, "bag_of_tokens_accuracy"), _adds(r, "adds_over_bag_of_tokens"),
                     "The same classifier, tuned the same way, on which tokens a sequence contains (tf-idf fitted on "
                     "the training fold), with no routing at all. The difference is paired on the same folds."])
        unseen = r.get("token_id_control_unseen_token_share")
        rows.append(["token-id routing control", _ci(r, "token_id_control_accuracy"), _adds(r, "adds_over_token_id_control"),
                     "Signatures rebuilt as if every token went to the experts its token id gets most often in the "
                     "training fold (a control, not an upper bound); token ids unseen in the training fold get the "
                     f"layer's expert frequencies ({fv(unseen)} of test tokens)."])
    return rows


def _summary(r: dict[str, Any]) -> str:
    text = (f"Routing signatures predict the {r['label']!r} label of held-out sequences with accuracy "
            f"{_ci(r, 'cv_accuracy')} against chance {fv(r['chance_accuracy'])}")
    if r.get("permutation_accuracy_mean") is not None:
        text += f" and {fv(r['permutation_accuracy_mean'])} on shuffled labels ({_p_text(r)})"
    text += "."
    if r.get("token_id_control_accuracy_mean") is not None:
        text += (f" Token identity alone reaches {fv(r['token_id_control_accuracy_mean'])} (token-id routing control) and "
                 f"{fv(r['bag_of_tokens_accuracy_mean'])} (bag of token ids). Against the token-id control the "
                 f"{_adds(r, 'adds_over_token_id_control')}; against the bag of token ids the "
                 f"{_adds(r, 'adds_over_bag_of_tokens')} (paired differences on the same folds).")
    text += " " + _best(r) if _best(r) else ""
    return text


def _best(r: dict[str, Any]) -> str:
    layers, acc = r.get("moe_layers") or [], r.get("per_layer_accuracy") or []
    if not acc or r.get("best_layer") is None:
        return ""
    i = layers.index(r["best_layer"]) if r["best_layer"] in layers else max(range(len(acc)), key=lambda j: acc[j])
    text = f"The most separable single layer is {layers[i]} ({fv(acc[i])})"
    if r.get("best_layer_stability") is not None:
        text += f", best in {100 * r['best_layer_stability']:.0f}% of the CV repeats"
    return text + "."


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
        phase=r.get("phase", "prompt"), design=_design(r), chance=fv(r.get("chance_accuracy")),
        uniform=fv(r.get("uniform_chance_accuracy")), rows=_rows(r), best=_best(r),
        layer_ci=[f"{fv(lo)}–{fv(hi)}" for lo, hi in zip(r.get("per_layer_accuracy_ci_low") or [],
                                                       r.get("per_layer_accuracy_ci_high") or [])],
        layer_p=[fv(p) for p in r.get("per_layer_p_value_holm") or []],
        layer_ctrl=[fv(a) for a in r.get("per_layer_token_id_control_accuracy") or []],
        layers=r.get("moe_layers") or [], per_layer=[fv(a) for a in r.get("per_layer_accuracy") or []],
        gaps=[fv(g) for g in r.get("per_layer_cosine_gap") or []], first_n=first_n,
        first_acc=[fv(a) for a in r.get("first_n_accuracy") or []], labels=labels,
        confusion=[(name, [fv(c) for c in row]) for name, row in confusion], figures=figures)
    source = Path(str(r.get("trace") or "")).name
    title = f"Routing signatures by {r['label']}" + (f" ({source})" if source else "")
    return Section(key="signatures", title=title, summary=_summary(r), html=html)
