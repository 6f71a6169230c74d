"""Training curves of a `moescope train` run, from its metrics.jsonl, as one PNG."""
from __future__ import annotations

import json
from pathlib import Path


def plot_training_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Two panels against training tokens: validation perplexity per domain (log scale), and per
    MoE layer the busiest expert's share of assignments over its fair share (1 = balanced).
    Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    if not rows:
        raise ValueError(f"{metrics_path} holds no evaluations yet")
    tokens = [r["tokens"] / 1e6 for r in rows]
    fig, (ax_ppl, ax_load) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for domain in rows[-1]["val"]["domains"]:
        ax_ppl.plot(tokens, [r["val"]["domains"][domain]["ppl"] for r in rows], label=domain)
    ax_ppl.set_yscale("log")
    ax_ppl.set(xlabel="training tokens (millions)", ylabel="validation perplexity",
               title="Validation perplexity per domain")
    ax_ppl.legend(fontsize=8)
    for layer in sorted(rows[-1]["routing"], key=int):
        ax_load.plot(tokens, [r["routing"][layer]["max_over_fair"] for r in rows], label=f"layer {layer}")
    ax_load.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_load.set(xlabel="training tokens (millions)", ylabel="busiest expert / fair share",
                title="Load imbalance per MoE layer (1 = balanced)")
    ax_load.legend(fontsize=8, ncol=2)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
