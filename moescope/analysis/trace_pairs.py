"""Units of work over two traces of the same sequences (`analyze compare`, `analyze agreement`
on an engine): ranges of sequences read from both traces' routes shards.

Two traces' shards need not line up (another shard size, a replay with other seq ids), so a
unit is a range of A's sequences (the seq_id range of one routes file of A, or of several
whose ranges overlap) with every routes file of A and of B holding a sequence of the range
or its twin. The seq_id range of each file comes from its Parquet footer statistics (no
rows read). Workers read whole files through pyarrow's filesystems (a local path or a URI
such as ``s3://bucket/trace``) and check each against the manifest's size and SHA-256
before reading it (:func:`moescope.analysis.count_map.read_parquet`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moescope.analysis.count_map import read_parquet
from moescope.analysis.ray_counts import shard_units
from moescope.store.reader import Trace


@dataclass(frozen=True)
class RoutesFile:
    """One routes file: where workers read it, its manifest check, its seq_id range."""

    path: str
    expected: tuple[int, str] | None
    first: int
    last: int


def routes_files(trace: Trace, location: str | None = None) -> list[RoutesFile]:
    """The routes files of `trace` (read at `location`, default its own path) with the
    [first, last] seq_id each holds (from footer statistics; the seq_id column when a file
    has none), sorted by first seq_id. Files without rows are left out."""
    out = []
    for local, unit in zip(trace.files("routes"), shard_units(trace, location)):
        bounds = _seq_bounds(local)
        if bounds is not None:
            out.append(RoutesFile(unit.routes, unit.expected(unit.routes), *bounds))
    return sorted(out, key=lambda f: (f.first, f.last))


def _seq_bounds(path: str) -> tuple[int, int] | None:
    meta = pq.read_metadata(path)
    if meta.num_rows == 0:
        return None
    col = meta.schema.to_arrow_schema().get_field_index("seq_id")
    lows, highs = [], []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if group.num_rows == 0:
            continue
        stats = group.column(col).statistics
        if stats is None or not stats.has_min_max:  # no statistics: read the column
            ids = pq.read_table(path, columns=["seq_id"]).column("seq_id").to_numpy()
            return int(ids.min()), int(ids.max())
        lows.append(int(stats.min))
        highs.append(int(stats.max))
    return (min(lows), max(highs)) if lows else None


def group_files(files: list[RoutesFile]) -> list[tuple[int, int, list[RoutesFile]]]:
    """Files sorted by first seq_id, joined while their ranges overlap: [(first, last, files)]
    with disjoint ranges, so each sequence's rows are in exactly one group."""
    groups: list[tuple[int, int, list[RoutesFile]]] = []
    for f in files:
        if groups and f.first <= groups[-1][1]:
            first, last, members = groups[-1]
            groups[-1] = (first, max(last, f.last), members + [f])
        else:
            groups.append((f.first, f.last, [f]))
    return groups


def files_holding(files: list[RoutesFile], seq_ids: np.ndarray) -> list[RoutesFile]:
    """The files whose seq_id range holds at least one of `seq_ids` (sorted)."""
    seq_ids = np.asarray(seq_ids, np.int64)
    out = []
    for f in files:
        at = np.searchsorted(seq_ids, f.first)
        if at < len(seq_ids) and seq_ids[at] <= f.last:
            out.append(f)
    return out


def pair_units(files_a: list[RoutesFile], files_b: list[RoutesFile], seq_a: np.ndarray, seq_b: np.ndarray
               ) -> list[tuple[np.ndarray, tuple[RoutesFile, ...], tuple[RoutesFile, ...]]]:
    """Units over aligned sequence pairs (pair i: A's sequence seq_a[i], B's seq_b[i]):
    [(pair indices ascending, A's files, B's files)], one per group of the trace with fewer
    routes files (its files with overlapping seq_id ranges joined) holding a pair, with the
    other trace's files holding the twins. Each file of that trace is read by one unit, each
    file of the other by the units whose sequences it holds (two when it straddles a boundary
    of the first), never once per MoE layer."""
    seq_a, seq_b = np.asarray(seq_a, np.int64), np.asarray(seq_b, np.int64)
    a_leads = len(files_a) <= len(files_b)
    lead_files, other_files = (files_a, files_b) if a_leads else (files_b, files_a)
    lead_seq, other_seq = (seq_a, seq_b) if a_leads else (seq_b, seq_a)
    order = np.argsort(lead_seq, kind="stable")
    sorted_seq = lead_seq[order]
    units = []
    for first, last, members in group_files(lead_files):
        lo, hi = np.searchsorted(sorted_seq, first), np.searchsorted(sorted_seq, last, side="right")
        if lo == hi:
            continue
        pairs = np.sort(order[lo:hi])
        others = tuple(files_holding(other_files, np.unique(other_seq[pairs])))
        units.append((pairs, tuple(members), others) if a_leads else (pairs, others, tuple(members)))
    return units


def read_routes(files: tuple[RoutesFile, ...], columns: list[str], seq_ids: np.ndarray) -> pa.Table:
    """The rows of `seq_ids` (sorted) in `files` (each checked against the manifest), `columns`
    only (those the files have)."""
    import pyarrow.compute as pc

    parts = []
    for f in files:
        table = read_parquet(f.path, columns, f.expected)
        keep = pc.is_in(table.column("seq_id").cast(pa.int64()), value_set=pa.array(np.asarray(seq_ids, np.int64)))
        parts.append(table.filter(keep))
    if not parts:
        return pa.table({c: pa.array([], pa.int64()) for c in columns})
    return pa.concat_tables(parts, promote_options="default")
