"""Figures of the geometry and compare analyses (matplotlib Figures, no pyplot state)."""
from __future__ import annotations

from typing import Any

import numpy as np


def _legend(ax: Any) -> None:
    # outside the axes, so it never hides a curve (savefig's tight bbox keeps it in the PNG)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _fig(width: float = 6.4, height: float = 3.6) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(1, 1, 1)


def _series(values: dict[str, Any], key: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values.get(key) or []], dtype=float)


def _plot_series(ax: Any, x: np.ndarray, values: dict[str, Any], specs: tuple[tuple[str, str, str], ...]) -> None:
    """One line per (values key, legend label, matplotlib style), skipping keys with no finite value."""
    for key, label, style in specs:
        y = _series(values, key)
        if np.isfinite(y).any():
            ax.plot(x, y, style, label=label)


def _finish(ax: Any, layers: list[int], ylabel: str, title: str) -> None:
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _legend(ax)
    ax.grid(alpha=0.3)


def geometry_figures(values: dict[str, Any]) -> dict[str, Any]:
    """name -> Figure for a geometry result's values."""
    layers = values["layers"]
    if not layers:
        return {}
    x = np.arange(len(layers))
    figs = {}

    fig, ax = _fig()
    _plot_series(ax, x, values, (("spearman_cosine_overlap", "random pairs", "o-"),
                                 ("spearman_cosine_overlap_diff_token", "different token id", "s--"),
                                 ("spearman_cosine_overlap_same_token", "same token id", "^:"),
                                 ("spearman_cosine_jaccard", "top-p Jaccard (random pairs)", "d-.")))
    ax.axhline(0, color="grey", lw=1, label="no relation")
    _finish(ax, layers, "Spearman ρ", "Hidden-state cosine vs routing overlap")
    figs["geometry_correlation"] = fig

    fig, ax = _fig()
    chance = values["expected_overlap_chance"]
    _plot_series(ax, x, values, (("nn_overlap", "nearest neighbour", "o-"),
                                 ("random_neighbour_overlap", "random neighbour", "o:"),
                                 ("nn_overlap_diff_token", "nearest, different id", "s-"),
                                 ("random_neighbour_overlap_diff_token", "random, different id", "s:"),
                                 ("random_neighbour_overlap_same_token", "random, same id (token-id predictor)", "^:")))
    ax.axhline(chance, color="grey", lw=1, ls="--", label=f"chance k/E = {chance:.3f}")
    ax.set_ylim(0, 1.02)
    _finish(ax, layers, "overlap with the query's experts", "Nearest neighbour in hidden space predicts the expert set")
    figs["geometry_neighbours"] = fig

    fig, ax = _fig()
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for idx, entry in enumerate(values["per_layer"]):
        curve = (entry.get("pairs") or {}).get("random", {}).get("by_cosine")
        if curve:
            ax.plot(curve["cosine"], curve["overlap"], "o-", ms=3, color=cmap(idx / max(len(layers) - 1, 1)),
                    label=f"layer {entry['layer']}")
    ax.axhline(chance, color="grey", lw=1, ls="--", label="chance k/E")
    ax.set_xlabel("hidden-state cosine (quantile bins of random pairs)")
    ax.set_ylabel("mean overlap")
    ax.set_title("Routing overlap rises with hidden-state similarity", fontsize=10)
    _legend(ax)
    ax.grid(alpha=0.3)
    figs["geometry_overlap_by_cosine"] = fig

    fig, ax = _fig()
    _plot_series(ax, x, values, (("mean_direction_share", "mean direction's share of E|h|²", "o-"),
                                 ("mean_direction_share_chance", "random direction (1/H)", "o:"),
                                 ("router_mean_logit_share", "mean's share of router logit variance", "s-"),
                                 ("router_mean_logit_share_isotropic", "same, isotropic router", "s:"),
                                 ("router_centred_abs_cos", "mean |cos| centred router rows", "^-"),
                                 ("router_abs_cos_chance", "mean |cos| random direction", "^:")))
    null, sd = _series(values, "router_mean_logit_share_null_mean"), _series(values, "router_mean_logit_share_null_sd")
    if np.isfinite(null).any():
        ax.fill_between(x, null - 2 * sd, null + 2 * sd, alpha=0.2, color="grey", label="random routers, mean ± 2 SD")
    _finish(ax, layers, "share / |cos|", "The mean hidden direction and the router")
    figs["geometry_mean_direction"] = fig

    if values.get("visits"):
        fig, ax = _fig()
        vx = np.arange(len(values["visits"]))
        _plot_series(ax, vx, values, (("visit_cosine_within", "within sequence (even vs odd positions)", "o-"),
                                      ("visit_cosine_across", "across sequences", "s-"),
                                      ("visit_cosine_load_chance", "chance, actual loads", "s:"),
                                      ("visit_cosine_uniform_chance", "chance, uniform loads", "o:")))
        _finish(ax, [v["layer"] for v in values["visits"]], "cosine of visit frequencies",
                "Per-sequence expert visit frequencies")
        figs["geometry_visits"] = fig
    return figs


def compare_figures(values: dict[str, Any]) -> dict[str, Any]:
    """name -> Figure for a compare result's values."""
    layers = values["layers"]
    if not layers:
        return {}
    x = np.arange(len(layers))
    fig, ax = _fig()
    _plot_series(ax, x, values, (("per_layer_overlap", "raw expert ids", "o-"),
                                 ("per_layer_overlap_matched", "after Hungarian matching (in-sample)", "s--"),
                                 ("per_layer_overlap_matched_crossfit", "after matching (cross-fitted)", "s-"),
                                 ("per_layer_matched_chance", "matching on shuffled tokens (chance)", "s:"),
                                 ("per_layer_load_chance", "chance given expert loads", "o:")))
    ax.axhline(values["expected_overlap_chance"], color="grey", lw=1, ls="--",
               label=f"chance k/E = {values['expected_overlap_chance']:.3f}")
    ax.set_ylim(0, 1.02)
    _finish(ax, layers, "overlap |S_A ∩ S_B| / k", "Routing overlap of the two traces on the same text")
    figs = {"compare_overlap": fig}
    share = _series(values, "per_layer_share_at_least_one")
    if np.isfinite(share).any():
        fig, ax = _fig()
        ax.plot(x, share, "o-", label="share of tokens with ≥1 shared expert")
        ax.axhline(values["share_at_least_one_chance"], color="grey", lw=1, ls="--",
                   label=f"chance 1 − C(E−k,k)/C(E,k) = {values['share_at_least_one_chance']:.3f}")
        ax.set_ylim(0, 1.02)
        _finish(ax, layers, "share of aligned tokens", "At least one shared expert")
        figs["compare_at_least_one"] = fig
    return figs
