"""moescope.inference: folds, nested ridge tuning, permutations, Holm, CIs, paired tests.

Known answers: a planted effect is found, a null sits at chance, and the document-leak trap
(labels random per group, features a per-group fingerprint) is high with item folds and at
chance with grouped folds."""
from __future__ import annotations

import numpy as np
import pytest

from moescope import inference as inf
from moescope.inference import ridge


def _leak_data(n_groups=40, per_group=5, p=30, seed=0):
    """Labels random per group; every item of a group shares the group's random fingerprint."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), per_group)
    labels = rng.permutation(np.arange(n_groups) % 2)[groups]
    X = rng.normal(size=(n_groups, p))[groups] + 0.1 * rng.normal(size=(len(groups), p))
    return X, labels.astype(str), groups


def test_grouped_splits_never_split_a_group_and_repeats_differ():
    X, y, g = _leak_data()
    splits = inf.repeated_grouped_splits(y, g, folds=5, repeats=3, seed=1)
    assert len(splits) == 3 and all(len(r) == 5 for r in splits)
    for rep in splits:
        seen = np.concatenate([te for _, te in rep])
        assert sorted(seen.tolist()) == list(range(len(y)))  # every item tested once per repeat
        for tr, te in rep:
            assert not set(g[tr]) & set(g[te])
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(splits[0], splits[1]))


def test_usable_folds_counts_groups_of_the_rarest_label():
    y = np.array(["a"] * 6 + ["b"] * 6)
    g = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4])
    assert inf.usable_folds(y, g, 5) == 2
    assert inf.usable_folds(y, None, 5) == 5


def test_group_permutations_keep_labels_constant_within_groups():
    _, y, g = _leak_data()
    perms = inf.group_permutations(y, g, 20, seed=0)
    assert perms.shape == (20, len(y))
    for p in perms:
        for grp in np.unique(g):
            assert len(set(p[g == grp])) == 1
        assert sorted(p) == sorted(y)  # equal group sizes: label counts kept
    assert any(not np.array_equal(p, y) for p in perms)


def test_group_permutations_mixed_groups_exchange_blocks_of_equal_size():
    y = np.array(["a", "b", "a", "b", "a", "a", "b"])
    g = np.array([0, 0, 1, 1, 2, 2, 3])
    for p in inf.group_permutations(y, g, 10, seed=3):
        assert p[6] == "b"  # the only group of size 1 keeps its block
        assert sorted(p[:6]) == sorted(y[:6])


def test_fold_permutations_keep_each_folds_label_counts_and_groups():
    _, y, g = _leak_data()
    splits = inf.repeated_grouped_splits(y, g, folds=4, repeats=2, seed=0)
    perms = inf.fold_permutations(y, g, splits, 10, seed=0)
    assert perms.shape == (2, 10, len(y))
    for r, rep in enumerate(splits):
        for _, te in rep:
            for p in perms[r]:
                assert sorted(p[te]) == sorted(y[te])
                assert all(len(set(p[te][g[te] == grp])) == 1 for grp in np.unique(g[te]))
    assert not np.array_equal(perms[0, 0], perms[1, 0])


def test_permutation_null_on_stratified_folds_is_not_shifted_below_chance():
    """The trap: free shuffles on folds stratified for the real labels sit below chance
    (anti-learning on unbalanced folds), so a null real accuracy looks significant."""
    rng = np.random.default_rng(5)
    y = np.repeat(list("abcd"), 20)
    X = rng.normal(size=(80, 20))
    splits = inf.repeated_grouped_splits(y, None, folds=5, repeats=3, seed=0)
    free = inf.ridge_cv(X, y, splits, permuted_labels=inf.group_permutations(y, None, 30, seed=1))
    within = inf.ridge_cv(X, y, splits, permuted_labels=inf.fold_permutations(y, None, splits, 30, seed=1))
    assert within.null_accuracy.mean() > free.null_accuracy.mean()
    assert within.p_value > 0.05


def test_permutation_p_and_floor():
    assert inf.permutation_p_value(0.9, np.full(199, 0.5)) == pytest.approx(1 / 200)
    assert inf.permutation_p_value(0.5, np.array([0.5, 0.6, 0.4])) == pytest.approx(3 / 4)
    assert inf.format_p(1 / 200, 199) == "p ≤ 0.005"
    assert inf.format_p(0.03, 199) == "p = 0.03"


def test_sequential_permutation_p_stops_at_the_exceedances_or_the_budget():
    batches = [np.array([0.95, 0.5, 0.97, 0.99]), np.array([0.1])]
    assert inf.sequential_permutation_p(0.9, iter(batches), max_draws=100, exceedances=2) == (2 / 3, 3)
    # never reached: the ordinary p at the budget, batches cut at max_draws
    p, used = inf.sequential_permutation_p(0.9, iter([np.zeros(30), np.zeros(30)]), max_draws=50, exceedances=2)
    assert used == 50 and p == pytest.approx(1 / 51)
    # one reach in 50: (1 + 1) / 51; an exhausted source ends the test too
    p, used = inf.sequential_permutation_p(0.9, iter([np.r_[1.0, np.zeros(49)]]), max_draws=500, exceedances=5)
    assert used == 50 and p == pytest.approx(2 / 51)


def test_sequential_permutation_p_is_valid_under_the_null_and_cheap_there():
    """Observed and shuffles from the same law: P(p <= 0.05) stays at 0.05 (Besag-Clifford), and
    the test stops after about exceedances / p draws."""
    rng = np.random.default_rng(0)
    ps, used = [], []
    for _ in range(3000):
        observed = rng.random()
        p, n = inf.sequential_permutation_p(observed, (rng.random(50) for _ in range(40)), max_draws=1999,
                                            exceedances=10)
        ps.append(p)
        used.append(n)
    ps = np.array(ps)
    assert np.mean(ps <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / len(ps))
    assert np.mean(ps <= 0.5) == pytest.approx(0.5, abs=0.04)
    assert np.median(used) < 40  # a null stops early: median p 0.5 -> about 20 draws


def test_holm_matches_hand_computation_and_keeps_nan():
    np.testing.assert_allclose(inf.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    out = inf.holm([0.5, np.nan, 0.01])
    assert np.isnan(out[1]) and out[2] == pytest.approx(0.02) and out[0] == pytest.approx(0.5)
    assert inf.holm([0.9, 0.8]).max() <= 1.0


def test_corrected_resampled_t_is_wider_than_naive():
    from scipy import stats

    v = np.array([0.7, 0.8, 0.75, 0.72, 0.78, 0.74, 0.79, 0.71, 0.77, 0.76])
    r = inf.corrected_resampled_t(v, n_train=80, n_test=20)
    naive = stats.t.ppf(0.975, 9) * v.std(ddof=1) / np.sqrt(10)
    assert r["ci_high"] - r["mean"] > naive
    assert r["ci_low"] < v.mean() < r["ci_high"] and r["p_value"] < 1e-3
    assert r["note"] is None


def test_corrected_resampled_t_never_claims_p_0_from_zero_variance():
    # identical non-zero fold values: t would be infinite; no p is given (never p = 0), the CI is the point
    r = inf.corrected_resampled_t([0.5, 0.5, 0.5], 8, 2)
    assert np.isnan(r["p_value"]) and r["ci_low"] == r["ci_high"] == r["mean"] == 0.5
    assert "zero variance" in r["note"]
    assert inf.format_p(r["p_value"]) == "p = n/a"
    # identical zeros: no difference in any fold, p = 1
    r = inf.corrected_resampled_t([0.0, 0.0], 8, 2)
    assert r["p_value"] == 1.0 and r["ci_low"] == r["ci_high"] == 0.0 and r["note"]
    # equal up to rounding counts as equal (0.8 - 0.7 and 0.5 - 0.4 differ in the last bits)
    assert np.isnan(inf.corrected_resampled_t(np.array([0.8, 0.5, 0.3]) - np.array([0.7, 0.4, 0.2]), 8, 2)["p_value"])
    # a tiny spread is an ordinary t-test again
    assert 0 < inf.corrected_resampled_t([0.5, 0.5, 0.5 + 1e-9], 8, 2)["p_value"] < 1e-3


def test_paired_comparison():
    a = np.array([0.8, 0.82, 0.79, 0.81, 0.8])
    r = inf.paired_comparison(a, a - 0.1 + np.array([0.01, -0.01, 0.0, 0.005, -0.005]), 80, 20)
    assert r["difference"] == pytest.approx(0.1) and r["ci_low"] > 0.05 and 0 < r["p_value"] < 1e-3
    r = inf.paired_comparison(a, a[::-1], 80, 20)
    assert r["ci_low"] < 0 < r["ci_high"] and r["p_value"] > 0.5
    # a constant difference over all folds: no p, stated in the note (previously p = 0)
    r = inf.paired_comparison(a, a - 0.1, 80, 20)
    assert r["difference"] == pytest.approx(0.1) and np.isnan(r["p_value"]) and r["note"]
    assert not hasattr(inf, "mcnemar")  # removed: it treats tokens of one sentence as independent


def test_cluster_bootstrap_is_wider_for_clustered_values():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(20), 10)
    v = rng.normal(size=20)[g] + 0.01 * rng.normal(size=200)
    clustered = inf.cluster_bootstrap_ci(v, g, n_boot=500)
    naive = inf.cluster_bootstrap_ci(v, None, n_boot=500)
    assert clustered["ci_high"] - clustered["ci_low"] > 2 * (naive["ci_high"] - naive["ci_low"])
    assert clustered["ci_low"] < v.mean() < clustered["ci_high"]


def test_wilcoxon_signed_rank():
    a = np.arange(1, 11, dtype=float)
    r = inf.wilcoxon_signed_rank(a, np.zeros(10))
    assert r["rank_biserial"] == 1.0 and r["p_value"] < 0.01
    assert inf.wilcoxon_signed_rank(np.zeros(4), np.zeros(4))["p_value"] == 1.0


def test_leave_one_group_out_shortcut_equals_refitting():
    """The closed-form inner error equals refitting ridge without each group, for every alpha."""
    from sklearn.linear_model import Ridge

    X, y, g = _leak_data(n_groups=8, per_group=3, p=5, seed=2)
    g[-1] = 99  # one group of another size
    Z = X - X.mean(0)
    T = np.eye(2)[(y == "1").astype(int)]
    U, s, _ = ridge._basis(Z, Z[:1])
    alpha = 0.3 * np.mean(s ** 2)
    press = 0.0
    for grp in np.unique(g):
        out = g == grp
        fit = Ridge(alpha=alpha).fit(X[~out], T[~out])
        press += float(np.sum((T[out] - fit.predict(X[out])) ** 2))
    _, best = ridge._fit_fold(Z, Z[:1], T, np.unique(g, return_inverse=True)[1], 1, [0.3])
    # recompute the shortcut's press for the single factor through the public path
    n = len(Z)
    h = s ** 2 / (s ** 2 + alpha)
    tbar = T.mean(0)
    E = T - (tbar + U @ (h[:, None] * (U.T @ (T - tbar))))
    shortcut = 0.0
    for grp in np.unique(g):
        i = np.flatnonzero(g == grp)
        H = 1 / n + (U[i] * h) @ U[i].T
        shortcut += float(np.sum(np.linalg.solve(np.eye(len(i)) - H, E[i]) ** 2))
    assert shortcut == pytest.approx(press, rel=1e-8)
    assert best.tolist() == [0]


def test_ridge_cv_predictions_equal_sklearn_ridge_at_the_chosen_penalty():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 8))
    y = np.where(X[:, 0] + 0.5 * rng.normal(size=60) > 0, "a", "b")
    splits = inf.repeated_grouped_splits(y, None, folds=3, repeats=1, seed=0)
    res = inf.ridge_cv(X, y, splits, alpha_factors=[0.5])
    for tr, te in splits[0]:
        Z, Zte = inf.standardise(X[tr], X[te])
        s2 = np.linalg.svd(Z - Z.mean(0), compute_uv=False) ** 2
        fit = Ridge(alpha=0.5 * s2.mean()).fit(Z, np.eye(2)[(y[tr] == "b").astype(int)])
        assert np.array_equal(fit.predict(Zte).argmax(1), res.predictions[0, 0, te])


def test_known_answers_planted_null_and_document_leak_trap():
    rng = np.random.default_rng(0)
    # planted: two classes differ in 3 of 40 features
    y = np.repeat(["a", "b"], 50)
    X = rng.normal(size=(100, 40))
    X[y == "b", :3] += 1.5
    splits = inf.repeated_grouped_splits(y, None, folds=5, repeats=2, seed=0)
    perms = inf.fold_permutations(y, None, splits, 19, seed=0)
    planted = inf.ridge_cv(X, y, splits, permuted_labels=perms)
    assert planted.accuracy > 0.85 and planted.p_value == pytest.approx(1 / 20)
    ci = planted.ci()
    assert ci["ci_low"] > 0.7
    # null: no signal
    null = inf.ridge_cv(rng.normal(size=(100, 40)), y, splits, permuted_labels=perms)
    assert 0.3 < null.accuracy < 0.7 and null.p_value > 0.05
    # the trap: document fingerprints, labels random per document
    X, y, g = _leak_data()
    naive = inf.ridge_cv(X, y, inf.repeated_grouped_splits(y, None, folds=5, repeats=2, seed=0))
    gsplits = inf.repeated_grouped_splits(y, g, folds=5, repeats=2, seed=0)
    grouped = inf.ridge_cv(X, y, gsplits, groups=g, permuted_labels=inf.fold_permutations(y, g, gsplits, 19, seed=0))
    assert naive.accuracy > 0.8
    assert 0.25 < grouped.accuracy < 0.75 and grouped.p_value > 0.05


def test_ridge_cv_callable_features_and_threads_agree():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 6))
    y = np.where(X[:, 1] > 0, "x", "y")
    splits = inf.repeated_grouped_splits(y, None, folds=4, repeats=2, seed=0)
    a = inf.ridge_cv(X, y, splits)
    b = inf.ridge_cv(lambda j, tr, te: (X[tr], X[te]), y, splits, n_jobs=2)
    assert np.array_equal(a.predictions, b.predictions)
    assert a.pooled_predictions(0).dtype.kind == "U"
