"""The p-space fold fit (moescope.inference.ridge_pspace) equals ridge_cv's direct fit, and large
permutation sets stay compact (PermutedLabels, predictions not kept)."""
from __future__ import annotations

import numpy as np
import pytest

from moescope import chunked, inference as inf
from moescope.inference import ridge_pspace


class _Rows(chunked.ChunkedMatrix):
    """A ChunkedMatrix over a dense array (what a lazily built feature matrix looks like)."""

    def __init__(self, X: np.ndarray) -> None:
        super().__init__(*X.shape)
        self.X = X

    def _dense(self, rows: np.ndarray, cols: slice) -> np.ndarray:
        return self.X[rows, cols]


def _problem(grouped: bool, p: int = 8, n_groups: int = 60, per: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    per = per if grouped else 1
    groups = np.repeat(np.arange(n_groups), per) if grouped else None
    y = np.tile(np.array(["a", "b", "c"]), n_groups // 3)[np.repeat(np.arange(n_groups), per)]
    X = rng.normal(size=(len(y), p))
    X[:, 3] = 5.0  # a constant column (sd 0)
    X[y == "b", 0] += 1.0
    X[y == "c", 1] += 0.8
    X[:, 2] = X[:, 0] + X[:, 1]  # rank-deficient, as signatures are (each layer sums to k)
    return X, y, groups


@pytest.mark.parametrize("grouped, standardize", [(False, True), (True, True), (True, False)])
def test_pspace_path_equals_direct_fit(monkeypatch, grouped, standardize):
    X, y, groups = _problem(grouped)
    splits = inf.repeated_grouped_splits(y, groups, folds=3, repeats=2, seed=0)
    perms = inf.fold_permutations(y, groups, splits, 9, seed=1)
    direct = inf.ridge_cv(X, y, splits, groups=groups, permuted_labels=perms, standardize=standardize)
    monkeypatch.setattr(ridge_pspace, "PSPACE_MIN_CELLS", 0)
    monkeypatch.setattr(chunked, "BLOCK_ROWS", 7)  # many blocks, groups cut across them
    for features in (X, _Rows(X), lambda j, tr, te: (_Rows(X)[tr], _Rows(X)[te])):
        fast = inf.ridge_cv(features, y, splits, groups=groups, permuted_labels=perms, standardize=standardize)
        assert np.array_equal(fast.predictions, direct.predictions)
        assert np.array_equal(fast.alpha_factor, direct.alpha_factor)
        assert fast.accuracy == direct.accuracy and fast.p_value == direct.p_value


def test_pspace_path_takes_sparse_rows_without_densifying(monkeypatch):
    from scipy.sparse import csr_matrix

    X, y, groups = _problem(True)
    X = np.where(np.random.default_rng(1).random(X.shape) < 0.5, 0.0, np.abs(X))  # half zeros, like tf-idf
    splits = inf.repeated_grouped_splits(y, groups, folds=3, repeats=2, seed=0)
    direct = inf.ridge_cv(X, y, splits, groups=groups, standardize=False)
    monkeypatch.setattr(ridge_pspace, "PSPACE_MIN_CELLS", 0)
    sparse = inf.ridge_cv(lambda j, tr, te: (csr_matrix(X[tr]), csr_matrix(X[te])), y, splits, groups=groups,
                          standardize=False)
    assert np.array_equal(sparse.predictions, direct.predictions)
    assert np.array_equal(sparse.alpha_factor, direct.alpha_factor)


def test_permuted_label_codes_equal_the_labels_and_large_sets_keep_null_accuracies(monkeypatch):
    X, y, groups = _problem(True)
    splits = inf.repeated_grouped_splits(y, groups, folds=3, repeats=2, seed=0)
    labels = inf.fold_permutations(y, groups, splits, 9, seed=1)
    codes = inf.fold_permutations(y, groups, splits, 9, seed=1, as_codes=True)
    assert codes.codes.dtype == np.int8 and np.array_equal(np.asarray(codes), labels)
    full = inf.ridge_cv(X, y, splits, groups=groups, permuted_labels=labels)
    monkeypatch.setattr(inf.ridge, "KEEP_PREDICTIONS_MAX", 0)  # read where ridge_cv runs
    small = inf.ridge_cv(X, y, splits, groups=groups, permuted_labels=codes)
    assert small.predictions.shape[1] == 1 and np.array_equal(small.predictions[:, 0], full.predictions[:, 0])
    assert np.allclose(small.null_accuracy, full.null_accuracy) and small.p_value == full.p_value
