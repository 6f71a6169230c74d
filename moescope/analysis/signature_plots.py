"""Figures of the routing-signature analysis (matplotlib Figures, no pyplot state)."""
from __future__ import annotations

from typing import Any

import numpy as np

MAX_EMBED_POINTS = 2000  # t-SNE beyond this is slow and unreadable: a seeded subsample is drawn


def _fig(width: float = 6.4, height: float = 3.8) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(1, 1, 1)


def _legend(ax: Any) -> None:
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _scatter(points: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str) -> Any:
    fig, ax = _fig(6.0, 4.4)
    for i, name in enumerate(np.unique(y)):
        sel = y == name
        ax.scatter(points[sel, 0], points[sel, 1], s=14, alpha=0.8, color=f"C{i % 10}", label=str(name))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _legend(ax)
    return fig


def embeddings(X: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    """PCA and t-SNE scatter plots of standardised signatures, coloured by label."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    if len(X) > MAX_EMBED_POINTS:
        pick = np.sort(np.random.default_rng(seed).choice(len(X), MAX_EMBED_POINTS, replace=False))
        X, y = X[pick], y[pick]
    Z = StandardScaler().fit_transform(np.asarray(X))  # a large signature matrix is built here, for the sample
    n_comp = min(50, *Z.shape)
    pca = PCA(n_components=n_comp, random_state=seed).fit(Z)
    P = pca.transform(Z)
    var = pca.explained_variance_ratio_
    figs = {"pca": _scatter(P[:, :2], y, "Signatures, first two principal components",
                            f"PC1 ({var[0]:.0%} of variance)", f"PC2 ({var[1] if len(var) > 1 else 0:.0%})")}
    if len(X) >= 5 and P.shape[1] >= 2:
        perplexity = float(min(30.0, (len(X) - 1) / 3))
        T = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(P)
        figs["tsne"] = _scatter(T, y, f"Signatures, t-SNE (perplexity {perplexity:.0f})", "t-SNE 1", "t-SNE 2")
    return figs


def _band(ax: Any, v: dict[str, Any], x: np.ndarray) -> None:
    ax.axhline(v["chance_accuracy"], color="grey", linestyle=":", label="chance (majority label)")
    perm = np.asarray(v.get("permutation_accuracies") if v.get("permutation_accuracies") is not None else [], dtype=float)
    if len(perm):
        lo, hi = np.percentile(perm, [2.5, 97.5])
        ax.fill_between([x[0] - 0.5, x[-1] + 0.5], lo, hi, color="grey", alpha=0.2,
                        label="label permutation, 95% band")


def per_layer(v: dict[str, Any]) -> Any:
    layers = v["moe_layers"]
    x = np.arange(len(layers))
    fig, ax = _fig()
    _band(ax, v, x)
    ax.plot(x, v["per_layer_accuracy"], marker="o", label="signature of this layer only")
    ax.axhline(v["cv_accuracy_mean"], color="C0", linestyle="--", label="all layers")
    if v.get("token_id_control_accuracy_mean") is not None:
        ax.axhline(v["token_id_control_accuracy_mean"], color="C3", linestyle="-.", label="token-id control (all layers)")
    ax.set_xticks(x, [str(layer) for layer in layers])
    ax.set_xlabel("MoE layer")
    _finish_accuracy_axes(ax, v, "Label separability per layer")
    return fig


def first_n(v: dict[str, Any]) -> Any:
    n = np.asarray(v["first_n_tokens"], dtype=float)
    fig, ax = _fig()
    _band(ax, v, np.array([n.min(), n.max()]))
    ax.plot(n, v["first_n_accuracy"], marker="o", label="signature of the first n tokens")
    ax.set_xscale("log", base=2)
    ax.set_xlim(n.min() * 0.8, n.max() * 1.25)
    ax.set_xlabel("tokens seen per sequence (n; last point: all)")
    _finish_accuracy_axes(ax, v, "Separability against the number of tokens seen")
    return fig


def _finish_accuracy_axes(ax: Any, v: dict[str, Any], title: str) -> None:
    """Y axis as CV accuracy in [0, 1], title, legend and grid of an accuracy plot."""
    ax.set_ylabel(f"{v['folds']}-fold CV accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    _legend(ax)
    ax.grid(alpha=0.3)


def permutation_histogram(v: dict[str, Any]) -> Any | None:
    perm = np.asarray(v.get("permutation_accuracies") if v.get("permutation_accuracies") is not None else [], dtype=float)
    if not len(perm):
        return None
    fig, ax = _fig()
    ax.hist(perm, bins=min(30, max(5, len(perm) // 5)), color="grey", alpha=0.7, label=f"{len(perm)} label shuffles")
    ax.axvline(v["cv_accuracy_mean"], color="C0", linewidth=2, label=f"real labels ({v['cv_accuracy_mean']:.3f})")
    ax.axvline(v["chance_accuracy"], color="black", linestyle=":", label="chance (majority label)")
    ax.set_xlabel("CV accuracy")
    ax.set_ylabel("shuffles")
    ax.set_title(f"Permutation baseline (p = {v['permutation_p_value']:.3g})", fontsize=10)
    _legend(ax)
    return fig


def confusion(v: dict[str, Any]) -> Any:
    cm = np.asarray(v["confusion_matrix"], dtype=float)
    labels = v["labels"]
    fig, ax = _fig(1.2 + 0.55 * len(labels) + 1.5, 1.2 + 0.55 * len(labels))
    shares = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    ax.set_title("Confusion matrix (out-of-fold)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("share of the true label", fontsize=8)
    return fig


def signature_figures(v: dict[str, Any], X: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    """name -> Figure for a signatures result (X: the signature matrix, y: labels)."""
    figs = embeddings(X, y, seed)
    figs["per_layer_accuracy"] = per_layer(v)
    figs["first_n_accuracy"] = first_n(v)
    hist = permutation_histogram(v)
    if hist is not None:
        figs["permutation"] = hist
    figs["confusion"] = confusion(v)
    return figs
