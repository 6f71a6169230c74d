"""The routes table's Parquet encodings: lossless, smaller, and readable by plain pyarrow,
DuckDB and Polars; traces written with the earlier (format 1, all-default) options still read."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moescope
from moescope.store import writer as writer_mod
from moescope.store.tables import write_trace

N_TOKENS, LAYERS, E, K = 600, (0, 1, 3), 64, 8


def _routes(seed: int = 0) -> pa.Table:
    """Random top-k routing with softmax weights in float16, rows sorted like a capture's."""
    rng = np.random.default_rng(seed)
    seq = np.repeat(np.arange(N_TOKENS) // 50, len(LAYERS)).astype(np.uint32)
    pos = np.repeat(np.arange(N_TOKENS) % 50, len(LAYERS)).astype(np.uint32)
    layer = np.tile(np.array(LAYERS, np.uint16), N_TOKENS)
    logits = rng.normal(0, 0.5, (len(seq), E))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    experts = np.argsort(-probs, axis=1)[:, :K]
    weights = np.take_along_axis(probs, experts, 1).astype(np.float16)
    return pa.table({
        "seq_id": seq, "pos": pos, "layer": layer,
        "experts": pa.FixedSizeListArray.from_arrays(pa.array(experts.ravel().astype(np.uint8)), K).cast(pa.list_(pa.uint8())),
        "weights": pa.FixedSizeListArray.from_arrays(pa.array(weights.ravel()), K).cast(pa.list_(pa.float16())),
    })


MODEL = {"n_experts": E, "top_k": K, "moe_layers": list(LAYERS)}


@pytest.fixture(scope="module")
def routes() -> pa.Table:
    return _routes()


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory, routes):
    path = tmp_path_factory.mktemp("enc") / "trace"
    write_trace(path, routes=routes, model=MODEL)
    return path


def _bits(a: pa.ChunkedArray | pa.Array) -> np.ndarray:
    flat = (a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a).flatten()
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float16).view(np.uint16)


def test_the_routes_encodings_are_lossless_and_used(trace_dir, routes):
    [f] = sorted((trace_dir / "routes").glob("*.parquet"))
    meta = pq.ParquetFile(f).metadata.row_group(0)
    enc = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "DELTA_BINARY_PACKED" in enc["pos"]
    assert "RLE_DICTIONARY" in enc["experts.list.element"]
    assert "RLE_DICTIONARY" not in enc["weights.list.element"]
    back = moescope.open_trace(trace_dir).table("routes")
    assert back.schema.field("weights").type == pa.list_(pa.float16())  # the type stays float16
    assert back.select(["seq_id", "pos", "layer", "experts"]).equals(routes.select(["seq_id", "pos", "layer", "experts"]))
    assert np.array_equal(_bits(back.column("weights")), _bits(routes.column("weights")))  # bit for bit


def test_duckdb_and_polars_read_the_trace_exactly(trace_dir, routes):
    polars = pytest.importorskip("polars")
    glob = str(trace_dir / "routes" / "*.parquet")
    trace = moescope.open_trace(trace_dir)
    duck = trace.sql("SELECT seq_id, pos, layer, experts, weights FROM routes ORDER BY seq_id, pos, layer").arrow()
    duck = duck.read_all() if hasattr(duck, "read_all") else duck
    assert np.array_equal(duck.column("experts").combine_chunks().flatten().to_numpy(),
                          routes.column("experts").combine_chunks().flatten().to_numpy())
    assert np.array_equal(_bits(duck.column("weights")), _bits(routes.column("weights")))  # float16 -> float -> float16
    frame = polars.read_parquet(glob).sort(["seq_id", "pos", "layer"])
    assert frame["pos"].to_list() == routes.column("pos").to_pylist()
    assert np.array_equal(frame["experts"].explode().to_numpy(), routes.column("experts").combine_chunks().flatten().to_numpy())
    assert np.array_equal(frame["weights"].explode().to_numpy().astype(np.float16).view(np.uint16),
                          _bits(routes.column("weights")))


def test_the_routes_table_is_smaller_than_with_the_format_1_options(tmp_path, routes):
    new, old = tmp_path / "new.parquet", tmp_path / "old.parquet"
    pq.write_table(routes, new, **writer_mod.parquet_options("routes", routes))
    pq.write_table(routes, old, **writer_mod.PARQUET_OPTIONS)
    assert new.stat().st_size < old.stat().st_size


def test_a_trace_written_with_the_format_1_options_still_reads(tmp_path, monkeypatch, routes):
    monkeypatch.setattr(writer_mod, "parquet_options", lambda name, table: dict(writer_mod.PARQUET_OPTIONS))
    write_trace(tmp_path / "v1", routes=routes, model=MODEL)
    trace = moescope.open_trace(tmp_path / "v1")
    assert trace.manifest["format_version"] == 1
    back = trace.table("routes")
    assert back.select(["seq_id", "pos", "layer", "experts"]).equals(routes.select(["seq_id", "pos", "layer", "experts"]))
    assert np.array_equal(_bits(back.column("weights")), _bits(routes.column("weights")))
    assert trace.scalar("SELECT count(*) FROM routes") == routes.num_rows


def test_options_follow_the_columns_a_writer_gave():
    """Another tool's routes table: int64 ids, no weights, a float `layer` (out of spec but
    written): delta only on integer columns, nothing asked of absent ones."""
    table = pa.table({"seq_id": pa.array([0, 0, 1], pa.int64()), "pos": pa.array([0, 1, 0], pa.uint32()),
                      "layer": pa.array([0.0, 0.0, 0.0]), "experts": pa.array([[1, 2]] * 3, pa.list_(pa.uint8()))})
    opts = writer_mod.parquet_options("routes", table)
    assert opts["column_encoding"] == {"seq_id": "DELTA_BINARY_PACKED", "pos": "DELTA_BINARY_PACKED"}
    assert "layer" in opts["use_dictionary"] and "experts.list.element" in opts["use_dictionary"]
    import io

    pq.write_table(table, io.BytesIO(), **opts)  # writes
    assert writer_mod.parquet_options("tokens", table) == writer_mod.PARQUET_OPTIONS
