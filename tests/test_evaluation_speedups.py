"""Known answers for the evaluation's fast paths: each equals the straightforward computation it
replaces (or has the law it must have), so speed never changes what is reported."""
from __future__ import annotations

import numpy as np
import pytest

from moescope import inference as inf
from moescope.analysis.coactivation_null import SelectionRule, gumbel_noise, pair_counts, simulate
from moescope.analysis.signature_controls import _count_keys, top_k_map


def _naive_top_k_map(counts: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros(counts.shape)
    for idx in np.ndindex(counts.shape[:-1]):
        row = counts[idx]
        if row.sum() == 0:
            continue
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))  # ties to the lower id
        out[idx + (order[:k],)] = 1.0
    return out


@pytest.mark.parametrize("big", [False, True])
def test_top_k_map_equals_the_naive_ranking_ties_to_lower_ids(big):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=(3, 20, 9)).astype(np.float64)  # many ties
    counts[1, 3] = 0  # an empty row stays all 0
    if big:  # keys beyond int32: the int64 path
        counts = counts * 2 ** 28
    got = top_k_map(counts, 3)
    assert np.array_equal(got, _naive_top_k_map(counts, 3))
    assert got[1, 3].sum() == 0


def test_count_keys_equals_bincount(monkeypatch):
    import moescope.analysis.signature_controls as sc

    monkeypatch.setattr(sc, "_COUNT_CHUNK", 7)  # pieces split across several slices
    rng = np.random.default_rng(1)
    pieces = [rng.integers(0, 50, size=n).astype(np.int32) for n in (0, 5, 23, 40)]
    weights = [rng.integers(1, 4, size=len(p)) for p in pieces]
    flat = np.concatenate(pieces)
    got = _count_keys([(p, None) for p in pieces], 30)  # keys beyond minlength grow the result
    assert got.dtype == np.int64 and np.array_equal(got, np.bincount(flat, minlength=30))
    got_w = _count_keys(list(zip(pieces, weights)), 60)
    assert np.array_equal(got_w, np.bincount(flat, weights=np.concatenate(weights), minlength=60))
    assert np.array_equal(_count_keys([], 4), np.zeros(4))


def test_float32_gumbel_noise_has_the_gumbel_law():
    g = gumbel_noise(np.random.default_rng(2), (400_000, 4)).ravel().astype(np.float64)
    assert np.isfinite(g).all()
    assert abs(g.mean() - np.euler_gamma) < 0.01
    assert abs(g.var() - np.pi ** 2 / 6) < 0.02


def test_simulated_router_keeps_its_loads():
    # top-2 of 6 with Gumbel noise on log-shares: the simulated loads follow the logits
    rule = SelectionRule(6, 2)
    logit = np.log(np.array([4.0, 2, 1, 1, 1, 1]))
    pairs = simulate(logit, rule, 60_000, np.random.default_rng(3))
    load = np.diag(pairs) / 60_000
    assert load.sum() == pytest.approx(2.0)
    assert load[0] > load[1] > load[2] and np.ptp(load[2:]) < 0.02
    assert np.array_equal(pair_counts(np.array([[0, 1], [1, 0]]), 3)[0, 1], 2.0)


def test_coactivation_chance_is_the_same_alone_in_all_and_on_threads(tmp_path):
    import moescope
    from moescope.analysis.routing_counts import scan_routes
    from moescope.analysis.stats import coactivation
    from moescope.testing.synthetic import null_trace

    trace = moescope.open_trace(null_trace(tmp_path / "t", n_seq=20, seq_len=32, layers=3, n_experts=8, top_k=2,
                                           biased_layers=()))
    scan = scan_routes(trace, transitions=False)
    one = coactivation(scan, seed=5, n_jobs=1, replicates=4, chance_tokens=2_000)
    two = coactivation(scan, seed=5, n_jobs=2, replicates=4, chance_tokens=2_000)
    alone = coactivation(scan, 1, seed=5, replicates=4, chance_tokens=2_000)
    assert [c.dispersion_chance for c in one] == [c.dispersion_chance for c in two]
    assert alone.dispersion_chance == one[1].dispersion_chance


def test_permutations_on_the_first_repeat_test_that_repeats_accuracy():
    rng = np.random.default_rng(4)
    y = np.repeat(["a", "b"], 30)
    X = rng.normal(size=(60, 5)) + (y == "a")[:, None] * 0.8
    splits = inf.repeated_grouped_splits(y, None, folds=5, repeats=3, seed=0)
    perms = inf.fold_permutations(y, None, splits[:1], 19, seed=1)
    res = inf.ridge_cv(X, y, splits, permuted_labels=perms)
    full = inf.ridge_cv(X, y, splits)
    # the real labels' results do not depend on the permutations carried along
    assert np.array_equal(res.predictions[:, 0], full.predictions[:, 0])
    assert res.accuracy == full.accuracy
    assert res.null_accuracy.shape == (19,)
    assert res.tested_accuracy == pytest.approx(res.repeat_accuracy[0])
    assert res.p_value == inf.permutation_p_value(res.repeat_accuracy[0], res.null_accuracy)
    assert (res.predictions[1:, 1:] == -1).all()  # repeats without permutations hold none
    assert res.p_value <= 0.05
