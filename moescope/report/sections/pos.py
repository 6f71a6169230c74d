"""Report section of the POS analysis (moescope.analysis.pos): the probe next to its baselines."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moescope.inference import format_p
from moescope.report.sections import Section, figure_data_uri

FIGURES = (
    ("accuracy", "Routing-path probe against its baselines (cross-validated accuracy; bars: 95% CI, corrected "
                 "resampled t)."),
    ("per_tag_f1", "Per-tag F1 of the probe and of the word-form baseline."),
    ("confusion", "Probe confusion matrix, rows normalised."),
    ("kl_by_layer", "KL divergence of each POS's expert distribution from uniform, minus its token-identity null "
                    "(tags permuted among occurrences of the same token id)."),
    ("spec", "Spec(POS, expert) at the layer where POS moves routing most (log2; 0 = the uniform share k/E)."),
    ("ablation", "Probe accuracy with the first or last n MoE layers dropped from the routing path."),
    ("tsne", "t-SNE of routing paths, coloured by POS."),
)

TEMPLATE = """\
<p class="baseline-note">Tags: {{ tag_source }}.{{ " First subword of each word only." if first_subword }}
Every accuracy is cross-validated on the same folds ({{ cv }}); the word-form baseline predicts each token id's most
frequent tag in the training folds (ids not seen there: the majority tag), the word-level one the whole word's.</p>
<table class="values">
<thead><tr><th>predictor of POS</th><th>accuracy [95% CI]</th><th>seen token ids</th><th>unseen token ids</th><th>macro-F1</th></tr></thead>
<tbody>
{% for name, acc, seen, unseen, f1 in rows %}<tr><th scope="row">{{ name }}</th><td class="num">{{ acc }}</td><td class="num">{{ seen }}</td><td class="num">{{ unseen }}</td><td class="num">{{ f1 }}</td></tr>
{% endfor %}</tbody></table>
<p class="note">Probe minus word form (paired, same folds, corrected resampled t): {{ paired }}.
Probe against its token-identity null (the probe retrained on tags permuted among occurrences of the same token id
within each test fold): {{ probe_null }}.
{{ unseen_share }} of test tokens have an id not seen in their training folds.</p>
<h3>Per layer</h3>
<table class="values">
<thead><tr><th>MoE layer</th><th>KL from uniform (nats)</th><th>naive null: tags shuffled across tokens (not evidence)</th><th>token-identity null</th><th>tags with Holm p &le; 0.05</th><th>top-{{ top_n }} experts' gain</th><th>token-identity null</th></tr></thead>
<tbody>
{% for r in layers %}<tr><th scope="row">{{ r.layer }}</th><td class="num">{{ r.kl }}</td><td class="num">{{ r.kl_chance }}</td><td class="num">{{ r.kl_null }}</td><td class="num">{{ r.significant }}</td><td class="num">{{ r.gain }}</td><td class="num">{{ r.gain_null }}</td></tr>
{% endfor %}</tbody></table>
<p class="note">KL and gain are token-weighted means over POS; per-POS values are in results.json
(<code>kl_from_uniform</code>, <code>kl_from_uniform_token_null</code>, <code>kl_token_null_p_value_holm</code>,
<code>spec</code>). The naive null, tags shuffled across all tokens, is shown only to say what it would claim:
it credits a router that follows token ids with POS. The token-identity null permutes tags only among occurrences of the same token id ({{ n_perm }} permutations, Holm
across all {{ n_cells }} tag &times; layer cells), so a tag counts only for what the token id does not explain.</p>
{% if ablation %}<h3>Layer ablation</h3>
<table class="values"><thead><tr><th>layers dropped</th>{% for n in ablation.ns %}<th>{{ n }}</th>{% endfor %}</tr></thead>
<tbody><tr><th scope="row">first n</th>{% for a in ablation.first %}<td class="num">{{ a }}</td>{% endfor %}</tr>
<tr><th scope="row">last n</th>{% for a in ablation.last %}<td class="num">{{ a }}</td>{% endfor %}</tr></tbody></table>{% endif %}
{% if dropped %}<p class="note warn">Tags in fewer sentences than folds were left out: {{ dropped }}.</p>{% endif %}
{% for fig in figures %}<figure><img src="{{ fig.uri }}" alt="{{ fig.name }}"><figcaption>{{ fig.caption }}</figcaption></figure>
{% endfor %}
"""


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{float(x):.{digits}f}"


def render(results: dict[str, Any], out_dir: Path, env: Any) -> Section:
    """The POS section: accuracy table with baselines, per-layer KL / gain with chance, ablation, figures."""
    r = results
    ci = (lambda k: f"{_f(r[f'{k}_accuracy'])} [{_f((r.get(f'{k}_accuracy_ci') or [None])[0])}, "
                    f"{_f((r.get(f'{k}_accuracy_ci') or [None, None])[1])}]")
    rows = [
        ("routing-path probe (ridge, nested tuning)", ci("probe"), _f(r.get("probe_accuracy_seen")),
         _f(r.get("probe_accuracy_unseen")), _f(r.get("macro_f1"))),
        ("word form (token id's most frequent tag)", ci("word_form"), _f(r.get("word_form_accuracy_seen")),
         _f(r.get("word_form_accuracy_unseen")), _f(r.get("word_form_macro_f1"))),
        ("word level (the whole word's most frequent tag)", ci("word_level"), "—", "—", "—"),
        (f"majority tag ({r.get('majority_tag', '?')})", ci("majority"), "—", "—", "—"),
        ("probe on tags permuted within token ids (token-identity null)", _f(r["token_null_probe_accuracy"]), "—",
         "—", "—"),
    ]
    t = r.get("probe_minus_word_form") or {}
    paired = (f"{t.get('difference', float('nan')):+.3f} [{_f(t.get('ci_low'))}, {_f(t.get('ci_high'))}], "
              f"p = {_p(t.get('p_value'))}" + (f" ({t['note']})" if t.get("note") else ""))
    tested = (r.get("probe_token_null") or {}).get("probe_accuracy", r["probe_accuracy"])  # the permuted repeat's
    probe_null = (f"accuracy {_f(r['token_null_probe_accuracy'])} vs the probe's {_f(tested)} in the same CV repeat, "
                  f"{format_p(r.get('probe_p_value_token_null'), (r.get('probe_token_null') or {}).get('permutations'))}")
    tags = r["tags"]
    holm = np.array([r["kl_token_null_p_value_holm"][tag] for tag in tags], dtype=float)
    layers = [{"layer": layer, "kl": _f(kl, 4), "kl_chance": _f(klc, 4), "kl_null": _f(kln, 4),
               "significant": f"{int(np.sum(holm[:, i] <= 0.05))} of {len(tags)}", "gain": f"{100 * g:+.1f}%",
               "gain_null": f"{100 * gn:+.1f}%"}
              for i, (layer, kl, klc, kln, g, gn) in enumerate(zip(
                  r["moe_layers"], r["kl_layer_mean"], r["kl_layer_mean_naive_null"], r["kl_layer_mean_token_null"],
                  r["top_gain_layer_mean"], _layer_mean(r, "top_gain_token_null")))]
    ab = r.get("ablation") or {}
    ablation = None
    if ab.get("drop_first"):
        ns = list(ab["drop_first"])
        ablation = {"ns": ["0"] + ns, "first": [_f(ab["full"])] + [_f(ab["drop_first"][n]) for n in ns],
                    "last": [_f(ab["full"])] + [_f(ab["drop_last"].get(n)) for n in ns]}
    figures = []
    for name, caption in FIGURES:
        path = Path(out_dir) / "figures" / f"{name}.png"
        if path.is_file():
            figures.append({"name": name, "caption": caption, "uri": figure_data_uri(path)})
    dropped = ", ".join(f"{t} ({n})" for t, n in (r.get("dropped_tags") or {}).items())
    html = env.from_string(TEMPLATE).render(
        tag_source=r.get("tag_source") or "unknown source", first_subword=r.get("first_subword_only"), rows=rows,
        layers=layers, top_n=r.get("params", {}).get("top_n", 3), ablation=ablation, dropped=dropped, figures=figures,
        cv=f"{r.get('cv_repeats')} × {r.get('cv_folds')}-fold, grouped by {r.get('cv_groups')}", paired=paired,
        probe_null=probe_null,
        unseen_share=f"{100 * (r.get('unseen_token_share') or 0):.1f}%",
        n_perm=f"{(r.get('token_null') or {}).get('permutations', 0):,}", n_cells=holm.size)
    return Section(key="pos", title="Part of speech in the routing path", summary=_summary(r), html=html)


def _p(p: Any) -> str:
    return "n/a" if p is None or p != p else (f"{p:.2g}" if p >= 0.001 else f"{p:.1e}")


def _layer_mean(r: dict[str, Any], key: str) -> np.ndarray:
    """Token-weighted mean over POS of a per-tag, per-layer value."""
    counts = np.array([r["tag_counts"][t] for t in r["tags"]], dtype=float)
    return (counts / counts.sum()) @ np.array([r[key][t] for t in r["tags"]], dtype=float)


def _summary(r: dict[str, Any]) -> str:
    t = r.get("probe_minus_word_form") or {}
    lo, hi = t.get("ci_low", float("nan")), t.get("ci_high", float("nan"))
    if lo > 0:
        compared = "more POS information than"
    elif hi < 0:
        compared = "less POS information than"
    else:
        compared = "no more and no less POS information (95% CI of the difference covers 0) than"
    holm = np.array([r["kl_token_null_p_value_holm"][tag] for tag in r["tags"]], dtype=float)
    n_sig = int(np.sum(holm <= 0.05))
    return (f"A ridge probe reading the experts chosen at every MoE layer predicts a token's POS with accuracy "
            f"{_f(r['probe_accuracy'])} (word form alone: {_f(r['word_form_accuracy'])}, majority tag: "
            f"{_f(r['majority_accuracy'])}, tags permuted within token ids: {_f(r['token_null_probe_accuracy'])}; "
            f"cross-validated by "
            f"{r.get('cv_groups', 'sentence')}) on {r.get('n_tokens_probe', r.get('n_tokens', 0)):,} tokens: the "
            f"routing path carries {compared} the token's identity. Against tags permuted within token ids, "
            f"{n_sig} of {holm.size} tag × layer cells show a POS effect on routing (Holm p ≤ 0.05).")
