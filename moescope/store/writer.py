"""Streaming, atomic, resumable writing of a trace directory.

Memory is bounded by the shard size: tables are buffered until the routes rows reach
``shard_rows``, then written as one shard group (one Parquet file per table), each file
renamed into place, then listed in the manifest. A capture killed at any moment leaves a
manifest that lists only whole shards; reopening the directory with the same fingerprint
deletes the leftovers and reports which input records are already done.

Shards may also be written by other processes (distributed capture workers write their
chunk's files with :func:`write_shard_file`) and committed here with
:meth:`TraceWriter.commit`: this object stays the only writer of the manifest. Done input
is therefore a set of ranges (:attr:`TraceWriter.done_ranges`), not only a prefix.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moescope.errors import TraceError
from moescope.schema import FORMAT_NAME, FORMAT_VERSION, TABLES
from moescope.store.lock import LOCK_FILE, TraceLock
from moescope.store.manifest import (MANIFEST, _fsync_dir, identity_differences, read_manifest, sha256_file,
                                     write_manifest)

DEFAULT_SHARD_ROWS = 1 << 21  # ~2M token-layer rows: ~50 MB in memory, ~30 MB on disk for k=8
PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True)

# The routes table is most of a trace's bytes, so its columns get their own encodings
# (measured in benchmarks/bench_trace_size.py; every one is plain Parquet that pyarrow,
# DuckDB and Polars read, and none changes a value or a type):
# - seq_id, pos, layer: sorted, slowly changing integers -> DELTA_BINARY_PACKED;
# - expert ids: dictionary (bit-packs ids at ceil(log2 E) bits), then zstd 12;
# - weights (float16): no dictionary (up to 2^16 distinct values: it only adds a page),
#   PLAIN + zstd 6. BYTE_STREAM_SPLIT would save ~0.9 byte more per row, but DuckDB 2.0
#   refuses it on float16 (FIXED_LEN_BYTE_ARRAY) columns.
ROUTES_ENCODINGS = {"seq_id": "DELTA_BINARY_PACKED", "pos": "DELTA_BINARY_PACKED", "layer": "DELTA_BINARY_PACKED",
                    "weights.list.element": "PLAIN"}
ROUTES_LEVELS = {"experts.list.element": 12, "weights.list.element": 6}


def parquet_options(table_name: str, table: pa.Table) -> dict[str, Any]:
    """pyarrow.parquet.write_table options for a shard of `table_name` holding `table`."""
    if table_name != "routes":
        return dict(PARQUET_OPTIONS)
    leaves = [f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name for f in table.schema]
    # delta only where the writer gave integers (other tools may write traces; see schema.py)
    integer = {f.name for f in table.schema if pa.types.is_integer(f.type)}
    encodings = {c: e for c, e in ROUTES_ENCODINGS.items()
                 if c in leaves and (e != "DELTA_BINARY_PACKED" or c in integer)}
    return dict(
        PARQUET_OPTIONS,
        use_dictionary=[c for c in leaves if c not in encodings],
        column_encoding=encodings,
        compression_level={c: ROUTES_LEVELS.get(c, PARQUET_OPTIONS["compression_level"]) for c in leaves},
    )


def write_shard_file(trace_dir: str | os.PathLike, table_name: str, stem: str, table: pa.Table) -> dict[str, Any]:
    """Write `table` atomically as TRACE/<table_name>/<stem>.parquet (temporary name, fsync,
    rename). Returns the manifest's file entry: path (relative), rows, bytes, sha256.

    Safe to call from any process: it never touches the manifest, and rewriting the same
    stem replaces the file whole (a retried worker task leaves no mix of two attempts).
    """
    directory = Path(trace_dir) / table_name
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{stem}.parquet"
    tmp = directory / f".{stem}.parquet.{os.getpid()}.tmp"  # per process: two writers never share a temp file
    pq.write_table(table, tmp, **parquet_options(table_name, table))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    return {
        "path": f"{table_name}/{final.name}",
        "rows": table.num_rows,
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
    }


def seq_id_first_last(table: pa.Table | None) -> list[int]:
    """[first, last] seq_id of a sequences table as written ([] when empty)."""
    if table is None or not table.num_rows:
        return []
    col = table.column("seq_id")
    return [int(col[0].as_py()), int(col[-1].as_py())]


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged [start, end) ranges (touching ranges are joined)."""
    out: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


class TraceWriter:
    """Writes shard groups into a trace directory and keeps its manifest current.

    Args:
        path: the trace directory (created if missing).
        header: manifest fields describing the model, tokenizer and capture options.
        fingerprint: identity of (model, input, options); a directory holding a trace with
            another fingerprint is refused rather than mixed or overwritten (naming the fields
            that differ when both headers carry an ``identity``).
        shard_rows: routes rows per shard (the memory bound).
        overwrite: delete whatever trace is at `path` first.
        shard_info: fields recorded in every shard this writer commits (e.g. the batch size
            of this run, which a resume may change).

    The writer holds an exclusive lock on the directory (:class:`~moescope.store.lock.TraceLock`)
    from construction to :meth:`finish` or :meth:`close`: a second writer is refused.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        header: dict[str, Any],
        fingerprint: str,
        *,
        shard_rows: int = DEFAULT_SHARD_ROWS,
        overwrite: bool = False,
        shard_info: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.shard_rows = shard_rows
        self.shard_info = dict(shard_info or {})
        self._buffers: dict[str, list[pa.Table]] = {t: [] for t in TABLES}
        self._buffered_routes = 0
        self._buffered_sequences = 0
        self._buffer_start = 0  # input range [_buffer_start, _cursor) of what is buffered
        self._cursor = 0
        if not overwrite and not (self.path / MANIFEST).exists() and _has_entries(self.path):
            raise TraceError(f"{self.path} exists and is not a trace; choose an empty or new --out directory")
        self.lock = TraceLock(self.path)
        try:
            if overwrite:
                _empty_directory(self.path)
            self.manifest = self._open(header, fingerprint)
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        """Release the directory lock (idempotent); what is committed stays committed."""
        self.lock.release()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening / resuming -------------------------------------------------------------
    def _open(self, header: dict[str, Any], fp: str) -> dict[str, Any]:
        if (self.path / MANIFEST).exists():
            manifest = read_manifest(self.path)
            if manifest.get("fingerprint") != fp:
                raise TraceError(_mismatch(self.path, header.get("identity"), manifest.get("identity")))
            self._remove_unlisted(manifest)
            self.manifest = manifest
            self._cursor = self._buffer_start = self.input_done
            return manifest
        if _has_entries(self.path):
            raise TraceError(f"{self.path} exists and is not a trace; choose an empty or new --out directory")
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fingerprint": fp,
            "complete": False,
            **header,
            "shards": [],
        }
        write_manifest(self.path, manifest)
        return manifest

    def _remove_unlisted(self, manifest: dict[str, Any]) -> None:
        listed = {f["path"] for s in manifest["shards"] for f in s["files"].values()}
        for table in TABLES:
            d = self.path / table
            if not d.is_dir():
                continue
            for f in d.iterdir():
                if f"{table}/{f.name}" not in listed:
                    f.unlink()

    @property
    def done_ranges(self) -> list[tuple[int, int]]:
        """Input ranges [start, end) (records in processing order) in committed shards, merged."""
        return merge_ranges([(s["input_start"], s["input_end"]) for s in self.manifest["shards"]])

    @property
    def input_done(self) -> int:
        """How many input records from the first on are in committed shards (the done prefix)."""
        done = self.done_ranges
        return done[0][1] if done and done[0][0] == 0 else 0

    def pending(self, total: int) -> list[tuple[int, int]]:
        """The input ranges [start, end) of `total` records that no committed shard holds."""
        gaps, cursor = [], 0
        for start, end in self.done_ranges:
            if start > cursor:
                gaps.append((cursor, min(start, total)))
            cursor = max(cursor, end)
        if cursor < total:
            gaps.append((cursor, total))
        return [(a, b) for a, b in gaps if b > a]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    # -- writing ------------------------------------------------------------------------
    def add(self, tables: dict[str, pa.Table], input_end: int, n_sequences: int, input_start: int | None = None) -> None:
        """Buffer the tables of a batch of sequences; write a shard when the buffer is full.

        The batch holds input records [input_start, input_end) (`input_start` defaults to
        where the previous batch ended). A batch that does not continue the buffered
        range first flushes it, so every shard covers one contiguous input range.
        """
        start = self._cursor if input_start is None else input_start
        if start != self._cursor and (self._buffered_sequences or any(self._buffers.values())):
            self.flush()
        if not self._buffered_sequences and not any(self._buffers.values()):
            self._buffer_start = start
        for name, table in tables.items():
            if table is not None and table.num_rows:
                self._buffers[name].append(table)
        self._buffered_routes += tables["routes"].num_rows if tables.get("routes") is not None else 0
        self._buffered_sequences += n_sequences
        self._cursor = input_end
        if self._buffered_routes >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tables as one shard group and commit it in the manifest."""
        if self._buffered_sequences == 0 and not any(self._buffers.values()):
            return
        index = self._next_index()
        files: dict[str, dict[str, Any]] = {}
        seq_ids: list[int] = []
        for name in TABLES:
            parts = self._buffers[name]
            if not parts:
                continue
            table = pa.concat_tables(parts, promote_options="default")
            if name == "sequences":
                seq_ids = seq_id_first_last(table)
            files[name] = write_shard_file(self.path, name, f"part-{index:05d}", table)
        self._append(index, self._buffer_start, self._cursor, self._buffered_sequences, seq_ids, files)
        self._buffers = {t: [] for t in TABLES}
        self._buffered_routes = 0
        self._buffered_sequences = 0
        self._buffer_start = self._cursor

    def commit(self, files: dict[str, dict[str, Any]], input_start: int, input_end: int, n_sequences: int,
               seq_ids: list[int] | None = None) -> dict[str, Any]:
        """Commit shard files written by another process (see :func:`write_shard_file`) as
        one shard holding input records [input_start, input_end). Returns the shard entry.

        TraceError if a file is missing, lies outside the trace, or the range overlaps a
        committed shard (committing it would record those sequences twice).
        """
        for table, info in files.items():
            rel = Path(info["path"])
            if table not in TABLES or rel.parent.as_posix() != table or rel.name.startswith("."):
                raise TraceError(f"shard file {info['path']!r} is not a {table} shard of a trace")
            path = self.path / rel
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                raise TraceError(f"{path} is missing or not the file the worker wrote; rerun the same command")
        for start, end in self.done_ranges:
            if input_start < end and start < input_end:
                raise TraceError(
                    f"input records {input_start}-{input_end} overlap records {start}-{end} already in {self.path}"
                )
        return self._append(self._next_index(), input_start, input_end, n_sequences, seq_ids or [], dict(files))

    def _next_index(self) -> int:
        return max((s["index"] for s in self.manifest["shards"]), default=-1) + 1

    def _append(self, index: int, input_start: int, input_end: int, n_sequences: int, seq_ids: list[int],
                files: dict[str, dict[str, Any]]) -> dict[str, Any]:
        entry = {
            "index": index,
            "input_start": input_start,
            "input_end": input_end,
            "n_sequences": n_sequences,
            "seq_id_first_last": seq_ids,
            **self.shard_info,
            "files": files,
        }
        self.manifest["shards"] = self.manifest["shards"] + [entry]
        write_manifest(self.path, self.manifest)
        return entry

    def finish(self, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Flush what is buffered and mark the trace complete. Returns the manifest.

        Shards are listed in input order (distributed workers commit them as they finish),
        so readers see the records in file order. Call it once every writer is done: files
        the manifest does not list are deleted.
        """
        self.flush()
        self.manifest["shards"] = sorted(self.manifest["shards"], key=lambda s: (s["input_start"], s["index"]))
        self._remove_unlisted(self.manifest)  # e.g. a temp file of a worker that died: none is left behind
        totals = {"n_sequences": 0, "rows": {}}
        for shard in self.manifest["shards"]:
            totals["n_sequences"] += shard["n_sequences"]
            for name, f in shard["files"].items():
                totals["rows"][name] = totals["rows"].get(name, 0) + f["rows"]
        self.manifest["totals"] = totals
        if summary:
            self.manifest.update(summary)
        self.manifest["complete"] = True
        write_manifest(self.path, self.manifest)
        self.close()
        return self.manifest


def _has_entries(path: Path) -> bool:
    """Whether `path` is a directory holding anything besides a trace lock file."""
    return path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir())


def _empty_directory(path: Path) -> None:
    """Delete everything in `path` except its lock file (which the caller holds)."""
    for p in path.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _mismatch(path: Path, ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> str:
    """The one-line refusal to mix two captures, naming what differs when it is known."""
    what = "another model, input or options"
    if ours and theirs:
        diffs = identity_differences(ours, theirs)
        if diffs:
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            what = f"it differs in {shown}"
    elif ours and not theirs:
        what = "written by an older moescope or another tool, so its capture cannot be compared"
    return (f"{path} holds a different trace ({what}); rerun with what it was captured with to resume it, "
            "choose another --out, or pass --overwrite to replace it")
