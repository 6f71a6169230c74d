"""The optimised ridge_cv (closed-form leave-one-group-out, float32 inner error, all penalties and
label permutations at once) pinned to the straightforward computation: every penalty of every
label set tuned by actually refitting ridge without each group, in float64, then refitted on
the training fold. Predictions, chosen penalties and accuracies must be identical."""
from __future__ import annotations

import numpy as np
import pytest

from moescope import inference as inf


def _ridge(Z: np.ndarray, T: np.ndarray, alpha: float):
    """Ridge with an unpenalised intercept, closed form (primal or dual, whichever is smaller)."""
    mu, tbar = Z.mean(0), T.mean(0)
    Zc, Tc = Z - mu, T - tbar
    n, p = Zc.shape
    if p <= n:
        beta = np.linalg.solve(Zc.T @ Zc + alpha * np.eye(p), Zc.T @ Tc)
    else:
        beta = Zc.T @ np.linalg.solve(Zc @ Zc.T + alpha * np.eye(n), Tc)
    return lambda X: tbar + (X - mu) @ beta


def _reference_ridge_cv(X, y, splits, groups, perm_sets, factors):
    """(predictions (R, sets, S), alpha index (R, K, sets)) by brute-force refitting."""
    classes, yi = np.unique(y, return_inverse=True)
    C = len(classes)
    g_all = np.arange(len(y)) if groups is None else np.unique(groups, return_inverse=True)[1]
    R, K = len(splits), len(splits[0])
    sets_all = [np.vstack([yi[None], np.searchsorted(classes, perm_sets[r])]) for r in range(R)]
    preds = np.empty((R, len(sets_all[0]), len(y)), int)
    chosen = np.empty((R, K, len(sets_all[0])), int)
    for r, rep in enumerate(splits):
        for k, (tr, te) in enumerate(rep):
            Z, Zte = inf.standardise(X[tr], X[te])
            s = np.linalg.svd(Z - Z.mean(0), compute_uv=False)
            s = s[s > s.max() * 1e-8]
            alphas = np.asarray(factors) * np.mean(s ** 2)
            gtr = g_all[tr]
            for si, labels in enumerate(sets_all[r]):
                T = np.eye(C)[labels[tr]]
                press = []
                for a in alphas:
                    err = 0.0
                    for grp in np.unique(gtr):
                        out = gtr == grp
                        err += float(np.sum((T[out] - _ridge(Z[~out], T[~out], a)(Z[out])) ** 2))
                    press.append(err)
                press = np.asarray(press)
                best = len(alphas) - 1 - int(np.argmin(press[::-1]))  # ties -> the stronger penalty
                chosen[r, k, si] = best
                preds[r, si, te] = _ridge(Z, T, alphas[best])(Zte).argmax(1)
    return preds, chosen


@pytest.mark.parametrize("p, grouped", [(6, False), (50, False), (6, True), (50, True)])
def test_optimised_ridge_cv_equals_brute_force_refitting(p, grouped):
    rng = np.random.default_rng(p + grouped)
    n_groups, per = (12, 3) if grouped else (36, 1)
    groups = np.repeat(np.arange(n_groups), per) if grouped else None
    y = np.repeat(np.array(["a", "b", "c"]), n_groups // 3)
    y = y[np.repeat(np.arange(n_groups), per)] if grouped else y
    X = rng.normal(size=(len(y), p))
    X[y == "b", 0] += 1.0
    X[y == "c", 1] += 1.0
    factors = (1e-3, 1e-1, 1.0, 10.0)
    splits = inf.repeated_grouped_splits(y, groups, folds=3, repeats=2, seed=0)
    perms = inf.fold_permutations(y, groups, splits, 3, seed=1)
    res = inf.ridge_cv(X, y, splits, groups=groups, permuted_labels=perms, alpha_factors=factors, n_jobs=2)
    ref_pred, ref_alpha = _reference_ridge_cv(X, y, splits, groups, perms, factors)
    assert np.array_equal(res.predictions, ref_pred)
    assert np.array_equal(res.alpha_factor, np.asarray(factors)[ref_alpha[:, :, 0]])
    ref_acc = np.mean(ref_pred[:, 0] == np.unique(y, return_inverse=True)[1][None], axis=1).mean()
    assert res.accuracy == pytest.approx(ref_acc, abs=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_counts_of_sequences_equals_counts_of_their_rows(weighted):
    """The slice-based count of a fold's assignments equals the index-based one (sequences split
    over several segments, in any order)."""
    from moescope.analysis.signature_controls import SequenceTokenExperts

    rng = np.random.default_rng(3)
    seq = np.repeat(rng.permutation(np.tile(np.arange(9), 3)), rng.integers(1, 6, size=27))
    key = rng.integers(0, 2 * 5 * 4, size=len(seq))
    n = rng.integers(1, 4, size=len(seq)) if weighted else None
    ste = SequenceTokenExperts(key, n, *_segments(seq), np.arange(5), (2, 5, 4))
    for fold in ([0, 3, 4], [8], [], list(range(9)), [2, 20]):
        assert np.array_equal(ste.counts_of(np.array(fold, int), minlength=40), ste.counts(ste.rows_of(np.array(fold, int)), minlength=40))


def _segments(seq):
    """(segment_seq, segment_start, segment_len) of runs of equal sequence index, in file order."""
    starts = np.r_[0, np.flatnonzero(np.diff(seq)) + 1]
    return seq[starts], starts.astype(np.int64), np.diff(np.r_[starts, len(seq)]).astype(np.int64)
