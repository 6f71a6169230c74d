"""The result of an analysis, and its directory format (what `moescope report` reads).

    OUT/results.json     {"analysis": "signatures", "moescope_version": ..., "trace": ..., "params": {...},
                          <every result value at top level, JSON>}
    OUT/figures/*.png    the analysis's figures (embedded into the HTML report)

Analyses are pure functions returning an AnalysisResult; saving is the caller's business.
In a notebook a result shows itself as HTML, and ``result.df()`` is a pandas view of it.
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
        where: the SQL predicate that selected the sequences analysed (None: all of them).
    """

    analysis: str
    values: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    trace: str | None = None
    where: str | None = None

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
        from moescope.store.selection import active_where

        where = self.where if self.where is not None else active_where()
        body = {
            "analysis": self.analysis,
            "moescope_version": moescope.__version__,
            "trace": self.trace,
            **({"where": where} if where else {}),
            "params": self.params,
            "figures": names,
            **self.values,
        }
        path = out / RESULTS
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(to_jsonable(body), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


    # -- views for notebooks -------------------------------------------------------------
    @property
    def layers(self) -> list[int] | None:
        """The layers the per-layer values are indexed by (moe_layers or layers), if any."""
        layers = self.values.get("moe_layers", self.values.get("layers"))
        return list(layers) if isinstance(layers, (list, tuple)) and layers else None

    def df(self, key: str | None = None) -> Any:
        """A pandas DataFrame of the result.

        Without `key`: one row per layer, one column per per-layer value (nested sections
        as ``section.name``) when the analysis is per layer; otherwise one row per scalar
        value. With `key`: that value as a frame (a list of records, a dict of columns, or
        a per-layer list).
        """
        import pandas as pd

        if key is not None:
            if key not in self.values:
                raise KeyError(f"{self.analysis} result has no {key!r}; keys: {', '.join(self.values)}")
            value = to_jsonable(self.values[key])
            if isinstance(value, dict):
                try:
                    return pd.DataFrame(value)
                except ValueError:
                    return pd.DataFrame({"value": pd.Series(value, dtype=object)})
            if isinstance(value, list):
                frame = pd.DataFrame(value if value and isinstance(value[0], dict) else {key: value})
                layers = self.layers
                if layers and len(frame) == len(layers) and not (value and isinstance(value[0], dict)):
                    frame.index = pd.Index(layers, name="layer")
                return frame
            return pd.DataFrame({key: [value]})
        layers = self.layers
        if layers:
            columns = _per_layer_columns(self.values, len(layers))
            if columns:
                return pd.DataFrame(columns, index=pd.Index(layers, name="layer"))
        scalars = {k: v for k, v in to_jsonable(self.values).items() if _is_scalar(v)}
        return pd.DataFrame({"value": pd.Series(scalars, dtype=object)}).rename_axis("name")

    to_pandas = df

    def _repr_html_(self) -> str:
        """A notebook view: what ran on what, the headline numbers, the per-layer table.
        Every piece of text is escaped."""
        from html import escape

        head = [f"<b>{escape(self.analysis)}</b>"]
        if self.trace:
            head.append(f"trace <code>{escape(str(self.trace))}</code>")
        if self.where:
            head.append(f"where <code>{escape(self.where)}</code>")
        scalars = {k: v for k, v in self.values.items() if _is_scalar(v)}
        rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(_short(v))}</td></tr>" for k, v in scalars.items())
        parts = [f"<div class=\"moescope-result\"><p>{' · '.join(head)}</p>"]
        if rows:
            parts.append(f"<table><tbody>{rows}</tbody></table>")
        if self.layers and _per_layer_columns(self.values, len(self.layers)):
            parts.append(self.df().to_html(escape=True, float_format=lambda x: f"{x:.4g}", max_cols=30))
        if self.figures:
            parts.append(f"<p>figures: {escape(', '.join(self.figures))} (written by <code>.save(dir)</code>)</p>")
        parts.append("</div>")
        return "".join(parts)

    def __repr__(self) -> str:
        where = f", where={self.where!r}" if self.where else ""
        return f"AnalysisResult({self.analysis!r}, trace={self.trace!r}{where}, keys={list(self.values)[:8]}...)"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, np.generic))


def _short(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    text = str(value)
    return text if len(text) <= 200 else text[:199] + "…"


def _per_layer_columns(values: dict[str, Any], n_layers: int) -> dict[str, list]:
    """Every list of `n_layers` scalars among `values` and its dict sections (one level down)."""
    out: dict[str, list] = {}
    values = to_jsonable(values)  # numpy arrays -> lists

    def visit(prefix: str, items: dict[str, Any]) -> None:
        for key, value in items.items():
            name = f"{prefix}{key}"
            if isinstance(value, (list, tuple)) and len(value) == n_layers and all(_is_scalar(v) for v in value):
                if key not in ("moe_layers", "layers"):
                    out[name] = list(value)
            elif isinstance(value, dict) and not prefix:
                visit(f"{key}.", value)

    visit("", values)
    return out


def load_results(out_dir: str | Path) -> dict[str, Any]:
    """The parsed results.json of an analysis directory."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        raise MoescopeError(f"{out_dir} has no {RESULTS}; run an analysis with --out {out_dir} first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MoescopeError(f"{path} is not valid JSON ({exc.msg}); rerun the analysis") from exc
