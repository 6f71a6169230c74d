"""Figures of the routing statistics (matplotlib Figures, no pyplot state)."""
from __future__ import annotations

from typing import Any

import numpy as np


def _fig(width: float = 6.4, height: float = 3.6) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(1, 1, 1)


def _log2_heatmap(ax: Any, matrix: np.ndarray, label: str, limit: float = 2.0) -> None:
    """Diverging heatmap of log2(matrix): white at 1 (chance), red above, blue below."""
    with np.errstate(divide="ignore", invalid="ignore"):
        data = np.log2(np.asarray(matrix, dtype=float))
    data = np.clip(np.where(np.isneginf(data), -limit, data), -limit, limit)
    image = ax.imshow(np.ma.masked_invalid(data), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                      interpolation="nearest")
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(label, fontsize=8)


def load_heatmap(load: np.ndarray, layers: list[int]) -> Any:
    """Each expert's share of its layer's assignments relative to the fair share 1/E (log2)."""
    E = load.shape[1]
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    fig, ax = _fig(7.0, max(2.0, 0.25 * len(layers) + 1.2))
    _log2_heatmap(ax, share * E, "share / fair share (log2; 1 = uniform)")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"Expert load (E={E}); white = fair share, dark blue = dead or rare", fontsize=10)
    return fig


def ratio_heatmap(ratio: np.ndarray, title: str, xlabel: str, ylabel: str, label: str) -> Any:
    fig, ax = _fig(5.4, 4.6)
    _log2_heatmap(ax, ratio, label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return fig


def weight_histograms(hist: np.ndarray, sum_hist: np.ndarray, layer: int, top_k: int, weight_max: float = 1.0) -> Any:
    """Weights of each rank at one layer (density over [0, weight_max]) and the per-token weight sum."""
    bins = hist.shape[-1]
    centres = (np.arange(bins) + 0.5) / bins * weight_max
    fig, ax = _fig()
    shown = range(min(top_k, 8))
    for r in shown:
        h = hist[r] / max(hist[r].sum(), 1)
        ax.plot(centres, h, marker=".", label=f"rank {r + 1}")
    ax.plot(centres, sum_hist / max(sum_hist.sum(), 1), color="black", linestyle="--", label="sum of k weights")
    equal = weight_max / top_k
    ax.axvline(equal, color="grey", linestyle=":", label=f"equal weights {weight_max:g}/k = {equal:.3g}")
    ax.set_xlabel("routing weight" + (f" (scaled: range 0-{weight_max:g})" if weight_max != 1.0 else ""))
    ax.set_ylabel("share of tokens")
    ax.set_title(f"Routing weights by rank, layer {layer}", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return fig


def layer_profile(values: dict[str, Any]) -> Any:
    """Per layer: normalised load entropy, token purity and label MI, each with its chance level."""
    layers = values["moe_layers"]
    x = np.arange(len(layers))
    fig, ax = _fig(6.8, 3.8)
    ax.plot(x, values["load"]["normalised_entropy"], marker="o", label="load entropy / log2 E (1 = uniform)")
    tok = values.get("token_specialisation")
    if tok:
        ax.plot(x, tok["token_purity"], marker="s", label="token purity")
        ax.plot(x, tok["token_purity_chance"], linestyle="--", color="C1", label="token purity, chance")
    lab = values.get("label_specialisation")
    if lab:
        ax2 = ax.twinx()
        ax2.plot(x, lab["mi_bits"], marker="^", color="C2", label="label MI (bits)")
        if lab.get("mi_permutation_p95_bits") is not None:
            ax2.plot(x, lab["mi_permutation_p95_bits"], linestyle="--", color="C2", label="label MI, 95% of shuffles")
        ax2.set_ylabel("bits")
        ax2.legend(fontsize=7, frameon=False, loc="lower left", bbox_to_anchor=(1.08, 0.0))
    ax.set_xticks(x, [str(layer) for layer in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylim(0, 1.05)
    ax.set_title("Per-layer routing profile against chance", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.08, 1.0))
    ax.grid(alpha=0.3)
    return fig


def stats_figures(values: dict[str, Any], co: Any, trans: Any, scan: Any, focus_index: int) -> dict[str, Any]:
    """name -> Figure for a stats result (co / trans: the focus layer's Coactivation / Transition)."""
    layers = values["moe_layers"]
    figs = {"load_heatmap": load_heatmap(scan.load, layers), "layer_profile": layer_profile(values)}
    if co is not None:
        figs["coactivation"] = ratio_heatmap(
            co.ratio, f"Co-activation within the top-k, layer {layers[focus_index]}", "expert", "expert",
            "observed / expected (log2; 1 = chance)")
    if trans is not None:
        figs["transitions"] = ratio_heatmap(
            trans.lift, f"Transitions, layer {trans.from_layer} -> {trans.to_layer}",
            f"expert at layer {trans.to_layer}", f"expert at layer {trans.from_layer}",
            "observed / independent (log2; 1 = chance)")
    if scan.weight_hist is not None:
        figs["weights"] = weight_histograms(scan.weight_hist[focus_index], scan.weight_sum_hist[focus_index],
                                            layers[focus_index], scan.top_k, getattr(scan, "weight_max", 1.0))
    return figs
