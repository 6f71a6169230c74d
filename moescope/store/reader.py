"""Reading a trace directory: Arrow datasets and DuckDB views over its shards.

    trace = moescope.open_trace("runs/olmoe")
    trace.sql("SELECT layer, count(*) FROM routes GROUP BY layer").df()
    routes = trace.table("routes", columns=["seq_id", "pos", "layer", "experts"])
    code = moescope.open_trace("runs/olmoe", where="label = 'code'")   # a selection of sequences

Nothing is loaded until asked for: views and datasets stream from the Parquet files.
A selection (``where``: a SQL predicate over the sequences table) restricts every view and
dataset of the trace to the selected sequences, so any analysis given the opened trace sees
only them. `moescope analyze ... --where` opens its traces this way (moescope.commands.selection).
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from moescope.errors import MoescopeError, TraceError
from moescope.schema import TABLES, required_columns
from moescope.store.manifest import read_manifest, sha256_file


class Trace:
    """A trace directory opened for reading.

    Attributes:
        path: the directory.
        manifest: the parsed manifest.json.
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False, verify: bool = True,
                 where: str | None = None) -> None:
        self.path = Path(path)
        self.verify = verify
        self._verified: set[str] = set()
        self.where = where.strip() if where and where.strip() else None
        self.manifest: dict[str, Any] = read_manifest(self.path)
        if not self.manifest.get("complete") and not allow_incomplete:
            raise TraceError(
                f"{self.path} is an unfinished capture; rerun the same `moescope capture` command to complete it"
            )
        if verify:  # every shard, before any analysis reads one (cost: docs/trace-format.md)
            for table in TABLES:
                self.files(table)
        if not self.files("routes"):
            raise TraceError(f"{self.path} has no routes shards; the trace is empty")
        if self.where is not None:
            self.selected_seq_ids  # check the predicate now: one clear line, before any analysis starts

    # -- what the trace describes ------------------------------------------------------
    @property
    def model(self) -> dict[str, Any]:
        return self.manifest.get("model", {})

    @property
    def n_experts(self) -> int:
        """Routed experts per MoE layer (E)."""
        return int(self.model["n_experts"])

    @property
    def top_k(self) -> int:
        """Experts chosen per token per layer (k)."""
        return int(self.model["top_k"])

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers this trace records, in model order: every MoE layer of the
        model, or those chosen at capture (``capture --layers``; the manifest's capture.layers)."""
        captured = self.manifest.get("capture", {}).get("layers")
        return [int(x) for x in (captured if captured is not None else self.model["moe_layers"])]

    @property
    def has_weights(self) -> bool:
        """False for traces whose source recorded expert ids only (e.g. serving-engine imports)."""
        return bool(self.manifest.get("capture", {}).get("has_weights", True))

    def require_weights(self, what: str) -> None:
        """TraceError unless the trace records routing weights; `what` names the analysis or
        measure that needs them (e.g. "weight-scaled expert load")."""
        require_weights(self, what)

    def has(self, table: str) -> bool:
        """Whether the trace has any shard of `table`."""
        return bool(self.files(table))

    # -- files ---------------------------------------------------------------------------
    def files(self, table: str) -> list[str]:
        """Absolute paths of the table's shards, in shard order.

        Every path handed out has been checked against the manifest (size and SHA-256, once
        per process) unless the trace was opened with ``verify=False``: a damaged shard is
        refused here, so no analysis reads one silently.
        """
        if table not in TABLES:
            raise TraceError(f"unknown table {table!r}; tables are {', '.join(TABLES)}")
        shards = self.manifest.get("shards")
        if shards is None:
            # Traces written by other programs may omit the shard list: take the directory.
            d = self.path / table
            return sorted(str(p) for p in d.glob("*.parquet")) if d.is_dir() else []
        entries = [s["files"][table] for s in shards if table in s["files"]]
        if self.verify and table not in self._verified:
            for info in entries:
                check_shard(self.path, info)
            self._verified.add(table)
        return [str(self.path / info["path"]) for info in entries]

    def dataset(self, table: str) -> ds.Dataset:
        """A pyarrow dataset over the table's shards (streams; nothing loaded yet), restricted
        to the selected sequences when the trace was opened with `where`."""
        files = self.files(table)
        if not files:
            raise TraceError(f"{self.path} has no {table} table (capture with the option that records it)")
        dataset = ds.dataset(files, format="parquet")
        if self.where is not None:
            dataset = dataset.filter(pc.field("seq_id").isin(self.selected_seq_ids))
        return dataset

    def table(self, table: str, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
        """Load (columns of) a table into memory as one Arrow table."""
        return self.dataset(table).to_table(columns=columns, filter=filter)

    def batches(self, table: str, columns: list[str] | None = None, batch_size: int = 1 << 18) -> Iterator[pa.RecordBatch]:
        """Stream a table in record batches of at most `batch_size` rows (bounded memory)."""
        yield from self.dataset(table).to_batches(columns=columns, batch_size=batch_size)

    # -- SQL -----------------------------------------------------------------------------
    @cached_property
    def con(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with one view per table present (routes, tokens, sequences, hidden),
        restricted to the selected sequences when the trace was opened with `where`."""
        con = duckdb.connect()
        if self.where is not None and not self.files("sequences"):
            raise TraceError(f"{self.path} has no sequences table, so `where` has nothing to select from")
        # sequences first: with a selection, the other views keep the rows of its seq_ids.
        for table in sorted(TABLES, key=lambda t: t != "sequences"):
            files = self.files(table)
            if files:
                listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
                source = f"read_parquet([{listing}], union_by_name=true)"
                if self.where is None:
                    body = f"SELECT * FROM {source}"
                elif table == "sequences":
                    check_predicate(self.where)
                    con.execute(f"CREATE VIEW all_sequences AS SELECT * FROM {source}")
                    try:
                        con.execute(f"CREATE VIEW sequences AS SELECT * FROM all_sequences WHERE ({self.where})")
                    except duckdb.Error as exc:
                        raise MoescopeError(
                            f"--where {self.where!r} does not run on the sequences table ({str(exc).splitlines()[0]}); "
                            f"its columns are {', '.join(self.columns_unfiltered('sequences'))}"
                        ) from None
                    continue
                else:
                    body = f"SELECT * FROM {source} WHERE seq_id IN (SELECT seq_id FROM sequences)"
                try:
                    con.execute(f"CREATE VIEW {table} AS {body}")
                except duckdb.Error as exc:
                    raise TraceError(
                        f"{self.path}: the {table} shards are unreadable ({str(exc).splitlines()[0]}); "
                        "run `moescope inspect` on it, and capture again if it is damaged"
                    ) from exc
        return con

    @cached_property
    def selected_seq_ids(self) -> pa.Array:
        """The seq_ids the `where` predicate selects (every seq_id of the sequences table
        without one), sorted.

        MoescopeError in one line for a predicate DuckDB cannot run (syntax, unknown column)
        or one that selects nothing."""
        try:
            ids = self.con.sql("SELECT DISTINCT seq_id FROM sequences ORDER BY seq_id").to_arrow_table().column("seq_id")
        except duckdb.Error as exc:  # e.g. a type mismatch found only when the predicate runs
            raise MoescopeError(
                f"--where {self.where!r} fails on the sequences table ({str(exc).splitlines()[0]}); "
                f"its columns are {', '.join(self.columns_unfiltered('sequences'))}"
            ) from None
        if self.where is not None and not len(ids):
            raise MoescopeError(f"--where {self.where!r} selects no sequence of {self.path}; loosen the predicate")
        return ids.combine_chunks()

    def columns_unfiltered(self, table: str) -> list[str]:
        """Column names of a table as stored (no selection applied)."""
        return list(ds.dataset(self.files(table), format="parquet").schema.names)

    def sql(self, query: str) -> "Relation":
        """A lazy DuckDB relation over the trace's views: ``.df()``, ``.arrow()`` (a
        materialised pyarrow Table), ``.pl()`` or ``.fetchall()`` it."""
        return Relation(self.con.sql(query))

    def rows(self, query: str, params: list | None = None) -> list[tuple]:
        """Run SQL over the trace's views and return every result row."""
        return self.con.execute(query, params or []).fetchall()

    def scalar(self, query: str, params: list | None = None) -> Any:
        """Run SQL over the trace's views and return the first column of the first row."""
        # fetchall, not fetchone: DuckDB 2 keeps a half-read result open and blocks the connection.
        rows = self.con.execute(query, params or []).fetchall()
        return rows[0][0] if rows else None

    def columns(self, table: str) -> list[str]:
        """Column names of a table as stored."""
        return list(self.dataset(table).schema.names)

    def check_columns(self, table: str, needed: list[str] | None = None) -> None:
        """TraceError naming any required (or `needed`) column the table lacks."""
        have = set(self.columns(table))
        missing = [c for c in (needed or required_columns(table)) if c not in have]
        if missing:
            raise TraceError(f"{self.path}: table {table} lacks column(s) {', '.join(missing)}")

    def __repr__(self) -> str:
        where = f", where={self.where!r}" if self.where else ""
        return f"Trace({str(self.path)!r}, model={self.model.get('name_or_path')!r}{where})"


class Relation:
    """A DuckDB relation whose ``.arrow()`` returns a materialised pyarrow Table.

    DuckDB 2's ``DuckDBPyRelation.arrow()`` returns a lazy RecordBatchReader that keeps the
    connection busy until drained: every later query on the same trace would block. Every
    other attribute is the relation's own (``df``, ``pl``, ``fetchall``, ``show``, ...).
    """

    def __init__(self, relation: duckdb.DuckDBPyRelation) -> None:
        self.relation = relation

    def arrow(self) -> pa.Table:
        """The whole result as a pyarrow Table."""
        return self.relation.to_arrow_table()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.relation, name)

    def __repr__(self) -> str:
        return repr(self.relation)


def check_predicate(where: str) -> None:
    """MoescopeError unless `where` is a single SQL expression (no `;`, no second statement)."""
    try:
        statements = duckdb.extract_statements(f"SELECT 1 WHERE ({where})")
    except duckdb.Error as exc:
        raise MoescopeError(f"--where {where!r} is not a valid SQL predicate ({str(exc).splitlines()[0]})") from None
    if len(statements) != 1:
        raise MoescopeError(f"--where {where!r} must be one SQL predicate such as \"label = 'code'\", not several statements")


def require_weights(trace: Trace, what: str) -> None:
    """TraceError naming the trace unless it records routing weights (imports from serving
    engines record expert ids only); `what` names what needs them."""
    if trace.has_weights and "weights" in trace.columns("routes"):
        return
    source = trace.manifest.get("capture", {}).get("source") or trace.manifest.get("capture", {}).get("mode")
    raise TraceError(
        f"{what} needs routing weights, but {trace.path} has none (its source{f' ({source})' if source else ''} "
        "recorded expert ids only); run it on a trace captured with `moescope capture`"
    )


def open_trace(path: str | os.PathLike, *, allow_incomplete: bool = False, verify: bool = True,
               where: str | None = None) -> Trace:
    """Open a trace directory for reading (DuckDB via `.sql()`, Arrow via `.table()`).

    With `verify` (the default) each table's shards are checked against the manifest (size,
    SHA-256) before their first use; `moescope inspect` opens with verify=False and reports
    every problem instead of stopping at the first.

    `where`: a SQL predicate over the sequences table (e.g. ``"label = 'code'"``, evaluated
    by DuckDB); the trace then shows only the selected sequences in every table. Without it,
    the predicate of an enclosing `moescope analyze ... --where` applies (see
    :func:`moescope.store.selection.active_where`).
    """
    from moescope.store.selection import active_where

    return Trace(path, allow_incomplete=allow_incomplete, verify=verify,
                 where=where if where is not None else active_where())


# Shards this process has already verified: (path, size, mtime_ns, inode, sha256). A file
# rewritten since has another size or mtime and is hashed again.
_VERIFIED: set[tuple] = set()


def shard_problem(trace_dir: Path, info: dict[str, Any], *, checksum: bool = True) -> str | None:
    """Why the file listed by manifest entry `info` cannot be trusted ("the file is missing", a
    size or SHA-256 unlike the manifest's; either may be absent for other writers), or None.
    checksum=False checks existence and size only. A file verified once (same path, size,
    mtime, inode and digest) is not hashed again in this process."""
    path = Path(trace_dir) / info["path"]
    try:
        st = path.stat()
    except OSError:
        return "the file is missing"
    expected = info.get("bytes")
    if expected is not None and st.st_size != expected:
        return f"{st.st_size:,} bytes, the manifest says {expected:,}"
    digest = info.get("sha256")
    if not digest or not checksum:
        return None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, digest)
    if key in _VERIFIED:
        return None
    if sha256_file(path) != digest:
        return "its checksum differs from the manifest's"
    _VERIFIED.add(key)
    return None


def check_shard(trace_dir: Path, info: dict[str, Any]) -> None:
    """TraceError naming the shard unless the file listed by manifest entry `info` exists and
    has the size and SHA-256 the manifest records (:func:`shard_problem`)."""
    why = shard_problem(trace_dir, info)
    if why:
        raise TraceError(_damaged(trace_dir, info["path"], why))


def _damaged(trace_dir: Path, shard: str, why: str) -> str:
    return (f"{trace_dir}: shard {shard} is damaged ({why}); nothing was computed from it. Capture the trace "
            f"again (the same `moescope capture` command with --overwrite), or see `moescope inspect {trace_dir}`")
