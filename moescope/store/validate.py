"""Check a trace directory end to end: every shard present, whole, and consistent."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from moescope.schema import required_columns
from moescope.store.reader import Trace, shard_problem


@dataclass
class Validation:
    """Problems found (empty means valid) and what was checked."""

    problems: list[str] = field(default_factory=list)
    checked_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(trace: Trace, *, checksums: bool = True) -> Validation:
    """Validate every shard of `trace`: files exist, checksums and row counts match the
    manifest, required columns are present, expert ids are in range, every routed token
    is in the tokens table, and no (seq_id, pos, layer) appears twice."""
    result = Validation()
    for shard in trace.manifest.get("shards", []):
        for table, info in shard["files"].items():
            path = trace.path / info["path"]
            result.checked_files += 1
            why = shard_problem(trace.path, info, checksum=checksums)
            if why:
                result.problems.append(f"{info['path']}: {why}")
                continue
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as exc:
                result.problems.append(f"{info['path']}: unreadable Parquet ({exc})")
                continue
            if meta.num_rows != info["rows"]:
                result.problems.append(f"{info['path']}: {meta.num_rows} rows, manifest says {info['rows']}")
            names = set(meta.schema.to_arrow_schema().names)
            missing = [c for c in required_columns(table) if c not in names]
            if missing:
                result.problems.append(f"{info['path']}: missing column(s) {', '.join(missing)}")
    if result.problems:
        return result
    result.problems += _content_checks(trace)
    return result


def _content_checks(trace: Trace) -> list[str]:
    problems = []
    limit = trace.n_experts * (2 if trace.model.get("zero_experts") else 1)
    bad_ids = trace.scalar(f"SELECT count(*) FROM (SELECT unnest(experts) AS e FROM routes) WHERE e >= {limit}")
    if bad_ids:
        problems.append(f"{bad_ids} expert ids are >= {limit} (the model has {trace.n_experts} experts)")
    layers = set(trace.moe_layers)
    seen = {row[0] for row in trace.rows("SELECT DISTINCT layer FROM routes")}
    if not seen <= layers:
        problems.append(f"routes name layers {sorted(seen - layers)} that the manifest does not list as MoE layers")
    dup = trace.scalar("SELECT count(*) FROM (SELECT seq_id, pos, layer FROM routes GROUP BY ALL HAVING count(*) > 1)")
    if dup:
        problems.append(f"{dup} (seq_id, pos, layer) keys appear more than once in routes")
    if trace.has("tokens"):
        orphans = trace.scalar(
            "SELECT count(*) FROM (SELECT DISTINCT seq_id, pos FROM routes) r "
            "ANTI JOIN tokens t ON r.seq_id = t.seq_id AND r.pos = t.pos"
        )
        if orphans:
            problems.append(f"{orphans} routed (seq_id, pos) have no row in tokens")
    if trace.has("sequences"):
        dup_seq = trace.scalar("SELECT count(*) - count(DISTINCT seq_id) FROM sequences")
        if dup_seq:
            problems.append(f"{dup_seq} sequences appear more than once")
    return problems


def trace_dir_size(path: Path) -> int:
    """Bytes on disk of every file under a trace directory."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
