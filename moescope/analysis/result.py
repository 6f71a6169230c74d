"""The result of an analysis, and its directory format (what `moescope report` reads).

    OUT/results.json     {"analysis": "signatures", "moescope_version": ..., "trace": ..., "params": {...},
                          <every result value at top level, JSON>}
    OUT/figures/*.png    the analysis's figures (embedded into the HTML report)

Analyses are pure functions returning an AnalysisResult; saving is the caller's business.
Every number a result reports should sit next to its baseline (chance, permutation, control),
under keys that say so (e.g. ``cv_accuracy_mean`` and ``permutation_accuracy_mean``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import moescope
from moescope.errors import MoescopeError

RESULTS = "results.json"


def to_jsonable(value: Any) -> Any:
    """Plain JSON values from numpy scalars/arrays, tuples and non-finite floats (-> null)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class AnalysisResult:
    """What an analysis found.

    Attributes:
        analysis: its name ("stats", "signatures", "semantic", "pos", "geometry", "compare", ...).
        values: JSON-serialisable results (top-level keys of results.json).
        params: the parameters it ran with (seeds included).
        figures: name -> matplotlib Figure (saved as figures/<name>.png).
        trace: the trace directory it read, if any.
    """

    analysis: str
    values: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    trace: str | None = None

    def save(self, out_dir: str | Path) -> Path:
        """Write results.json and figures/*.png into `out_dir`; returns the results.json path."""
        import matplotlib

        matplotlib.use("Agg")
        out = Path(out_dir)
        (out / "figures").mkdir(parents=True, exist_ok=True)
        names = []
        for name, fig in self.figures.items():
            fig.savefig(out / "figures" / f"{name}.png", dpi=110, bbox_inches="tight")
            names.append(f"figures/{name}.png")
            import matplotlib.pyplot as plt

            plt.close(fig)
        body = {
            "analysis": self.analysis,
            "moescope_version": moescope.__version__,
            "trace": self.trace,
            "params": self.params,
            "figures": names,
            **self.values,
        }
        path = out / RESULTS
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(to_jsonable(body), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def load_results(out_dir: str | Path) -> dict[str, Any]:
    """The parsed results.json of an analysis directory."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        raise MoescopeError(f"{out_dir} has no {RESULTS}; run an analysis with --out {out_dir} first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MoescopeError(f"{path} is not valid JSON ({exc.msg}); rerun the analysis") from exc
