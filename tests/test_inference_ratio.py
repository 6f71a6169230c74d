"""cluster_bootstrap_ratio_ci (moescope/inference/significance.py): group-resampled CI of a ratio from per-group totals."""
from __future__ import annotations

import numpy as np

from moescope.inference import cluster_bootstrap_ci, cluster_bootstrap_ratio_ci


def test_ratio_ci_matches_item_bootstrap_and_covers_the_truth():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), rng.integers(5, 40, 60))
    p_group = rng.beta(20, 2, 60)  # groups differ: clustering widens the interval
    values = (rng.random(len(groups)) < p_group[groups]).astype(float)
    sums = np.bincount(groups, weights=values)
    counts = np.bincount(groups).astype(float)
    r = cluster_bootstrap_ratio_ci(sums, counts, seed=1)
    item = cluster_bootstrap_ci(values, np.array([f"g{g:03d}" for g in groups]), seed=1)  # same group order
    assert abs(r["ratio"] - values.mean()) < 1e-12
    assert abs(r["ci_low"] - item["ci_low"]) < 1e-9 and abs(r["ci_high"] - item["ci_high"]) < 1e-9
    naive = cluster_bootstrap_ci(values, None, seed=1)  # the trap: items as independent
    assert (r["ci_high"] - r["ci_low"]) > (naive["ci_high"] - naive["ci_low"])


def test_ratio_ci_per_column_and_degenerate_cases():
    sums = np.array([[5, 0], [5, 0], [5, 0]], float)
    counts = np.array([[5, 0], [5, 0], [5, 0]], float)
    r = cluster_bootstrap_ratio_ci(sums, counts)
    assert r["ratio"][0] == 1.0 and r["ci_low"][0] == 1.0 and r["ci_high"][0] == 1.0  # no variation: no width
    assert np.isnan(r["ratio"][1])  # a column with no items has no ratio
