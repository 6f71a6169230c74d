"""Known answers of the router-aware co-activation null (moescope/analysis/coactivation_null.py),
the recorded router settings (moescope/router_settings.py) and weights of scaling routers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import typer

import moescope
from moescope.analysis.coactivation_null import (SelectionRule, beyond_chance, block_pair_null, pair_counts,
                                                 pair_null_under_rule, structured_pair_null)
from moescope.analysis.stats import dispersion, pair_null, routing_statistics
from moescope.router_settings import describe_router
from moescope.store.tables import write_trace

GROUPED = SelectionRule(16, 3, n_group=4, topk_group=2)


def _grouped_counts(seed: int, *, planted: bool, n: int = 4000) -> np.ndarray:
    """Pair counts of independent Gaussian scores selected by the group-limited rule; planted:
    experts 0 and 1 (group 0) share their score, so they are chosen together."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=16) * 0.3 + rng.normal(size=(n, 16))
    if planted:
        scores[:, 1] = scores[:, 0] + 0.05
    return pair_counts(GROUPED.select(scores), 16)


def test_selection_rule_keeps_topk_group_groups():
    rng = np.random.default_rng(0)
    chosen = GROUPED.select(rng.normal(size=(500, 16)))
    groups_used = np.array([len(set(row // 4)) for row in chosen])
    assert chosen.shape == (500, 3) and groups_used.max() <= 2


def test_block_null_is_pair_null_for_one_group_and_keeps_margins():
    counts = _grouped_counts(0, planted=False)
    n = 4000
    fitted = block_pair_null(counts, 4)
    off = counts - np.diag(np.diag(counts))
    assert fitted.sum(axis=1) == pytest.approx(off.sum(axis=1), rel=1e-4)
    onehot = np.eye(4)[np.arange(16) // 4]
    assert onehot.T @ fitted @ onehot == pytest.approx(onehot.T @ off @ onehot, rel=1e-4)
    flat = SelectionRule(16, 3)
    plain = structured_pair_null(np.diag(counts) / n, 3) * n
    assert plain == pytest.approx(pair_null(np.diag(counts) / n, 3) * n)
    assert pair_null_under_rule(counts, n, flat, rng=np.random.default_rng(0), replicates=0).expected == pytest.approx(plain)


def test_grouped_routing_without_pairs_is_at_chance_but_the_old_null_flags_it():
    counts = _grouped_counts(1, planted=False)
    null = pair_null_under_rule(counts, 4000, GROUPED, np.random.default_rng(0))
    d = dispersion(counts, null.expected)
    old = dispersion(counts, pair_null(np.diag(counts) / 4000, 3) * 4000)
    assert old > 10 * null.dispersion_chance  # the trap: random pairing calls the grouping "teams"
    assert not beyond_chance(d, null.dispersion_chance, null.dispersion_chance_sd)
    assert d < 2 * null.dispersion_chance


def test_planted_pairing_inside_a_group_is_still_found():
    counts = _grouped_counts(1, planted=True)
    null = pair_null_under_rule(counts, 4000, GROUPED, np.random.default_rng(0))
    d = dispersion(counts, null.expected)
    assert beyond_chance(d, null.dispersion_chance, null.dispersion_chance_sd)
    ratio = counts[0, 1] / null.expected[0, 1]
    assert ratio > 1.5


# -- a tiny random DeepSeek-V3 (grouped, sigmoid, routed_scaling_factor 2.5) -------------------------------
def _deepseek_trace(path, *, planted: bool):
    from moescope.capture.loading import describe_model
    from moescope.capture.recorder import record
    from moescope.testing.tiny import tiny_model

    torch.set_num_threads(1)
    model = tiny_model("deepseek_v3", seed=0, n_routed_experts=16)  # 4 groups of 4, 2 kept, top-3
    H = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "weight"):
            continue
        # Orthogonal router rows on near-isotropic inputs: scores independent across experts, so
        # the only pair structure is the group rule's (or the planted tie of experts 0 and 1).
        q, _ = torch.linalg.qr(torch.randn(H, gate.weight.shape[0], generator=g))
        w = q.T * 4.0
        if planted:
            w[1] = w[0]
        with torch.no_grad():
            gate.weight.copy_(w)
    with record(model) as rec, torch.no_grad():
        model(inputs_embeds=torch.randn(32, 64, H, generator=g))
    write_trace(path, routes=rec.tables()["routes"], model=describe_model(model, "tiny-deepseek-v3"), overwrite=True)
    return moescope.open_trace(path)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    base = tmp_path_factory.mktemp("deepseek")
    traces = {p: _deepseek_trace(base / str(p), planted=p) for p in (False, True)}
    return {p: (t, routing_statistics(t, figures=False).values) for p, t in traces.items()}


def test_manifest_records_what_this_router_does(deepseek):
    trace, values = deepseek[False]
    s = trace.manifest["model"]["router_settings"]
    assert s["grouped"] and (s["n_group"], s["topk_group"]) == (4, 2)
    assert s["norm_topk_prob"] is True and s["routed_scaling_factor"] == 2.5 and s["score_function"] == "sigmoid"
    text = describe_router(trace.manifest["model"])
    assert "2 of 4 groups of 4 experts" in text and "times 2.5" in text and "renormalised" in text
    assert values["router"] == text and values["coactivation"]["selection_rule"]["grouped"]


def test_tiny_deepseek_grouping_not_flagged_planted_pair_is(deepseek):
    trace, values = deepseek[False]
    for layer in values["coactivation"]["per_layer"]:
        assert not layer["beyond_chance"], layer
    from moescope.analysis.routing_counts import scan_routes

    scan = scan_routes(trace, transitions=False)
    n = scan.n_rows[0]
    old = dispersion(scan.pairs[0], pair_null(scan.load[0] / n, 3) * n)
    assert old > 5 * values["coactivation"]["per_layer"][0]["dispersion"]  # the old null flagged the grouping
    planted = deepseek[True][1]["coactivation"]["per_layer"]
    assert all(layer["beyond_chance"] for layer in planted)


def test_scaled_weights_are_binned_on_their_range(deepseek):
    w = deepseek[False][1]["weights"]
    assert w["weight_max"] == 2.5
    assert w["sum_mean"] == pytest.approx([2.5, 2.5], abs=0.01)
    # the sums (2.5) fall in the last bin of [0, 2.5], the top-ranked weights spread below it
    assert w["sum_hist"][0][-1] == w["sum_hist"][0].sum()
    assert w["hist_by_rank"][0][0][-1] < w["hist_by_rank"][0][0].sum()


def test_largest_pair_ratio_has_a_rank_matched_chance():
    """Trap: the largest of 120 pair ratios is above 1 under random pairing; its rank-matched
    chance says so. Planted: one pair chosen together far more often is found at the floor p."""
    from moescope.analysis.stats import Coactivation, coactivation_summary

    rng = np.random.default_rng(0)
    flat = SelectionRule(16, 2)
    for planted, check in ((False, lambda s: s["max_ratio_p_value"] > 0.05 and s["max_ratio"] > 1.05),
                           (True, lambda s: s["max_ratio_p_value"] == pytest.approx(1 / 201))):
        chosen = flat.select(rng.gumbel(size=(5000, 16)))
        if planted:
            chosen[:400] = [0, 1]
        counts = pair_counts(chosen, 16)
        null = pair_null_under_rule(counts, 5000, flat, rng, replicates=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(null.expected > 0, counts / null.expected, np.nan)
        summary = coactivation_summary(Coactivation(counts, null.expected, ratio), seed=1)
        assert check(summary), summary
        assert summary["top_pairs"][0][5] == pytest.approx(summary["max_ratio_chance"])
        assert summary["max_ratio_chance"] > 1.05  # what the naive reading (ratio 1 = chance) misses


def test_inspect_prints_what_this_router_does(deepseek):
    from typer.testing import CliRunner

    from moescope.commands import inspect

    app = typer.Typer()
    inspect.register(app)
    app.command("noop")(lambda: None)  # two commands: typer keeps "inspect" as a subcommand
    trace, _ = deepseek[False]
    run = CliRunner().invoke(app, ["inspect", str(trace.path), "--no-checksums"])
    assert run.exit_code == 0, run.output
    assert "this model" in run.output and "group-limited" in run.output
