"""Geometry analysis: planted routing-from-geometry is found, nulls stay at chance."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import moescope
from moescope.analysis import routing_sets as rs
from moescope import inference as inf
from moescope.analysis.geometry import GeometryParams, analyze_geometry, mean_direction, random_direction_abs_cos
from moescope.analysis.routing_inputs import geometry_layers, read_router_weights
from moescope.errors import MoescopeError
from moescope.store.tables import write_trace

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """One BLAS thread: on a shared 2-core machine threaded BLAS calls mostly wait on each other."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield

E, K, H = 8, 2, 32
N_SEQ, T, N_GEN, VOCAB = 60, 40, 10, 100
# what routes each MoE layer of the synthetic trace
LINEAR, CLUSTER, RANDOM, TOKEN, SEQUENCE = 0, 1, 2, 3, 4


def _topk(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :K]


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def synthetic_trace(path, seed: int = 0):
    """A trace whose routing is planted per layer; returns (path, router of the LINEAR layer)."""
    rng = np.random.default_rng(seed)
    n = N_SEQ * T
    seq = np.repeat(np.arange(N_SEQ), T)
    pos = np.tile(np.arange(T), N_SEQ)
    token = rng.integers(0, VOCAB, n)
    phase = np.where(pos >= T - N_GEN, "generated", "prompt")
    mean = rng.normal(size=H)
    mean *= 3.0 / np.linalg.norm(mean)
    u = mean / np.linalg.norm(mean)
    w_linear = rng.normal(size=(E, H))
    w_linear -= np.outer(w_linear @ u, u)  # a router blind to the mean direction
    token_experts = np.stack([rng.choice(E, K, replace=False) for _ in range(VOCAB)])
    seq_pref = np.stack([rng.choice(E, K, replace=False) for _ in range(N_SEQ)])
    centres = rng.normal(size=(E, H)) * 2
    hidden, experts, probs = {}, {}, {}
    for layer in (LINEAR, CLUSTER, RANDOM, TOKEN, SEQUENCE):
        h = rng.normal(size=(n, H)) + mean
        if layer == LINEAR:
            logits = h @ w_linear.T
            e = _topk(logits)
        elif layer == CLUSTER:
            cluster = rng.integers(0, E, n)
            h = centres[cluster] + 0.3 * rng.normal(size=(n, H)) + mean
            e = np.stack([cluster, (cluster + 1) % E], axis=1)
        elif layer == TOKEN:
            e = token_experts[token]
        elif layer == SEQUENCE:
            use_pref = rng.random(n) < 0.7
            e = np.where(use_pref[:, None], seq_pref[seq], _topk(rng.random((n, E))))
        else:
            e = _topk(rng.random((n, E)))
        if layer != LINEAR:
            logits = rng.normal(size=(n, E))
            logits[np.arange(n)[:, None], e] += 3.0
        hidden[layer], experts[layer], probs[layer] = h, e, _softmax(logits)
    layers = sorted(hidden)
    routes = {
        "seq_id": np.tile(seq, len(layers)).astype(np.uint32), "pos": np.tile(pos, len(layers)).astype(np.uint32),
        "layer": np.repeat(layers, n).astype(np.uint16),
        "experts": [list(r) for layer in layers for r in experts[layer].astype(np.uint8)],
        "router_probs": [list(r) for layer in layers for r in probs[layer].astype(np.float16)],
    }
    import pyarrow as pa

    routes = pa.table({**{k: v for k, v in routes.items() if k not in ("experts", "router_probs")},
                       "experts": pa.array(routes["experts"], pa.list_(pa.uint8())),
                       "router_probs": pa.array(routes["router_probs"], pa.list_(pa.float16()))})
    hidden_t = pa.table({"seq_id": routes["seq_id"], "pos": routes["pos"], "layer": routes["layer"],
                         "hidden": pa.array([list(r) for layer in layers for r in hidden[layer].astype(np.float16)],
                                            pa.list_(pa.float16()))})
    tokens = pa.table({"seq_id": seq.astype(np.uint32), "pos": pos.astype(np.uint32),
                       "token_id": token.astype(np.uint32), "phase": phase})
    sequences = pa.table({"seq_id": np.arange(N_SEQ, dtype=np.uint32), "text": [f"text {i}" for i in range(N_SEQ)]})
    write_trace(path, routes=routes, tokens=tokens, sequences=sequences, hidden=hidden_t, overwrite=True,
                model={"n_experts": E, "top_k": K, "moe_layers": layers})
    return path, w_linear


PARAMS = GeometryParams(pairs=4000, nn_queries=600, permutations=99, seed=1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path, w_linear = synthetic_trace(tmp_path_factory.mktemp("geo") / "trace")
    trace = moescope.open_trace(path)
    result = analyze_geometry(geometry_layers(trace, PARAMS), n_experts=E, top_k=K,
                              router_weights={LINEAR: w_linear}, params=PARAMS, trace=str(path))
    return path, result.values, result


def test_planted_geometry_is_detected_and_random_routing_stays_at_chance(planted):
    _, v, _ = planted
    assert v["layers"] == [LINEAR, CLUSTER, RANDOM, TOKEN, SEQUENCE]
    chance = v["expected_overlap_chance"]
    assert chance == K / E
    rho, nn, rnd = v["spearman_cosine_overlap"], v["nn_overlap"], v["random_neighbour_overlap"]
    for layer, least in ((LINEAR, 0.15), (CLUSTER, 0.3)):  # routing is a function of the hidden state
        assert rho[layer] > least
        assert v["spearman_cosine_overlap_diff_token"][layer] > least  # beyond token identity
        assert v["spearman_cosine_jaccard"][layer] > least
        assert v["per_layer"][layer]["pairs"]["random"]["spearman_overlap_mantel_p"] <= 0.01
        assert nn[layer] > rnd[layer] + 0.2
    assert nn[CLUSTER] > 0.95
    # the LINEAR router ignores the shared mean direction: centring the hidden states helps
    assert v["spearman_centred_cosine_overlap"][LINEAR] > rho[LINEAR] + 0.02
    assert v["per_layer"][RANDOM]["pairs"]["random"]["spearman_overlap_mantel_p"] > 0.05
    # random routing: no relation, the neighbour predicts no better than chance
    assert abs(rho[RANDOM]) < 0.05
    assert abs(nn[RANDOM] - chance) < 0.05 and abs(rnd[RANDOM] - chance) < 0.05
    ci = v["per_layer"][RANDOM]["neighbours"]["any"]["difference_ci95"]
    assert ci[0] < 0.01 and ci[1] > -0.01
    assert abs(v["pair_overlap_random"][RANDOM] - chance) < 0.02
    assert abs(v["per_layer"][RANDOM]["pairs"]["random"]["hamming"] - v["hamming_chance"]) < 0.02


def test_token_identity_is_separated_from_geometry(planted):
    _, v, _ = planted
    chance = v["expected_overlap_chance"]
    # the TOKEN layer routes by token id only: same id -> same experts, whatever the hidden state
    assert v["pair_overlap_same_token"][TOKEN] == 1.0
    assert abs(v["pair_overlap_diff_token"][TOKEN] - chance) < 0.05
    assert abs(v["spearman_cosine_overlap_diff_token"][TOKEN]) < 0.05
    assert v["random_neighbour_overlap_same_token"][TOKEN] == 1.0  # the token-id predictor is perfect
    assert abs(v["nn_overlap_diff_token"][TOKEN] - v["random_neighbour_overlap_diff_token"][TOKEN]) < 0.05
    # in the other layers a same-id partner is no better than any other
    assert abs(v["pair_overlap_same_token"][RANDOM] - chance) < 0.05


def test_mean_direction_and_router_alignment(planted):
    _, v, _ = planted
    md = v["per_layer"][LINEAR]["mean_direction"]
    # hidden = N(0, I) + mean with |mean|^2 = 9, H = 32: share ~ (9 + 1) / (9 + 32)
    assert md["mean_direction_share"] == pytest.approx(10 / 41, abs=0.03)
    assert md["mean_direction_share_chance"] == 1 / H
    assert md["router_mean_logit_share"] < 0.01 < md["router_mean_logit_share_isotropic"]
    assert md["router_centred_abs_cos"] < 0.01 < md["router_abs_cos_chance"]
    assert "router_abs_cos" not in v["per_layer"][RANDOM]["mean_direction"]  # no weights given there


def test_mean_direction_known_answers():
    rng = np.random.default_rng(3)
    dim = 64
    u = np.zeros(dim)
    u[0] = 1.0
    h = rng.normal(size=(20_000, dim)) + 4 * u
    aligned = rng.normal(size=(16, dim)) * 0.02
    aligned[:, 0] = np.r_[np.linspace(0.5, 1, 8), -np.linspace(0.5, 1, 8)]  # experts differ along the mean
    got = mean_direction(h, aligned)
    assert got["mean_norm_share"] == pytest.approx(16 / 80, abs=0.01)
    assert got["router_centred_abs_cos"] > 0.8
    assert got["router_mean_logit_share"] > 0.9
    assert got["router_mean_logit_share_p_upper"] == pytest.approx(1 / 100)  # at the floor of 99 random routers
    isotropic = mean_direction(h, rng.normal(size=(2048, dim)), random_routers=0)
    assert isotropic["router_abs_cos"] == pytest.approx(random_direction_abs_cos(dim), rel=0.05)
    assert isotropic["router_mean_logit_share"] == pytest.approx(isotropic["mean_norm_share"], abs=0.03)
    assert random_direction_abs_cos(10_000) == pytest.approx(math.sqrt(2 / (math.pi * 10_000)), rel=1e-3)


def test_mean_direction_random_router_null(planted):
    _, v, _ = planted
    md = v["per_layer"][LINEAR]["mean_direction"]
    # planted: a router blind to the mean -> below every random router, also after Holm over layers;
    # by default enough random routers that this reaches 0.01 after the correction
    routers = md["random_routers"]
    assert routers == inf.holm_ready_draws(sum("router_abs_cos" in e["mean_direction"] for e in v["per_layer"]),
                                           minimum=99)
    assert md["router_mean_logit_share_p_lower"] == pytest.approx(1 / (1 + routers))
    assert md["router_mean_logit_share_p_lower_holm"] <= 0.01
    assert md["router_mean_logit_share_null_mean"] == pytest.approx(md["router_mean_logit_share_isotropic"], rel=0.5)
    assert md["router_centred_abs_cos"] < md["router_centred_abs_cos_null_mean"] - 3 * md["router_centred_abs_cos_null_sd"]
    assert v["router_mean_logit_share_p_lower_holm"][LINEAR] == md["router_mean_logit_share_p_lower_holm"]


def test_mean_direction_null_at_chance_for_random_routers():
    """Null: routers drawn like the null's are not called blind or aligned; trap: the isotropic
    value alone (no spread) would call a random router 'blind' whenever it falls below it."""
    rng = np.random.default_rng(5)
    dim = 16
    h = rng.normal(size=(4000, dim)) + 2.0 * np.eye(dim)[0]
    p_lower, below_isotropic = [], 0
    for _ in range(20):
        got = mean_direction(h, rng.normal(size=(4, dim)), random_routers=99, rng=rng)
        p_lower.append(got["router_mean_logit_share_p_lower"])
        below_isotropic += got["router_mean_logit_share"] < got["router_mean_logit_share_isotropic"]
    assert below_isotropic >= 8  # a naive reading would call these routers "blind to the mean"
    assert np.mean(np.array(p_lower) <= 0.05) <= 0.15
    assert 0.3 < np.mean(p_lower) < 0.7


def test_visit_frequencies_within_vs_across_sequences(planted):
    _, v, _ = planted
    within, across = v["visit_cosine_within"], v["visit_cosine_across"]
    assert within[SEQUENCE] > across[SEQUENCE] + 0.2
    assert abs(within[RANDOM] - across[RANDOM]) < 0.05
    assert abs(within[RANDOM] - v["visit_cosine_load_chance"][RANDOM]) < 0.05
    seq_entry = v["visits"][SEQUENCE]
    assert seq_entry["prompt_vs_rollout"]["same_sequence"] > seq_entry["prompt_vs_rollout"]["other_sequences"] + 0.2


def test_every_measure_is_split_by_phase(planted):
    _, v, _ = planted
    assert set(v["by_phase"]) == {"prompt", "generated"}
    gen = v["by_phase"]["generated"][CLUSTER]
    assert gen["n_tokens"] == N_SEQ * N_GEN
    assert gen["pairs"]["random"]["spearman_overlap"] > 0.3
    assert v["by_phase"]["prompt"][CLUSTER]["n_tokens"] == N_SEQ * (T - N_GEN)
    assert {"prompt", "generated", "prompt_vs_rollout"} <= set(v["visits"][0])


def test_results_save_and_report_section(planted, tmp_path):
    path, v, result = planted
    saved = json.loads(result.save(tmp_path / "out").read_text())
    assert saved["analysis"] == "geometry" and saved["params"]["seed"] == 1
    assert len(saved["figures"]) == 5 and all((tmp_path / "out" / f).is_file() for f in saved["figures"])
    import jinja2

    from moescope.report.sections.geometry import render

    section = render(saved, tmp_path / "out", jinja2.Environment(autoescape=True))
    assert "Spearman" in section.summary and "<table" in section.html and "data:image/png" in section.html


def test_sampling_is_bounded_and_reproducible(planted):
    path, _, _ = planted
    trace = moescope.open_trace(path)
    small = GeometryParams(max_tokens=300, pairs=500, nn_queries=50, permutations=0, seed=5)
    first = [tok for tok, _ in geometry_layers(trace, small)]
    again = [tok for tok, _ in geometry_layers(trace, small)]
    assert all(len(t) == 300 for t in first)
    assert np.array_equal(first[0].pos, again[0].pos) and np.array_equal(first[0].seq_id, first[3].seq_id)


def test_set_primitives_known_answers():
    rng = np.random.default_rng(0)
    a = np.array([[0, 1], [2, 3], [4, 5]])
    b = np.array([[1, 0], [3, 7], [6, 7]])
    assert rs.intersections(a, b).tolist() == [2, 1, 0]
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
    members = rs.top_p_members(probs, 0.8)
    assert members.sum(axis=1).tolist() == [2, 1, 4]
    assert members[0].tolist() == [True, True, False, False]
    # size-matched Jaccard chance against simulation
    sims = []
    for _ in range(20_000):
        x, y = rng.choice(10, 3, replace=False), rng.choice(10, 5, replace=False)
        sims.append(len(set(x) & set(y)) / len(set(x) | set(y)))
    assert rs.jaccard_chance(np.array([3]), np.array([5]), 10)[0] == pytest.approx(np.mean(sims), abs=0.01)
    values = rng.integers(0, 5, 200)
    i, j = rs.same_value_pairs(values, 1000, rng)
    assert (i != j).all() and (values[i] == values[j]).all()
    i, j = rs.random_pairs(7, 1000, rng)
    assert (i != j).all() and set(np.r_[i, j]) == set(range(7))


def test_command_writes_results_and_refuses_traces_without_hidden(planted, tmp_path):
    from moescope.commands import analyze_geometry

    path, _, _ = planted
    app, analyze = typer.Typer(), typer.Typer()
    app.add_typer(analyze, name="analyze")
    analyze_geometry.register(app, analyze_app=analyze)
    run = CliRunner().invoke(app, ["analyze", "geometry", str(path), "--out", str(tmp_path / "g"), "--pairs", "300",
                                   "--max-tokens", "200", "--nn-queries", "50", "--permutations", "9"],
                             standalone_mode=False)
    assert run.exception is None, run.output
    saved = json.loads((tmp_path / "g" / "results.json").read_text())
    assert len(saved["spearman_cosine_overlap"]) == 5
    assert any("router alignment skipped" in n for n in saved["notes"])
    bare = tmp_path / "bare"
    write_trace(bare, routes={"seq_id": np.zeros(3, np.uint32), "pos": np.arange(3, dtype=np.uint32),
                              "layer": np.zeros(3, np.uint16), "experts": [[0, 1], [1, 2], [2, 3]]},
                model={"n_experts": 4, "top_k": 2, "moe_layers": [0]})
    run = CliRunner().invoke(app, ["analyze", "geometry", str(bare), "--out", str(tmp_path / "b")],
                             standalone_mode=False)
    assert isinstance(run.exception, MoescopeError)
    assert "--hidden-rate" in str(run.exception) and "\n" not in str(run.exception)


def test_router_weights_are_read_from_a_checkpoint(tiny_dir):
    from safetensors import safe_open

    paths = {str(i): f"model.layers.{i}.mlp" for i in range(3)}
    weights = read_router_weights(tiny_dir, paths, n_experts=8)
    assert sorted(weights) == [0, 1, 2]
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        want = f.get_tensor("model.layers.1.mlp.gate.weight").numpy()
    assert np.array_equal(weights[1], want)


def test_traces_without_tokens_or_probs_are_analysed_with_notes(tmp_path):
    rng = np.random.default_rng(2)
    n, h = 300, 8
    hidden = rng.normal(size=(n, h))
    experts = _topk(hidden @ rng.normal(size=(h, E)))
    keys = {"seq_id": np.repeat(np.arange(10), 30).astype(np.uint32), "pos": np.tile(np.arange(30), 10).astype(np.uint32),
            "layer": np.zeros(n, np.uint16)}
    write_trace(tmp_path / "t", routes={**keys, "experts": [list(r) for r in experts]},
                hidden={**keys, "hidden": [list(r) for r in hidden.astype(np.float16)]},
                model={"n_experts": E, "top_k": K, "moe_layers": [0]})
    params = GeometryParams(pairs=2000, nn_queries=100, permutations=19)
    v = analyze_geometry(geometry_layers(moescope.open_trace(tmp_path / "t"), params), n_experts=E, top_k=K,
                         params=params).values
    assert v["spearman_cosine_overlap"][0] > 0.2 and v["nn_overlap"][0] > v["random_neighbour_overlap"][0]
    assert v["spearman_cosine_overlap_diff_token"] == [None] and v["by_phase"] is None
    assert any("router_probs" in note for note in v["notes"]) and any("tokens table" in note for note in v["notes"])
    assert "jaccard_top_p" not in v["per_layer"][0]["pairs"]["random"]
