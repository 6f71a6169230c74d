"""A sub-trace: every table of a trace restricted to the sequences a SQL predicate selects.

    moescope filter runs/olmoe --where "label = 'code'" --out runs/olmoe-code

The sub-trace keeps the source's manifest header (model, tokenizer, capture options, input)
and records where it came from (``provenance``: source path and fingerprint, predicate,
sequences kept). It is written shard by shard through the same atomic writer as a capture,
so memory stays bounded by one source shard.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds

from moescope.errors import TraceError
from moescope.schema import TABLES
from moescope.store.manifest import fingerprint
from moescope.store.reader import open_trace
from moescope.store.writer import DEFAULT_SHARD_ROWS, TraceWriter

# Manifest fields that describe the source's files, not what the trace holds.
_NOT_INHERITED = ("format", "format_version", "fingerprint", "complete", "shards", "totals", "provenance")


def filter_trace(source: str | os.PathLike, out: str | os.PathLike, where: str, *,
                 shard_rows: int = DEFAULT_SHARD_ROWS, overwrite: bool = False) -> dict[str, Any]:
    """Write the sequences of `source` that `where` (SQL over its sequences table) selects,
    with all their rows in every table, as the trace `out`. Returns the new manifest.

    MoescopeError for a bad predicate or one selecting nothing; TraceError when `out` holds
    another trace (unless `overwrite`) or is the source itself."""
    trace = open_trace(source, where=where)
    if Path(out).resolve() == trace.path.resolve():
        raise TraceError(f"--out {out} is the source trace; choose another directory")
    ids = trace.selected_seq_ids
    selected = pc.field("seq_id").isin(ids)
    provenance = {"source": str(trace.path.resolve()), "source_fingerprint": trace.manifest.get("fingerprint"),
                  "where": trace.where, "n_sequences": len(ids)}
    header = {k: v for k, v in trace.manifest.items() if k not in _NOT_INHERITED}
    header["provenance"] = {"filtered_from": provenance, **({"earlier": trace.manifest["provenance"]}
                                                             if "provenance" in trace.manifest else {})}
    fp = fingerprint({"source": provenance["source_fingerprint"], "where": trace.where})
    writer = TraceWriter(out, header, fp, shard_rows=shard_rows, overwrite=overwrite)
    if writer.complete:
        writer.close()
        return writer.manifest
    if writer.manifest["shards"]:  # our own interrupted run (same fingerprint): start it again
        writer.close()
        writer = TraceWriter(out, header, fp, shard_rows=shard_rows, overwrite=True)
    with writer:
        done = 0
        for files in _source_shards(trace):
            part = {name: ds.dataset(path, format="parquet").to_table(filter=selected) for name, path in files.items()}
            n = part["sequences"].num_rows if "sequences" in part else 0
            if not any(t.num_rows for t in part.values()):
                continue
            writer.add(part, input_end=done + n, n_sequences=n, input_start=done)
            done += n
        return writer.finish()


def _source_shards(trace: Any) -> list[dict[str, Any]]:
    """Per source shard, table name -> its file (shards are cut at sequence boundaries).
    A trace written without a shard list is read as one shard of all its files."""
    shards = trace.manifest.get("shards")
    if shards is None:
        return [{t: trace.files(t) for t in TABLES if trace.files(t)}]
    return [{t: str(trace.path / s["files"][t]["path"]) for t in TABLES if t in s["files"]} for s in shards]
