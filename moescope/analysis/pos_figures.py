"""Figures of the POS analysis, drawn from its result values (no recomputation).

Every figure shows its baseline: accuracies next to majority / word-form / token-identity-null
levels, KL and Spec as excess over their token-identity null.
"""
from __future__ import annotations

from typing import Any

import numpy as np

COLORS = {"probe": "#0b57d0", "word_form": "#b45309", "majority": "#6b7280", "shuffled": "#9ca3af"}


def pos_figures(values: dict[str, Any], *, embedding: np.ndarray | None = None,
                embedding_tags: np.ndarray | None = None) -> dict[str, Any]:
    """name -> matplotlib Figure: accuracy, per_tag_f1, confusion, kl_by_layer, spec, ablation, tsne."""
    import matplotlib

    matplotlib.use("Agg")
    figs = {
        "accuracy": _accuracy(values),
        "per_tag_f1": _per_tag_f1(values),
        "confusion": _confusion(values),
        "kl_by_layer": _kl(values),
        "spec": _spec(values),
        "ablation": _ablation(values),
    }
    if embedding is not None and embedding_tags is not None:
        figs["tsne"] = _tsne(values["tags"], embedding, embedding_tags)
    return figs


def _accuracy(v: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    names = ["routing probe", "word form", "word level", "majority tag", "probe, tags permuted\nwithin token ids"]
    means = [v["probe_accuracy"], v["word_form_accuracy"], v["word_level_accuracy"], v["majority_accuracy"],
             v["token_null_probe_accuracy"]]
    cis = [v.get(f"{k}_accuracy_ci") for k in ("probe", "word_form", "word_level", "majority")] + [None]
    err = np.array([[m - c[0], c[1] - m] if c and np.all(np.isfinite(c)) else [0.0, 0.0]
                    for m, c in zip(means, cis)]).T
    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    colors = [COLORS[c] for c in ("shuffled", "majority", "word_form", "word_form", "probe")]
    ax.barh(names[::-1], means[::-1], xerr=err[:, ::-1], color=colors)
    for i, m in enumerate(means[::-1]):
        ax.text(min(m + 0.02, 0.9), i, f"{m:.3f}", va="center")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"accuracy (CV grouped by {v.get('cv_groups', 'sentence')}; bars: 95% CI)")
    ax.set_title("POS from the routing path vs baselines")
    return fig


def _per_tag_f1(v: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    tags = v["tags"]
    x = np.arange(len(tags))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(tags) + 2), 3.2))
    ax.bar(x - 0.2, [v["per_tag_f1"][t] for t in tags], 0.4, label="routing probe", color=COLORS["probe"])
    ax.bar(x + 0.2, [v["word_form_per_tag_f1"][t] for t in tags], 0.4, label="word form", color=COLORS["word_form"])
    ax.set_xticks(x, tags, rotation=60, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 (out-of-fold)")
    ax.set_title("Per-tag F1 (tags by frequency)")
    ax.legend(fontsize=8)
    return fig


def _confusion(v: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    tags = v["confusion_matrix"]["labels"]
    counts = np.asarray(v["confusion_matrix"]["counts"], dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.5, 0.38 * len(tags) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(tags)), tags, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(tags)), tags, fontsize=8)
    ax.set_xlabel("predicted from the routing path")
    ax.set_ylabel("true tag")
    ax.set_title("Probe confusion (rows sum to 1)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def _kl(v: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    tags, layers = v["tags"], v["moe_layers"]
    excess = np.array([np.subtract(v["kl_from_uniform"][t], v["kl_from_uniform_token_null"][t]) for t in tags])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, max(3.2, 0.3 * len(tags) + 1.5)),
                                  gridspec_kw={"width_ratios": [1.3, 1]}, layout="constrained")
    lim = max(float(np.abs(excess).max(initial=0)), 1e-6)
    im = ax.imshow(excess, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(tags)), tags, fontsize=8)
    ax.set_xticks(range(len(layers)), layers, fontsize=8)
    ax.set_xlabel("MoE layer")
    ax.set_title("KL(POS || uniform) minus its token-identity null (nats)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax2.plot(layers, v["kl_layer_mean"], "o-", color=COLORS["probe"], label="tags")
    ax2.plot(layers, v["kl_layer_mean_naive_null"], "s--", color=COLORS["shuffled"],
             label="naive null: tags shuffled across tokens\n(token identity alone beats it)")
    ax2.plot(layers, v["kl_layer_mean_token_null"], "^:", color=COLORS["word_form"],
             label="tags permuted within token ids")
    ax2.set_xticks(layers)
    ax2.set_xlabel("MoE layer")
    ax2.set_ylabel("KL from uniform (nats)\nmean over POS, token-weighted")
    ax2.legend(fontsize=8)
    ax2.set_title("Per layer", fontsize=10)
    return fig


def _spec(v: dict[str, Any]) -> Any:
    """Spec(POS, expert) at the layer where POS moves routing most (largest mean KL excess over the
    token-identity null)."""
    import matplotlib.pyplot as plt

    tags = v["tags"]
    excess = np.subtract(v["kl_layer_mean"], v["kl_layer_mean_token_null"])
    li = int(np.argmax(excess))
    spec = np.array([v["spec"][t][li] for t in tags])
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * spec.shape[1] + 3), max(3.2, 0.3 * len(tags) + 1.5)))
    log_spec = np.log2(np.maximum(spec, 1e-3))
    top = min(max(float(np.abs(log_spec).max(initial=0)), 0.1), 3.0)  # beyond 8x over / under: saturate
    im = ax.imshow(log_spec, cmap="PuOr_r", vmin=-top, vmax=top, aspect="auto")
    ax.set_yticks(range(len(tags)), tags, fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title(f"log2 Spec(POS, expert) at MoE layer {v['moe_layers'][li]} (0 = uniform share k/E)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def _ablation(v: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    ab = v["ablation"]
    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    for side, marker, label in (("drop_first", "o-", "first n layers dropped"),
                                ("drop_last", "s-", "last n layers dropped")):
        ns = [0] + [int(n) for n in ab[side]]
        acc = [ab["full"]] + list(ab[side].values())
        ax.plot(ns, acc, marker, label=label)
    ax.set_xticks([0] + [int(n) for n in ab["drop_first"]])
    ax.axhline(v["word_form_accuracy"], color=COLORS["word_form"], ls=":", label="word form")
    ax.axhline(v["majority_accuracy"], color=COLORS["majority"], ls="--", label="majority tag")
    ax.axhline(v["token_null_probe_accuracy"], color=COLORS["shuffled"], ls="-.", label="probe, tags permuted within ids")
    ax.set_xlabel(f"MoE layers dropped from the path (of {ab['n_layers']})")
    ax.set_ylabel("probe accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Layer ablation")
    return fig


def _tsne(tags: list[str], points: np.ndarray, y: np.ndarray) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab20")
    shades = list(range(0, 20, 2)) + list(range(1, 20, 2))  # dark shades first: the frequent tags contrast
    for i, tag in enumerate(tags):
        sel = y == i
        if sel.any():
            ax.scatter(points[sel, 0], points[sel, 1], s=6, color=cmap(shades[i % 20]), label=tag, alpha=0.75, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {len(y):,} routing paths, coloured by POS")
    ax.legend(fontsize=7, markerscale=2, ncol=1, bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig
