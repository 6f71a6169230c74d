"""Figures of the design-choice experiment: perplexity per variant (unigram line), specialisation
scatter (NMI above chance), per-layer curves (NMI with its chance level)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

COLOURS = {"learned": "#1f77b4", "frozen": "#ff7f0e"}
MARKERS = {"token": "o", "sequence": "s"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def perplexity_figure(cells: list[dict[str, Any]]) -> Any:
    """Bars: mean validation perplexity per grid cell (error bars: sd over seeds), the unigram
    model's perplexity on the same tokens as a dashed line (the no-context baseline)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cells) + 2), 3.6))
    x = np.arange(len(cells))
    ppl = [c["mean_ppl"] for c in cells]
    err = [c["mean_ppl_sd"] or 0.0 for c in cells]
    ax.bar(x, ppl, yerr=err if any(err) else None, color=[COLOURS[c["router"]] for c in cells], capsize=3,
           edgecolor=["black" if c["routing"] == "sequence" else "none" for c in cells])
    unigram = float(np.mean([c["unigram_mean_ppl"] for c in cells]))
    line = ax.axhline(unigram, ls="--", color="grey", lw=1)
    for xi, value in zip(x, ppl):
        ax.text(xi, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [c["name"] for c in cells], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("validation perplexity (mean over domains)")
    # Variants differ by a few percent: start the axis near the smallest value (said in the title).
    low, high = min(min(ppl), unigram), max(max(ppl), unigram)
    ax.set_ylim(low - 0.25 * (high - low) - 0.02 * low, high + 0.15 * (high - low) + 0.02 * high)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[r]) for r in COLOURS]
    ax.legend(handles + [line], [f"{r} router" for r in COLOURS] + [f"unigram baseline ({unigram:.1f})"],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Perplexity per variant (black edge: sequence-level routing; axis does not start at 0)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def specialisation_figure(cells: list[dict[str, Any]]) -> Any:
    """Scatter per grid cell: NMI above chance with the domain (x) and with the token type (y),
    layer means; 0 on either axis is the permutation chance level."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for c in cells:
        # shape, colour and fill identify the cell (routing, router, top-k): a legend, not labels that overlap
        colour = COLOURS[c["router"]]
        ax.scatter(c["domain_nmi_excess"], c["token_type_nmi_excess"], marker=MARKERS[c["routing"]], s=60,
                   facecolors=colour if c["top_k"] > 1 else "none", edgecolors=colour, linewidths=1.5,
                   label=c["name"])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    lims = [min(0, *[min(c["domain_nmi_excess"], c["token_type_nmi_excess"]) for c in cells]),
            max(0.01, *[max(c["domain_nmi_excess"], c["token_type_nmi_excess"]) for c in cells]) * 1.15]
    ax.plot(lims, lims, color="lightgrey", lw=0.8)  # above the diagonal: more token-type than domain
    ax.set_xlabel("domain NMI − chance (shuffled between sequences)")
    ax.set_ylabel("token-type NMI − chance (shuffled tokens)")
    ax.set_title("What experts specialise in (circle: token-level, square: sequence-level;\n"
                 "filled: top-k > 1, hollow: top-1)", fontsize=9)
    fig.tight_layout()
    return fig


def layer_figure(rows: list[dict[str, Any]]) -> Any:
    """Per MoE layer, one line per grid cell (seed mean): domain NMI, token-type NMI (dotted:
    their chance levels) and the bias-corrected token-id NMI (raw minus shuffled mean)."""
    plt = _plt()
    by_cell: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cell[f"{r['routing']}-top{r['top_k']}-{r['router']}"].append(r)
    panels = [("domain_nmi", "nmi", "domain NMI"), ("token_type_nmi", "nmi", "token-type NMI"),
              ("token_id_nmi", "excess", "token-id NMI, corrected")]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.6))
    cmap = plt.get_cmap("tab10")
    for j, (name, rs) in enumerate(by_cell.items()):
        layers = rs[0]["moe_layers"]
        style = "-" if rs[0]["routing"] == "token" else "--"
        for ax, (measure, key, title) in zip(axes, panels):
            value = np.mean([[layer[key] for layer in r[measure]["layers"]] for r in rs], axis=0)
            ax.plot(layers, value, style, marker="o", ms=3, color=cmap(j % 10), label=name)
            if key == "nmi":
                chance = np.mean([[layer["chance"] for layer in r[measure]["layers"]] for r in rs], axis=0)
                ax.plot(layers, chance, ":", color=cmap(j % 10), lw=0.8)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("MoE layer")
            ax.set_xticks(layers)
    axes[0].set_ylabel("NMI (dotted: permutation chance)")
    axes[2].axhline(0, color="grey", lw=0.8, ls=":")
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
