"""Write a whole trace from in-memory tables (for importers, synthetic traces, other tools).

    write_trace("out/", sequences=seq_table, tokens=tok_table, routes=routes_table,
                model={"name_or_path": "x", "n_experts": 64, "top_k": 8, "moe_layers": [0, 1]})

Tables may be pyarrow Tables or dicts of columns; they are checked against the documented
schema (required columns present) and written through the same atomic shard writer as a
capture, so the result is indistinguishable from a captured trace.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

import moescope
from moescope.errors import TraceError
from moescope.schema import required_columns
from moescope.store.manifest import fingerprint
from moescope.store.writer import DEFAULT_SHARD_ROWS, TraceWriter


def _as_table(name: str, value: Any) -> pa.Table | None:
    if value is None:
        return None
    table = value if isinstance(value, pa.Table) else pa.table(value)
    missing = [c for c in required_columns(name) if c not in table.column_names]
    if missing:
        raise TraceError(f"the {name} table lacks required column(s) {', '.join(missing)} (see docs/trace-format.md)")
    return table


def write_trace(
    path: str | Path,
    *,
    routes: Any,
    model: dict[str, Any],
    sequences: Any = None,
    tokens: Any = None,
    hidden: Any = None,
    capture: dict[str, Any] | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    overwrite: bool = False,
    header_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write tables as a complete trace directory; returns the manifest.

    `model` needs at least n_experts, top_k and moe_layers; `header_extra` adds manifest
    sections (e.g. tokenizer, provenance). Rows are split into shards of
    about `shard_rows` routes rows, at sequence boundaries.
    """
    for key in ("n_experts", "top_k", "moe_layers"):
        if key not in model:
            raise TraceError(f"model description lacks {key!r}")
    tables = {"sequences": _as_table("sequences", sequences), "tokens": _as_table("tokens", tokens),
              "routes": _as_table("routes", routes), "hidden": _as_table("hidden", hidden)}
    routes_t = tables["routes"]
    if tables["sequences"] is None:
        ids = pa.compute.unique(routes_t.column("seq_id")).sort()
        tables["sequences"] = pa.table({"seq_id": ids.cast(pa.uint32()), "text": pa.nulls(len(ids), pa.string())})
    header = {
        "moescope_version": moescope.__version__,
        "model": {"name_or_path": "unknown", "n_layers": None, "shared_experts": 0, **model},
        "capture": {"mode": "import", "has_weights": "weights" in routes_t.column_names
                    and routes_t.column("weights").null_count < routes_t.num_rows, **(capture or {})},
        **(header_extra or {}),
    }
    fp = fingerprint({"header": header, "rows": routes_t.num_rows})
    # The writer holds the directory lock until finish() (or until an error closes it).
    with TraceWriter(path, header, fp, shard_rows=shard_rows, overwrite=overwrite) as writer:
        # Sort every table by seq_id once, then cut all of them at the same sequence boundaries.
        for name, table in list(tables.items()):
            if table is not None:
                tables[name] = table.take(pa.compute.sort_indices(table.column("seq_id")))
        seq_ids = tables["sequences"].column("seq_id").to_numpy()
        keys = {name: t.column("seq_id").to_numpy() for name, t in tables.items() if t is not None}
        route_counts = np.diff(np.searchsorted(keys["routes"], seq_ids, side="left"), append=len(keys["routes"]))
        start = 0
        while start < len(seq_ids):
            end = start + 1 + int(np.searchsorted(np.cumsum(route_counts[start + 1:]), shard_rows - route_counts[start], side="right"))
            end = min(end, len(seq_ids))
            lo, hi = seq_ids[start], seq_ids[end - 1]
            part = {}
            for name, table in tables.items():
                if table is not None:
                    a, b = np.searchsorted(keys[name], lo, side="left"), np.searchsorted(keys[name], hi, side="right")
                    part[name] = table.slice(a, b - a)
            writer.add(part, input_end=end, n_sequences=end - start)
            writer.flush()
            start = end
        return writer.finish()
