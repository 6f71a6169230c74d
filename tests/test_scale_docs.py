"""docs/scale.md: the Polars query snippet and the in-process shard-map snippet run as written
on a small trace (the DuckDB and pandas snippets run in tests/test_importers.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import moescope
from moescope.testing.synthetic import labelled_trace

DOC = Path(__file__).resolve().parent.parent / "docs" / "scale.md"


def snippet(marker: str) -> str:
    """The one ```python block of docs/scale.md containing `marker`."""
    blocks = [b.split("```")[0] for b in DOC.read_text(encoding="utf-8").split("```python\n")[1:]]
    (code,) = [b for b in blocks if marker in b]
    return code


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("scale-docs")
    labelled_trace(base / "runs" / "olmoe", n_seq=24, seq_len=10, layers=3, n_experts=8, top_k=2)
    return base


def run(code: str, where: Path, monkeypatch) -> dict:
    monkeypatch.chdir(where)
    scope: dict = {}
    exec(compile(code, f"{DOC.name} snippet", "exec"), scope)
    return scope


def test_the_polars_snippet_runs_and_counts_every_routed_expert(workdir, monkeypatch):
    pytest.importorskip("polars")
    scope = run(snippet("import polars as pl"), workdir, monkeypatch)
    trace = moescope.open_trace(workdir / "runs" / "olmoe")
    n_rows = trace.scalar("SELECT count(*) FROM routes")
    assert int(scope["load"]["len"].sum()) == n_rows * trace.top_k
    assert int(scope["per_label"]["routed_tokens"].sum()) == n_rows
    assert set(scope["per_label"]["label"].to_list()) == {"a", "b", "c", "d"}
    first = trace.sql("SELECT weights[1] AS w FROM routes").arrow()
    first = first.read_all() if hasattr(first, "read_all") else first
    assert np.array_equal(np.sort(scope["top_weight"]["weights"].to_numpy()),
                          np.sort(first.column("w").to_numpy().astype(np.float32)))


def test_the_shard_map_snippet_runs(workdir, monkeypatch):
    scope = run(snippet("whole = count_routes("), workdir, monkeypatch)
    assert scope["whole"].scan.pairs.sum() > 0


def test_the_spark_snippet_runs_where_spark_is_installed(workdir, monkeypatch):
    """Skipped here (Spark is not a dependency); runs the snippet on a local path where it is."""
    pytest.importorskip("pyspark")
    code = snippet("from pyspark.sql").replace("s3a://bucket/traces/olmoe/routes/", "runs/olmoe/routes/")
    scope = run(code, workdir, monkeypatch)
    trace = moescope.open_trace(workdir / "runs" / "olmoe")
    assert scope["load"].groupBy().sum("count").collect()[0][0] == trace.scalar("SELECT count(*) FROM routes") * trace.top_k
