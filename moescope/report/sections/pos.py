"""Report section of the POS analysis (moescope.analysis.pos): the probe next to its baselines."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moescope.report.sections import Section, figure_data_uri

FIGURES = (
    ("accuracy", "Routing-path probe against its baselines (cross-validated accuracy; bars: SD over folds)."),
    ("per_tag_f1", "Per-tag F1 of the probe and of the word-form baseline."),
    ("confusion", "Probe confusion matrix, rows normalised."),
    ("kl_by_layer", "KL divergence of each POS's expert distribution from uniform, minus its shuffled-tag chance level."),
    ("spec", "Spec(POS, expert) at the layer where POS moves routing most (log2; 0 = the uniform share k/E)."),
    ("ablation", "Probe accuracy with the first or last n MoE layers dropped from the routing path."),
    ("tsne", "t-SNE of routing paths, coloured by POS."),
)

TEMPLATE = """\
<p class="baseline-note">Tags: {{ tag_source }}.{{ " First subword of each word only." if first_subword }}
Every accuracy is cross-validated on the same folds; the word-form baseline predicts each token id's most frequent
tag in the training folds.</p>
<table class="values">
<thead><tr><th>predictor of POS</th><th>accuracy</th><th>macro-F1</th></tr></thead>
<tbody>
{% for name, acc, f1 in rows %}<tr><th scope="row">{{ name }}</th><td class="num">{{ acc }}</td><td class="num">{{ f1 }}</td></tr>
{% endfor %}</tbody></table>
<h3>Per layer</h3>
<table class="values">
<thead><tr><th>MoE layer</th><th>KL from uniform (nats)</th><th>shuffled-tag chance</th><th>top-{{ top_n }} experts' gain over uniform</th><th>chance</th></tr></thead>
<tbody>
{% for r in layers %}<tr><th scope="row">{{ r.layer }}</th><td class="num">{{ r.kl }}</td><td class="num">{{ r.kl_chance }}</td><td class="num">{{ r.gain }}</td><td class="num">{{ r.gain_chance }}</td></tr>
{% endfor %}</tbody></table>
<p class="note">KL and gain are token-weighted means over POS; per-POS values are in results.json
(<code>kl_from_uniform</code>, <code>top_gain</code>, <code>spec</code>). The chance levels keep every tag's count
and the experts' loads, and shuffle which token carries which tag.</p>
{% if ablation %}<h3>Layer ablation</h3>
<table class="values"><thead><tr><th>layers dropped</th>{% for n in ablation.ns %}<th>{{ n }}</th>{% endfor %}</tr></thead>
<tbody><tr><th scope="row">first n</th>{% for a in ablation.first %}<td class="num">{{ a }}</td>{% endfor %}</tr>
<tr><th scope="row">last n</th>{% for a in ablation.last %}<td class="num">{{ a }}</td>{% endfor %}</tr></tbody></table>{% endif %}
{% if dropped %}<p class="note warn">Tags with fewer tokens than folds were left out: {{ dropped }}.</p>{% endif %}
{% for fig in figures %}<figure><img src="{{ fig.uri }}" alt="{{ fig.name }}"><figcaption>{{ fig.caption }}</figcaption></figure>
{% endfor %}
"""


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{float(x):.{digits}f}"


def render(results: dict[str, Any], out_dir: Path, env: Any) -> Section:
    """The POS section: accuracy table with baselines, per-layer KL / gain with chance, ablation, figures."""
    r = results
    rows = [
        ("routing-path MLP probe", f"{_f(r['probe_accuracy_mean'])} ± {_f(r['probe_accuracy_sd'])}",
         _f(r.get("macro_f1"))),
        ("word form (token id's most frequent tag)",
         f"{_f(r['word_form_accuracy_mean'])} ± {_f(r.get('word_form_accuracy_sd'))}", _f(r.get("word_form_macro_f1"))),
        (f"majority tag ({r.get('majority_tag', '?')})", _f(r["majority_accuracy"]), "—"),
        ("probe on shuffled tags (chance)",
         f"{_f(r['shuffled_probe_accuracy_mean'])} ± {_f(r.get('shuffled_probe_accuracy_sd'))}", "—"),
    ]
    layers = [{"layer": layer, "kl": _f(kl, 4), "kl_chance": _f(klc, 4), "gain": f"{100 * g:+.1f}%",
               "gain_chance": f"{100 * gc:+.1f}%"}
              for layer, kl, klc, g, gc in zip(r["moe_layers"], r["kl_layer_mean"], r["kl_layer_mean_shuffled"],
                                               r["top_gain_layer_mean"], r["top_gain_layer_mean_shuffled"])]
    ab = r.get("ablation") or {}
    ablation = None
    if ab.get("drop_first"):
        ns = list(ab["drop_first"])
        ablation = {"ns": ["0"] + ns, "first": [_f(ab["full"][0])] + [_f(ab["drop_first"][n]) for n in ns],
                    "last": [_f(ab["full"][0])] + [_f(ab["drop_last"].get(n)) for n in ns]}
    figures = []
    for name, caption in FIGURES:
        path = Path(out_dir) / "figures" / f"{name}.png"
        if path.is_file():
            figures.append({"name": name, "caption": caption, "uri": figure_data_uri(path)})
    dropped = ", ".join(f"{t} ({n})" for t, n in (r.get("dropped_tags") or {}).items())
    html = env.from_string(TEMPLATE).render(
        tag_source=r.get("tag_source") or "unknown source", first_subword=r.get("first_subword_only"), rows=rows,
        layers=layers, top_n=r.get("params", {}).get("top_n", 3), ablation=ablation, dropped=dropped, figures=figures)
    return Section(key="pos", title="Part of speech in the routing path", summary=_summary(r), html=html)


def _summary(r: dict[str, Any]) -> str:
    excess = np.subtract(r["kl_layer_mean"], r["kl_layer_mean_shuffled"])
    best = int(np.argmax(excess))
    diff = r["probe_accuracy_mean"] - r["word_form_accuracy_mean"]
    noise = max(r.get("probe_accuracy_sd") or 0.0, r.get("word_form_accuracy_sd") or 0.0, 0.01)
    if abs(diff) <= noise:  # within the folds' SD: call it a tie
        compared = "about as much POS information as"
    else:
        compared = f"{'more' if diff > 0 else 'less'} POS information than"
    return (f"An MLP reading the experts chosen at every MoE layer predicts a token's POS with accuracy "
            f"{_f(r['probe_accuracy_mean'])} (word form alone: {_f(r['word_form_accuracy_mean'])}, majority tag: "
            f"{_f(r['majority_accuracy'])}, shuffled tags: {_f(r['shuffled_probe_accuracy_mean'])}) on "
            f"{r.get('n_tokens_probe', r.get('n_tokens', 0)):,} tokens: the routing path carries {compared} the "
            f"token's identity. POS departs most from its chance level in MoE layer {r['moe_layers'][best]} "
            f"(KL excess {excess[best]:.3f} nats).")
