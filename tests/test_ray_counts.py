"""The counting pass as a map over shards (in process and on a local Ray cluster) equals the
in-process streaming pass: counts exactly, weight means to 1e-12."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

import moescope
from moescope.analysis.count_map import CountSpec, PartialCounts, count_shard, merge_counts
from moescope.analysis.engine import use_engine
from moescope.analysis.ray_counts import RayCounting, ShardCounting, shard_units
from moescope.analysis.routing_counts import count_routes, expert_load
from moescope.store.tables import write_trace
from moescope.testing.synthetic import generate_tables, stream_trace, _spec

SPEC = dict(n_seq=0, seq_len=12, layers=3, n_experts=8, top_k=2, generated=4, generated_bias=1.0,
            chained_layers=(1,), biased_layers=(2,), token_strength=0.5, vocab=40, seed=3)
ASKS = dict(scan=True, sequences=True, bucket_edges=[0, 4, 8], token_experts=True)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    """A synthetic trace of 7 shards with prompt and generated tokens, labels and weights."""
    path = tmp_path_factory.mktemp("shards") / "trace"
    stream_trace(path, rows=2400, chunk_rows=300, shard_rows=300, **{k: v for k, v in SPEC.items() if k != "n_seq"})
    return moescope.open_trace(path)


def assert_same_counts(a, b) -> None:
    sa, sb = a.scan, b.scan
    for name in ("n_rows", "load", "pairs", "transitions", "transition_tokens", "weight_hist", "weight_sum_hist"):
        assert np.array_equal(getattr(sa, name), getattr(sb, name)), name
    np.testing.assert_allclose(sa.weight_mean, sb.weight_mean, rtol=0, atol=1e-12)
    qa, qb = a.sequences, b.sequences
    assert np.array_equal(qa.seq_ids, qb.seq_ids) and np.array_equal(qa.bucket_edges, qb.bucket_edges)
    assert qa.counts.dtype == qb.counts.dtype
    assert np.array_equal(qa.counts, qb.counts) and np.array_equal(qa.n_tokens, qb.n_tokens)
    assert a.token_experts.keys() == b.token_experts.keys()
    for key in a.token_experts:
        assert np.array_equal(a.token_experts[key], b.token_experts[key]), key


def test_the_trace_has_several_shards_and_both_phases(trace):
    assert len(shard_units(trace)) >= 5
    assert trace.scalar("SELECT count(DISTINCT phase) FROM tokens") == 2


@pytest.mark.parametrize("phase", ["all", "prompt", "generated"])
def test_mapped_counts_equal_the_streaming_pass(trace, phase):
    local = count_routes(trace, phase=phase, **ASKS)
    with use_engine(ShardCounting()):
        mapped = count_routes(trace, phase=phase, **ASKS)
    assert local.scan.transitions.sum() > 0 and local.sequences.counts.sum() > 0
    assert_same_counts(local, mapped)


def test_shards_read_through_a_file_uri(trace):
    local = count_routes(trace, phase="prompt", **ASKS)
    with use_engine(ShardCounting(location=f"file://{os.path.abspath(trace.path)}")):
        mapped = count_routes(trace, phase="prompt", **ASKS)
    assert_same_counts(local, mapped)
    assert shard_units(trace, "s3://bucket/run/trace")[0].routes.startswith("s3://bucket/run/trace/routes/")


def test_expert_load_uses_the_engine(trace):
    with use_engine(ShardCounting()):
        mapped = expert_load(trace, phase="generated")
    local = expert_load(trace, phase="generated")
    assert np.array_equal(local[0], mapped[0]) and np.array_equal(local[1], mapped[1])


def test_merging_is_order_free(trace):
    spec = CountSpec(n_experts=8, top_k=2, layer_index=np.arange(3), phase="all", phase_filter=False, scan=True,
                     transitions=True, weights=True, weight_bins=10, token_experts=True,
                     sequences=True, edges=np.array([0]))
    parts = [count_shard(unit, spec) for unit in shard_units(trace)]
    forward, backward = PartialCounts(), PartialCounts()
    for p in parts:
        forward = merge_counts(forward, p)
    for p in reversed(parts):
        backward = merge_counts(p, backward)
    for name in ("pairs", "transitions", "weight_hist", "seq_ids", "seq_counts", "tok_n"):
        assert np.array_equal(getattr(forward, name), getattr(backward, name)), name
    assert forward.pairs.sum() == sum(p.pairs.sum() for p in parts)


def test_rows_out_of_order_within_shards_still_count_transitions(tmp_path):
    spec = _spec({**SPEC, "n_seq": 30, "generated": 0})
    tables = generate_tables(spec, np.arange(spec.n_seq))
    routes = tables["routes"]
    rng = np.random.default_rng(0)
    routes = routes.take(pa.array(rng.permutation(routes.num_rows)))  # write_trace keeps seq_id order only
    write_trace(tmp_path / "t", routes=routes, tokens=tables["tokens"], sequences=tables["sequences"],
                model=spec.model(), shard_rows=200)
    trace = moescope.open_trace(tmp_path / "t")
    assert len(shard_units(trace)) > 1
    local = count_routes(trace, **ASKS)
    with use_engine(ShardCounting()):
        mapped = count_routes(trace, **ASKS)
    assert local.scan.transitions.sum() > 0
    assert_same_counts(local, mapped)


# -- on a local Ray cluster ----------------------------------------------------------------------
def test_statistics_from_mapped_counts_equal_the_single_process_run(trace):
    from moescope.analysis.stats import routing_statistics

    with use_engine(ShardCounting()):
        mapped = routing_statistics(trace, label="label", permutations=20, figures=False)
    single = routing_statistics(trace, label="label", permutations=20, figures=False)
    assert _flat(mapped.values) == pytest.approx(_flat(single.values), abs=1e-12, nan_ok=True)


def test_counts_on_ray_equal_the_single_process_pass(trace, ray_cluster):
    from moescope.analysis.signatures import shared_counts

    local = shared_counts(trace, phase="prompt")
    with use_engine(RayCounting(num_workers=2)):
        mapped = shared_counts(trace, phase="prompt")
    assert_same_counts(local, mapped)


def _flat(value, prefix=""):
    """Every number of a results dict, keyed by its path (text is left out: only numbers differ by engine)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}[{i}]").items()}
    if isinstance(value, (bool, int, float)) or value is None:
        return {prefix: float("nan") if value is None else float(value)}
    return {}


@pytest.mark.slow
def test_the_cli_counts_on_ray(trace, ray_cluster, tmp_path):
    """`analyze stats --engine ray --num-workers 2` writes what the single-process run writes."""
    import json

    from typer.testing import CliRunner

    from moescope.cli import _register_commands, app

    _register_commands()
    args = ["analyze", "stats", str(trace.path), "--label", "label", "--permutations", "10"]
    runs = {}
    for name, extra in (("local", []), ("ray", ["--engine", "ray", "--num-workers", "2"])):
        res = CliRunner().invoke(app, args + ["--out", str(tmp_path / name)] + extra)
        assert res.exit_code == 0, res.output
        body = json.loads((tmp_path / name / "results.json").read_text())
        runs[name] = {k: v for k, v in body.items() if k not in ("params", "figures", "trace")}
    assert _flat(runs["ray"]) == pytest.approx(_flat(runs["local"]), abs=1e-12, nan_ok=True)


def test_engine_options_are_checked():
    from moescope.analysis.ray_counts import engine_for
    from moescope.errors import MoescopeError

    assert engine_for("local") is None
    assert engine_for("ray", 3).num_workers == 3
    with pytest.raises(MoescopeError, match="--engine"):
        engine_for("spark")
    with pytest.raises(MoescopeError, match="need --engine ray"):
        engine_for("local", num_workers=2)


def test_a_sample_of_sequences_and_sequences_split_between_files(tmp_path):
    """A trace written by another tool: no shard list, one sequence (and one token) cut between
    two routes files. Counts still equal the streaming pass's, with or without a sample."""
    import json

    import pyarrow.parquet as pq

    spec = _spec({**SPEC, "n_seq": 12})
    tables = generate_tables(spec, np.arange(spec.n_seq))
    write_trace(tmp_path / "t", routes=tables["routes"], tokens=tables["tokens"], sequences=tables["sequences"],
                model=spec.model())
    routes_dir = tmp_path / "t" / "routes"
    routes = pq.read_table(routes_dir / "part-00000.parquet")
    (routes_dir / "part-00000.parquet").unlink()
    cut = routes.num_rows // 2 + 1  # inside a token's layers, inside a sequence
    pq.write_table(routes.slice(0, cut), routes_dir / "a.parquet")
    pq.write_table(routes.slice(cut), routes_dir / "b.parquet")
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    del manifest["shards"]
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(manifest))
    trace = moescope.open_trace(tmp_path / "t")
    assert len(shard_units(trace)) == 2
    for only in (None, np.array([1, 5, 6, 7])):
        local = count_routes(trace, sequence_ids=only, **ASKS)
        with use_engine(ShardCounting()):
            mapped = count_routes(trace, sequence_ids=only, **ASKS)
        assert_same_counts(local, mapped)
    assert np.array_equal(mapped.sequences.seq_ids, [1, 5, 6, 7])


def test_a_damaged_shard_is_refused_not_counted(tmp_path):
    import shutil

    from moescope.errors import TraceError

    spec = _spec({**SPEC, "n_seq": 12})
    tables = generate_tables(spec, np.arange(spec.n_seq))
    write_trace(tmp_path / "t", routes=tables["routes"], tokens=tables["tokens"], sequences=tables["sequences"],
                model=spec.model(), shard_rows=100)
    trace = moescope.open_trace(tmp_path / "t")
    copy = tmp_path / "copy"  # e.g. the object-store copy --shards-at points to
    shutil.copytree(tmp_path / "t", copy)
    victim = sorted((copy / "routes").glob("*.parquet"))[1]
    victim.write_bytes(victim.read_bytes()[:-9] + b"corrupted")
    with use_engine(ShardCounting(location=str(copy))), pytest.raises(TraceError, match="SHA-256"):
        count_routes(trace)


@pytest.mark.parametrize("extra, needle", [(["--engine", "spark"], "--engine must be"),
                                           (["--num-workers", "2"], "need --engine ray"),
                                           (["--engine", "ray", "--num-workers", "0"], "at least 1")])
def test_engine_errors_are_one_line(trace, tmp_path, capsys, extra, needle):
    from test_cli_errors import assert_one_line_error, run_cli

    code, err = run_cli(["analyze", "stats", str(trace.path), "--out", str(tmp_path / "s"), *extra], capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "s").exists()


def _rows_per_layer(unit, spec):  # a pure per-shard function, as another analysis would write one
    from moescope.analysis.count_map import read_parquet

    layers = read_parquet(unit.routes, ["layer"]).column("layer").to_numpy()
    return np.bincount(layers, minlength=spec)


def test_the_generic_hook_folds_any_mergeable_counts(trace):
    total = ShardCounting().map_shards(shard_units(trace), _rows_per_layer, 3, lambda a, b: a + b, np.zeros(3, np.int64))
    assert total.tolist() == count_routes(trace, transitions=False).scan.n_rows.tolist()


def test_scaled_weights_get_the_same_histogram_range(tmp_path):
    """Routers that scale their weights (sums up to 2.5 here): the map finds the range per shard."""
    import pyarrow.compute as pc

    spec = _spec({**SPEC, "n_seq": 16, "generated": 0})
    tables = generate_tables(spec, np.arange(spec.n_seq))
    routes = tables["routes"]
    weights = routes.column("weights").combine_chunks()
    scaled = pc.multiply(pc.list_flatten(weights).cast(pa.float32()), 2.5).cast(pa.float16())
    offsets = weights.offsets
    routes = routes.set_column(routes.schema.get_field_index("weights"), "weights",
                               pa.ListArray.from_arrays(offsets, scaled))
    write_trace(tmp_path / "t", routes=routes, tokens=tables["tokens"], sequences=tables["sequences"],
                model=spec.model(), shard_rows=150)
    trace = moescope.open_trace(tmp_path / "t")
    local = count_routes(trace, **ASKS)
    with use_engine(ShardCounting()):
        mapped = count_routes(trace, **ASKS)
    assert local.scan.weight_max == mapped.scan.weight_max == 2.5
    assert_same_counts(local, mapped)


@pytest.mark.parametrize("phase", ["all", "generated"])
def test_where_selects_the_rows_the_workers_count(trace, phase):
    """The trap: workers read whole shards, so a `--where` selection must reach them; counting
    every sequence would still give plausible numbers, of the wrong sequences."""
    selected = moescope.open_trace(trace.path, where="label = 'a'")
    local = count_routes(selected, phase=phase, **ASKS)
    with use_engine(ShardCounting()):
        mapped = count_routes(selected, phase=phase, **ASKS)
    assert local.scan.n_rows.sum() < count_routes(trace, phase=phase, transitions=False).scan.n_rows.sum()
    assert_same_counts(local, mapped)
