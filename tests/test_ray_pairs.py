"""`analyze compare` and `analyze agreement` on a counting engine (in process and on a local Ray
cluster) equal the single-process run: counts exactly, floats to 1e-12; with the shards read at
the traces' paths and through a file:// URI; with --where; and with one clear line for a bad
--num-workers or an unreachable --ray-address."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

import moescope
from moescope.analysis.agreement_run import agreement
from moescope.analysis.engine import use_engine
from moescope.analysis.ray_counts import RayCounting, ShardCounting
from moescope.analysis.routing_inputs import compare_traces
from moescope.store.tables import write_trace

E, K, LAYERS = 8, 2, [0, 1, 2]


def _flat(value, prefix=""):
    """Every number (and string) of a results dict, keyed by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}[{i}]").items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return {prefix: value}
    return {prefix: float(value)}


def assert_same_values(a: dict, b: dict) -> None:
    """Identical keys, text and integers; floats equal to 1e-12."""
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        x, y = fa[key], fb[key]
        if isinstance(x, float) and isinstance(y, float):
            assert (np.isnan(x) and np.isnan(y)) or abs(x - y) <= 1e-12, (key, x, y)
        else:
            assert x == y, (key, x, y)


# -- traces --------------------------------------------------------------------------------------
def _corpus(n_seq: int, rng: np.random.Generator, words: int = 12, n_gen: int = 3) -> tuple[list[str], dict]:
    """Texts of 'wNN ' words (one token per word and per space) and generated tokens after them."""
    texts, cols = [], {k: [] for k in ("seq_id", "pos", "token_id", "phase", "char_start", "char_end")}
    for s in range(n_seq):
        text, pos = "", 0
        for w in rng.integers(0, 30, words):
            for piece, tid in ((f"w{w:02d}", int(w)), (" ", 30)):
                for key, value in zip(cols, (s, pos, tid, "prompt", len(text), len(text) + len(piece))):
                    cols[key].append(value)
                text += piece
                pos += 1
        for g in range(n_gen):
            for key, value in zip(cols, (s, pos, 31 + int(rng.integers(0, 3)), "generated", -1, -1)):
                cols[key].append(value)
            pos += 1
        texts.append(text)
    return texts, {k: np.array(v) for k, v in cols.items()}


def _experts(rng: np.random.Generator, n: int) -> np.ndarray:
    scores = rng.random((n, E)) * np.linspace(1.0, 2.0, E)
    return np.argsort(-scores, axis=1)[:, :K]


def _write(path, texts, tokens, experts_by_layer, *, shard_rows, logits=None, labels=None):
    n = len(tokens["seq_id"])
    routes = {"seq_id": np.tile(tokens["seq_id"], len(LAYERS)).astype(np.uint32),
              "pos": np.tile(tokens["pos"], len(LAYERS)).astype(np.uint32),
              "layer": np.repeat(LAYERS, n).astype(np.uint16),
              "experts": pa.array([list(r) for layer in LAYERS for r in experts_by_layer[layer].astype(np.uint8)],
                                  pa.list_(pa.uint8()))}
    if logits is not None:
        routes["router_logits"] = pa.array([list(r) for layer in LAYERS for r in logits[layer]], pa.list_(pa.float16()))
    routes = pa.table(routes)
    order = np.lexsort((routes.column("layer").to_numpy(), routes.column("pos").to_numpy(),
                        routes.column("seq_id").to_numpy()))
    tok = pa.table({"seq_id": tokens["seq_id"].astype(np.uint32), "pos": tokens["pos"].astype(np.uint32),
                    "token_id": tokens["token_id"].astype(np.uint32), "phase": tokens["phase"],
                    "char_start": tokens["char_start"].astype(np.int32), "char_end": tokens["char_end"].astype(np.int32)})
    seq_ids = np.unique(tokens["seq_id"])
    seqs = pa.table({"seq_id": seq_ids.astype(np.uint32), "text": [texts[int(s)] for s in seq_ids],
                     "label": labels if labels is not None else ["x"] * len(seq_ids)})
    write_trace(path, routes=routes.take(pa.array(order)), tokens=tok, sequences=seqs, shard_rows=shard_rows,
                overwrite=True, model={"n_experts": E, "top_k": K, "moe_layers": LAYERS},
                capture={"expert_ids": "logical"})
    return moescope.open_trace(path)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """compare: A and B = A relabelled (a planted permutation) with 30% re-drawn, shards of other
    sizes. agreement: A, and its 'replay' B with other seq_ids, other shards, 10% of rows flipped,
    one sequence cut short (a prefix-only pair), one missing; router logits in A."""
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("pairs")
    n_seq = 16
    texts, tokens = _corpus(n_seq, rng)
    n = len(tokens["seq_id"])
    labels = ["code" if s % 2 else "prose" for s in range(n_seq)]
    a = {layer: _experts(rng, n) for layer in LAYERS}
    perm = rng.permutation(E)
    b = {layer: np.where(rng.random((n, 1)) < 0.3, _experts(rng, n), perm[a[layer]]) for layer in LAYERS}
    logits = {layer: rng.normal(size=(n, E)).astype(np.float16) for layer in LAYERS}
    out = {"cmp_a": _write(root / "cmp_a", texts, tokens, a, shard_rows=150, logits=logits, labels=labels),
           "cmp_b": _write(root / "cmp_b", texts, tokens, b, shard_rows=400, labels=labels)}
    # the replay: seq ids reversed, sequence 3 missing, sequence 5 diverging after 10 tokens
    keep = tokens["seq_id"] != 3
    cut = (tokens["seq_id"] == 5) & (tokens["pos"] >= 10)
    ids_b = {k: v[keep].copy() for k, v in tokens.items()}
    ids_b["token_id"][cut[keep]] = 35
    ids_b["seq_id"] = 100 - ids_b["seq_id"]
    flipped = {layer: np.where(rng.random((n, 1)) < 0.1, _experts(rng, n), a[layer])[keep] for layer in LAYERS}
    texts_b = {100 - s: t for s, t in enumerate(texts)}
    out["agr_b"] = _write(root / "agr_b", texts_b, ids_b, flipped, shard_rows=500,
                          labels=["code" if (100 - s) % 2 else "prose" for s in np.unique(ids_b["seq_id"])])
    assert len(out["cmp_a"].files("routes")) >= 4 and len(out["agr_b"].files("routes")) >= 2
    return out


def _agree(a, b, **kw):
    return agreement(a, b, figures=False, **kw).values


def _compare(a, b, **kw):
    return compare_traces(a, b, seed=1, shuffles=5, **kw).values


# -- in process: the engine path equals the single-process path ---------------------------------------
@pytest.mark.parametrize("order", ["B leads", "A leads"])
def test_compare_from_units_equals_the_single_process_run(traces, order):
    """Units are led by the trace with fewer routes files (B here): both ways round."""
    a, b = (traces["cmp_a"], traces["cmp_b"]) if order == "B leads" else (traces["cmp_b"], traces["cmp_a"])
    single = _compare(a, b)
    with use_engine(ShardCounting()):
        mapped = _compare(a, b)
    assert single["per_layer_overlap_matched_crossfit"][0] > 0.6  # the planted agreement is there to find
    assert_same_values(single, mapped)


def test_agreement_counts_are_the_sum_over_units(traces):
    """The trap for a per-unit merge: B's sequences are in another order (reversed seq ids), so a
    unit of A's sequences reads B's files elsewhere; the counts still equal a direct count."""
    v = _agree(traces["cmp_a"], traces["agr_b"])
    reverse = _agree(traces["agr_b"], traces["cmp_a"])  # the other trace leads the units
    assert reverse["per_layer_n"] == v["per_layer_n"] and reverse["set_agreement"] == v["set_agreement"]
    assert v["alignment"]["n_sequence_pairs"] == 15 and v["alignment"]["n_pairs_prefix_only"] == 1
    assert 0.85 < v["set_agreement"] < 0.95 and "margin" in v and len(v["worst_tokens"]) == 20
    # the direct count: every routed (seq, pos, layer) of A against its twin in B, by brute force
    a = traces["cmp_a"].table("routes", ["seq_id", "pos", "layer", "experts"]).to_pylist()
    b = {(100 - r["seq_id"], r["pos"], r["layer"]): set(r["experts"])
         for r in traces["agr_b"].table("routes", ["seq_id", "pos", "layer", "experts"]).to_pylist()}
    same = sum(1 for r in a if r["seq_id"] != 3 and not (r["seq_id"] == 5 and r["pos"] >= 10)
               and set(r["experts"]) == b[(r["seq_id"], r["pos"], r["layer"])])
    assert sum(v["per_layer_n"]) * v["set_agreement"] == pytest.approx(same)


def test_agreement_reads_each_routes_file_once(traces, monkeypatch):
    """Item of the issue: one read per trace file, not one per MoE layer."""
    import moescope.analysis.trace_pairs as tp

    seen: list[str] = []
    real = tp.read_parquet
    monkeypatch.setattr(tp, "read_parquet", lambda path, *a, **k: seen.append(path) or real(path, *a, **k))
    _agree(traces["cmp_a"], traces["agr_b"])
    a, b = traces["cmp_a"].files("routes"), traces["agr_b"].files("routes")
    assert set(b) <= set(seen) <= set(a + b)  # (an A file of sequence 3 alone, which has no twin, is not read)
    assert all(seen.count(f) == 1 for f in b)  # the trace with fewer files leads: one read per file
    assert all(seen.count(f) <= 2 for f in a)  # the other: twice where it straddles a boundary
    assert len(seen) < 1.5 * len(a + b) < len(LAYERS) * len(a + b)


@pytest.mark.parametrize("extra, needle", [(["--engine", "ray", "--num-workers", "0"], "at least 1"),
                                           (["--num-workers", "2"], "need --engine ray"),
                                           (["--shards-at-b", "/elsewhere"], "need --engine ray"),
                                           (["--engine", "ray", "--ray-address", "nonsense"], "host:port"),
                                           (["--engine", "ray", "--ray-address", "127.0.0.1:1"], "cannot reach")])
@pytest.mark.parametrize("command", ["compare", "agreement"])
def test_engine_errors_are_one_line(traces, tmp_path, capsys, command, extra, needle):
    """(Before the Ray cluster of this module starts: a process already connected ignores --ray-address.)"""
    from test_cli_errors import assert_one_line_error, run_cli

    b = traces["cmp_b" if command == "compare" else "agr_b"].path
    code, err = run_cli(["analyze", command, str(traces["cmp_a"].path), str(b), "--out", str(tmp_path / "o"), *extra],
                        capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


# -- on a local Ray cluster: one start for the module ---------------------------------------------------
def test_on_ray_compare_and_agreement_equal_the_single_process_run(traces, ray_cluster):
    """Shards read at the traces' paths and through file:// URIs; both analyses, one cluster."""
    a, b, r = traces["cmp_a"], traces["cmp_b"], traces["agr_b"]
    single_cmp, single_agr = _compare(a, b), _agree(a, r)
    uris = (f"file://{os.path.abspath(a.path)}", f"file://{os.path.abspath(b.path)}")
    with use_engine(RayCounting(num_workers=2)):
        assert_same_values(single_cmp, _compare(a, b))
        assert_same_values(single_cmp, _compare(a, b, locations=uris))
        assert_same_values(single_agr, _agree(a, r))
        assert_same_values(single_agr, _agree(a, r, locations=(uris[0], f"file://{os.path.abspath(r.path)}")))


def test_on_ray_a_damaged_copy_stops_with_its_path(traces, ray_cluster, tmp_path):
    """--shards-at-b pointing at a copy with one damaged shard: the task's TraceError, one line."""
    import shutil

    from moescope.errors import TraceError

    copy = tmp_path / "copy"
    shutil.copytree(traces["agr_b"].path, copy)
    victim = sorted((copy / "routes").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-9] + b"corrupted")
    with use_engine(RayCounting(num_workers=2)), pytest.raises(TraceError, match="SHA-256") as err:
        _agree(traces["cmp_a"], traces["agr_b"], locations=(None, str(copy)))
    assert len(str(err.value).splitlines()) == 1


def test_on_ray_the_cli_keeps_where(traces, ray_cluster, tmp_path, capsys):
    """`--where` selects the sequences on Ray as in process (compare and agreement, one CLI run each)."""
    from test_cli_errors import run_cli

    a, b, r = (str(traces[k].path) for k in ("cmp_a", "cmp_b", "agr_b"))
    runs = {}
    for name, args in (("compare", ["compare", a, b, "--shuffles", "3"]), ("agreement", ["agreement", a, r])):
        for engine, extra in (("local", []), ("ray", ["--engine", "ray", "--num-workers", "2"])):
            out = tmp_path / f"{name}-{engine}"
            code, err = run_cli(["analyze", *args, "--where", "label = 'code'", "--out", str(out), *extra], capsys)
            assert code in (0, None), err
            body = json.loads((out / "results.json").read_text())
            runs[name, engine] = {k: v for k, v in body.items() if k not in ("params", "figures")}
    for name in ("compare", "agreement"):
        assert_same_values(runs[name, "local"], runs[name, "ray"])
    assert runs["agreement", "ray"]["alignment"]["n_sequence_pairs"] == 7  # the odd seq ids of A but 3 (no twin)
    assert runs["compare", "ray"]["alignment"]["n_sequences"] == 8
