"""Streaming, atomic, resumable writing of a trace directory.

Memory is bounded by the shard size: tables are buffered until the routes rows reach
``shard_rows``, then written as one shard group (one Parquet file per table), each file
renamed into place, then listed in the manifest. A capture killed at any moment leaves a
manifest that lists only whole shards; reopening the directory with the same fingerprint
deletes the leftovers and reports how many input records are already done.
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
from moescope.store.manifest import MANIFEST, _fsync_dir, read_manifest, sha256_file, write_manifest

DEFAULT_SHARD_ROWS = 1 << 21  # ~2M token-layer rows: ~50 MB in memory, ~30 MB on disk for k=8
PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True)


class TraceWriter:
    """Writes shard groups into a trace directory and keeps its manifest current.

    Args:
        path: the trace directory (created if missing).
        header: manifest fields describing the model, tokenizer and capture options.
        fingerprint: identity of (model, input, options); a directory holding a trace with
            another fingerprint is refused rather than mixed or overwritten.
        shard_rows: routes rows per shard (the memory bound).
        overwrite: delete whatever trace is at `path` first.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        header: dict[str, Any],
        fingerprint: str,
        *,
        shard_rows: int = DEFAULT_SHARD_ROWS,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.shard_rows = shard_rows
        self._buffers: dict[str, list[pa.Table]] = {t: [] for t in TABLES}
        self._buffered_routes = 0
        self._buffered_sequences = 0
        self._input_end = 0
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.manifest = self._open(header, fingerprint)

    # -- opening / resuming -------------------------------------------------------------
    def _open(self, header: dict[str, Any], fp: str) -> dict[str, Any]:
        if (self.path / MANIFEST).exists():
            manifest = read_manifest(self.path)
            if manifest.get("fingerprint") != fp:
                raise TraceError(
                    f"{self.path} holds a different trace (another model, input or options); "
                    "choose another --out, or pass --overwrite to replace it"
                )
            self._remove_unlisted(manifest)
            self._input_end = manifest["shards"][-1]["input_end"] if manifest["shards"] else 0
            return manifest
        if self.path.exists() and any(self.path.iterdir()):
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
    def input_done(self) -> int:
        """How many input records (in processing order) are already in committed shards."""
        return self._input_end

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    # -- writing ------------------------------------------------------------------------
    def add(self, tables: dict[str, pa.Table], input_end: int, n_sequences: int) -> None:
        """Buffer the tables of a batch of sequences; write a shard when the buffer is full.

        `input_end` is the number of input records processed once this batch is committed.
        """
        for name, table in tables.items():
            if table is not None and table.num_rows:
                self._buffers[name].append(table)
        self._buffered_routes += tables["routes"].num_rows if tables.get("routes") is not None else 0
        self._buffered_sequences += n_sequences
        self._input_end = input_end
        if self._buffered_routes >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tables as one shard group and commit it in the manifest."""
        if self._buffered_sequences == 0 and not any(self._buffers.values()):
            return
        shards = self.manifest["shards"]
        index = shards[-1]["index"] + 1 if shards else 0
        input_start = shards[-1]["input_end"] if shards else 0
        files: dict[str, dict[str, Any]] = {}
        seq_ids: list[int] = []
        for name in TABLES:
            parts = self._buffers[name]
            if not parts:
                continue
            table = pa.concat_tables(parts, promote_options="default")
            if name == "sequences":
                col = table.column("seq_id")
                seq_ids = [int(col[0].as_py()), int(col[-1].as_py())] if table.num_rows else []
            files[name] = self._write_file(name, index, table)
        entry = {
            "index": index,
            "input_start": input_start,
            "input_end": self._input_end,
            "n_sequences": self._buffered_sequences,
            "seq_id_first_last": seq_ids,
            "files": files,
        }
        self.manifest["shards"] = shards + [entry]
        write_manifest(self.path, self.manifest)
        self._buffers = {t: [] for t in TABLES}
        self._buffered_routes = 0
        self._buffered_sequences = 0

    def _write_file(self, table_name: str, index: int, table: pa.Table) -> dict[str, Any]:
        directory = self.path / table_name
        directory.mkdir(exist_ok=True)
        final = directory / f"part-{index:05d}.parquet"
        tmp = directory / f".part-{index:05d}.parquet.tmp"
        pq.write_table(table, tmp, **PARQUET_OPTIONS)
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

    def finish(self, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Flush what is buffered and mark the trace complete. Returns the manifest."""
        self.flush()
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
        return self.manifest
