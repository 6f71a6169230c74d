"""Known-answer tests of the routing statistics (moescope/analysis/stats.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

import moescope
from moescope.analysis.routing_counts import expert_load, scan_routes
from moescope.analysis.stats import (coactivation, coactivation_summary, load_summary, pair_null, routing_statistics,
                                     transitions)
from moescope.store.tables import write_trace
from moescope.testing.synthetic import labelled_trace, null_trace, token_routed_trace

MODEL = {"n_experts": 4, "top_k": 2, "moe_layers": [1, 3]}
# 4 tokens of one sequence; layer 3 = layer 1 with every expert id + 1 (mod 4)
SETS_L1 = [[0, 1], [0, 1], [0, 2], [1, 2]]
SETS_L3 = [[1, 2], [1, 2], [1, 3], [2, 3]]


def _hand_routes(layer_major: bool = False, weights: bool = True) -> dict:
    rows = [(0, pos, layer, sets[pos]) for pos in range(4) for layer, sets in ((1, SETS_L1), (3, SETS_L3))]
    if layer_major:
        rows.sort(key=lambda r: (r[2], r[1]))
    cols = {"seq_id": pa.array([r[0] for r in rows], pa.uint32()), "pos": pa.array([r[1] for r in rows], pa.uint32()),
            "layer": pa.array([r[2] for r in rows], pa.uint16()),
            "experts": pa.array([r[3] for r in rows], pa.list_(pa.uint8()))}
    if weights:
        cols["weights"] = pa.array([[0.75, 0.25]] * len(rows), pa.list_(pa.float16()))
    return cols


@pytest.fixture(scope="module")
def hand_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("hand")
    write_trace(path, routes=_hand_routes(), model=MODEL, overwrite=True)
    return moescope.open_trace(path)


def test_load_entropy_kl_dead_exact(hand_trace):
    load, n = expert_load(hand_trace)
    assert load.tolist() == [[3, 3, 2, 0], [0, 3, 3, 2]] and n.tolist() == [4, 4]
    s = load_summary(load, n, 2)
    h = -(2 * 3 / 8 * math.log2(3 / 8) + 2 / 8 * math.log2(2 / 8))
    assert s["entropy_bits"] == pytest.approx([h, h], abs=1e-12)
    assert s["kl_uniform_bits"] == pytest.approx([2 - h, 2 - h], abs=1e-12)
    assert s["normalised_entropy"] == pytest.approx([h / 2, h / 2])
    assert s["dead_experts"] == [[3], [0]] and s["n_rare"] == [0, 0]
    assert s["kl_uniform_chance_bits"][0] == pytest.approx((4 - 2) / (2 * 2 * 4 * math.log(2)))
    # rare: below 10% of the fair share
    rare = load_summary(np.array([[100, 100, 100, 1]]), np.array([150]), 2)
    assert rare["rare_experts"] == [[3]] and rare["dead_experts"] == [[]]


def test_pairs_transitions_weights_exact(hand_trace):
    scan = scan_routes(hand_trace)
    assert scan.pairs[0].tolist() == [[3, 2, 1, 0], [2, 3, 1, 0], [1, 1, 2, 0], [0, 0, 0, 0]]
    (t,) = transitions(scan)
    assert (t.from_layer, t.to_layer, t.n_tokens) == (1, 3, 4)
    # every token with expert a at layer 1 has a + 1 at layer 3
    for a in range(3):
        assert t.conditional[a, (a + 1) % 4] == 1.0
    assert scan.weight_mean == pytest.approx(np.array([[0.75, 0.25]] * 2))
    assert scan.weight_hist[0, 0].argmax() == 15 and scan.weight_hist[0, 1].argmax() == 5


def test_transitions_do_not_depend_on_row_order(tmp_path, hand_trace):
    write_trace(tmp_path / "t", routes=_hand_routes(layer_major=True), model=MODEL)
    shuffled = moescope.open_trace(tmp_path / "t")
    assert np.array_equal(transitions(shuffled)[0].counts, transitions(hand_trace)[0].counts)


def test_pair_null_is_exact_for_uniform_routing():
    E, k = 16, 4
    null = pair_null(np.full(E, k / E), k)
    off = ~np.eye(E, dtype=bool)
    assert null[off] == pytest.approx(k * (k - 1) / (E * (E - 1)), rel=1e-9)
    # degree preservation for uneven loads: each expert's expected pairs = r_a (k - 1)
    rates = np.array([0.9, 0.5, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3, 0.3, 0.2, 0.2])
    assert pair_null(rates, k).sum(axis=1) == pytest.approx(rates * (k - 1), rel=1e-6)


def test_tied_pair_far_above_one_independent_pairs_near_one(tmp_path):
    spec = dict(n_seq=100, seq_len=64, layers=2, n_experts=16, top_k=4, biased_layers=())
    tied = coactivation(moescope.open_trace(labelled_trace(tmp_path / "tied", tied_pairs=((0, 1),), **spec)))
    null = coactivation(moescope.open_trace(null_trace(tmp_path / "null", **spec)))
    for layer in tied:
        assert layer.ratio[0, 1] > 2.0
        assert 0.8 < layer.ratio[5, 9] < 1.3
        assert coactivation_summary(layer)["top_pairs"][0][:2] == [0, 1]
    for layer in null:
        off = layer.ratio[~np.eye(16, dtype=bool)]
        assert np.nanmean(off) == pytest.approx(1.0, abs=0.03)
        assert np.nanmax(off) < 1.5
        s = coactivation_summary(layer)
        assert s["dispersion"] == pytest.approx(s["dispersion_chance"], abs=0.2)


def test_planted_layer_mapping_and_dead_experts(tmp_path):
    path = labelled_trace(tmp_path / "t", layers=3, n_experts=16, top_k=2, biased_layers=(), chained_layers=(2,),
                          chain_shift=5, dead_experts=(3, 7))
    trace = moescope.open_trace(path)
    tr = transitions(trace)
    assert [(t.from_layer, t.to_layer) for t in tr] == [(0, 1), (1, 2)]
    live = [a for a in range(16) if a not in (3, 7)]
    assert all(tr[1].conditional[a, (a + 5) % 16] == 1.0 for a in live)
    assert tr[1].mi_bits > 20 * tr[1].mi_chance_bits
    assert tr[0].mi_bits < 2 * tr[0].mi_chance_bits  # independent layers: at chance
    load, n = expert_load(trace)
    s = load_summary(load, n, 2)
    assert s["dead_experts"][:2] == [[3, 7], [3, 7]]
    assert s["dead_experts"][2] == [(3 + 5) % 16, (7 + 5) % 16]


def test_token_purity_and_label_specialisation(tmp_path):
    token = routing_statistics(moescope.open_trace(token_routed_trace(tmp_path / "tok", vocab=64)),
                               min_token_count=5, figures=False).values["token_specialisation"]
    assert min(token["token_purity"]) == 1.0
    assert max(token["token_purity_chance"]) < 0.6
    # a token routed deterministically: each listed token goes to its expert every time
    entries = [e for layer in token["experts"] for lst in layer.values() for e in lst]
    assert entries and all(e["count"] == e["token_count"] and e["lift"] > 1 for e in entries)

    res = routing_statistics(moescope.open_trace(labelled_trace(tmp_path / "lab", layers=4, biased_layers=(1,))),
                             label="label", permutations=50, figures=False).values
    lab = res["label_specialisation"]
    assert lab["mi_p_value"][1] <= 1 / 51 + 1e-12 and lab["mi_bits"][1] > 3 * lab["mi_permutation_p95_bits"][1]
    assert all(lab["mi_p_value"][i] > 0.05 for i in (0, 2, 3))
    null_purity = res["token_specialisation"]
    assert np.allclose(null_purity["token_purity"], null_purity["token_purity_chance"], atol=0.05)
    # by default enough shuffles that the planted layer survives Holm at 0.01 (4 layers: 399)
    lab = routing_statistics(moescope.open_trace(tmp_path / "lab"), label="label", figures=False
                             ).values["label_specialisation"]
    assert lab["permutations"] == 399 and lab["mi_p_value_holm"][1] <= 0.01
    assert all(lab["mi_p_value_holm"][i] > 0.05 for i in (0, 2, 3))


def test_full_result_saves_with_phases_weights_and_figures(tmp_path):
    path = labelled_trace(tmp_path / "t", layers=3, biased_layers=(), generated=8, generated_bias=2.0)
    result = routing_statistics(moescope.open_trace(path), label="label", permutations=10)
    out = result.save(tmp_path / "out")
    saved = json.loads(out.read_text())
    assert saved["analysis"] == "stats" and saved["params"]["label"] == "label"
    for key in ("load", "coactivation", "transitions", "token_specialisation", "label_specialisation", "weights", "phases"):
        assert saved[key] is not None, key
    assert sorted(saved["figures"]) == sorted(f"figures/{n}.png" for n in
                                              ("load_heatmap", "layer_profile", "coactivation", "transitions", "weights"))
    assert all((tmp_path / "out" / f).is_file() for f in saved["figures"])
    ph = saved["phases"]
    # generated tokens favour experts 0..k-1: their load differs from the prompt's far beyond chance
    assert all(js > 10 * c for js, c in zip(ph["js_bits"], ph["js_chance_bits"]))
    assert saved["weights"]["sum_mean"] == pytest.approx([1.0] * 3, abs=2e-3)
    # the report section renders it, escaping text
    from moescope.report.html import report_env
    from moescope.report.sections.stats import render

    section = render(saved, tmp_path / "out", report_env())
    assert section.key == "stats" and "Jensen-Shannon" in section.html and "data:image/png;base64," in section.html


def test_trace_without_weights_or_tokens(tmp_path):
    write_trace(tmp_path / "t", routes=_hand_routes(weights=False), model=MODEL)
    values = routing_statistics(moescope.open_trace(tmp_path / "t"), figures=False).values
    assert values["weights"] is None and values["token_specialisation"] is None and values["phases"] is None
    assert values["load"]["counts"].tolist() == [[3, 3, 2, 0], [0, 3, 3, 2]]
    assert any("weights" in n for n in values["notes"]) and any("tokens" in n for n in values["notes"])
    from moescope.analysis.result import load_results
    from moescope.report.html import report_env
    from moescope.report.sections.stats import render

    result = routing_statistics(moescope.open_trace(tmp_path / "t"))
    result.save(tmp_path / "out")
    section = render(load_results(tmp_path / "out"), tmp_path / "out", report_env())
    assert "records no routing weights" in section.html and "no tokens table" in section.html


def test_cli_stats_and_label_error(tmp_path):
    path = labelled_trace(tmp_path / "t", layers=2, n_seq=24, seq_len=16)
    ok = subprocess.run([sys.executable, "-m", "moescope.cli", "analyze", "stats", str(path), "--out", str(tmp_path / "o"),
                         "--label", "label", "--permutations", "5"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "Routing statistics" in ok.stdout and (tmp_path / "o" / "results.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "moescope.cli", "analyze", "stats", str(path), "--out", str(tmp_path / "x"),
                          "--label", "topic"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "no field 'topic'" in bad.stderr and "available: label" in bad.stderr


@pytest.mark.parametrize("batch_rows", [7, 1 << 17])
def test_streaming_counts_match_duckdb_and_brute_force(tmp_path, monkeypatch, batch_rows):
    """The one-pass counters, cut into chunks of any size, equal plain counts of the same rows."""
    import moescope.analysis.routing_counts as rc

    path = labelled_trace(tmp_path / "t", n_seq=12, seq_len=9, layers=3, top_k=3, generated=3, token_strength=1.0)
    trace = moescope.open_trace(path)
    routes = trace.table("routes").to_pandas()
    monkeypatch.setattr(rc, "BATCH_ROWS", batch_rows)
    got = rc.count_routes(trace, phase="all", sequences=True, bucket_edges=[2, 5], token_experts=True)
    # brute force from the rows
    li = {layer: i for i, layer in enumerate(trace.moe_layers)}
    load = np.zeros((3, 16), int)
    seq = np.zeros((12, 3, 3, 16), int)
    for r in routes.itertuples():
        for e in r.experts:
            load[li[r.layer], e] += 1
            seq[r.seq_id, int(np.searchsorted([0, 2, 5], r.pos, side="right") - 1), li[r.layer], e] += 1
    assert np.array_equal(got.scan.load, load)
    assert np.array_equal(got.sequences.counts, seq)
    assert got.sequences.n_tokens.sum() == len(routes)
    duck = rc.token_expert_counts(trace, phase="all")
    assert all(np.array_equal(got.token_experts[c], duck[c]) for c in duck)
    # a vocabulary too large for the dense counter falls back to DuckDB with the same result
    monkeypatch.setattr(rc, "MAX_DENSE_TOKEN_CELLS", 10)
    fallback = rc.count_routes(trace, scan=False, token_experts=True).token_experts
    assert all(np.array_equal(fallback[c], duck[c]) for c in duck)
    # generated phase: positions count from the first generated token
    gen = rc.sequence_expert_counts(trace, phase="generated", bucket_edges=[1])
    assert gen.n_tokens[:, 0].sum() == 12 * 3 and gen.n_tokens[:, 1].sum() == 12 * 2 * 3


def test_transitions_with_missing_layer_rows(tmp_path, hand_trace):
    """Tokens lacking a layer's row: the unaligned path pairs only rows of adjacent layers."""
    routes = _hand_routes()
    keep = [i for i in range(8) if i != 3]  # drop token 1's layer-3 row
    cut = {name: col.take(pa.array(keep)) if isinstance(col, pa.Array) else pa.array(col).take(pa.array(keep))
           for name, col in routes.items()}
    write_trace(tmp_path / "t", routes=cut, model=MODEL)
    (t,) = transitions(moescope.open_trace(tmp_path / "t"))
    assert t.n_tokens == 3 and t.counts.sum() == 3 * 4


def test_stream_trace_writes_a_valid_sharded_trace(tmp_path):
    from moescope.store.validate import validate
    from moescope.testing.synthetic import stream_trace

    manifest = stream_trace(tmp_path / "t", rows=6000, chunk_rows=1000, shard_rows=2000, seq_len=20, layers=3,
                            n_experts=8, top_k=2, biased_layers=(1,))
    trace = moescope.open_trace(tmp_path / "t")
    assert validate(trace).ok and len(manifest["shards"]) >= 3
    assert manifest["totals"]["rows"]["routes"] == 100 * 20 * 3  # ceil(6000 / 60) sequences
    scan = scan_routes(trace)
    assert scan.n_rows.tolist() == [2000] * 3 and scan.transition_tokens.tolist() == [2000, 2000]
