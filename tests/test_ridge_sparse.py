"""The sparse dual fold basis (moescope.inference.ridge_sparse) equals ridge_cv's dense fit and never
builds an n x p array: a bag of token ids over a real vocabulary (tens of thousands of ids) stays
sparse."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import sparse

from moescope import inference as inf
from moescope.inference import ridge, ridge_sparse


def _bag(n_groups: int = 40, per: int = 2, p: int = 600, seed: int = 0):
    """Sparse non-negative counts (like token ids per sequence), wider than long, with a class
    signal in a few columns and a constant column."""
    rng = np.random.default_rng(seed)
    n = n_groups * per
    groups = np.repeat(np.arange(n_groups), per)
    y = np.tile(np.array(["a", "b", "c"]), n_groups)[:n_groups][groups]
    X = (rng.random((n, p)) < 0.03) * rng.integers(1, 4, size=(n, p)).astype(np.float64)
    X[np.ix_(y == "b", np.arange(0, 40))] += 1.0
    X[np.ix_(y == "c", np.arange(40, 80))] += 1.0
    X[:, 100] = 1.0  # sd 0
    return X, y, groups


@pytest.mark.parametrize("grouped, standardize", [(False, True), (False, False), (True, True), (True, False)])
def test_sparse_dual_path_equals_dense_fit(grouped, standardize, monkeypatch):
    monkeypatch.setattr(ridge_sparse, "SPARSE_MAX_DENSITY", 1.0)  # this small bag takes the sparse path
    X, y, groups = _bag()
    groups = groups if grouped else None
    splits = inf.repeated_grouped_splits(y, groups, folds=3, repeats=2, seed=0)
    perms = inf.fold_permutations(y, groups, splits, 9, seed=1)
    dense = inf.ridge_cv(X, y, splits, groups=groups, permuted_labels=perms, standardize=standardize)
    S = sparse.csr_matrix(X)
    for features in (S, lambda j, tr, te: (S[tr], S[te])):
        fast = inf.ridge_cv(features, y, splits, groups=groups, permuted_labels=perms, standardize=standardize)
        assert np.array_equal(fast.predictions, dense.predictions)
        assert np.array_equal(fast.alpha_factor, dense.alpha_factor)
        assert fast.accuracy == dense.accuracy and fast.p_value == dense.p_value
    assert dense.accuracy > 0.6  # the planted columns are found


def test_sparse_basis_spans_the_same_gram_matrices():
    X, _, _ = _bag(p=300)
    tr, te = np.arange(60), np.arange(60, 80)
    Z, Zte = ridge.standardise(X[tr], X[te])
    U, s, A = ridge._basis(Z, Zte)
    Us, ss, As = ridge_sparse.sparse_dual_basis(sparse.csr_matrix(X[tr]), sparse.csr_matrix(X[te]),
                                                standardize=True, block_rows=7)
    assert np.allclose((Us * ss ** 2) @ Us.T, (U * s ** 2) @ U.T, atol=1e-8)  # Z Z'
    assert np.allclose((As * ss) @ Us.T, (A * s) @ U.T, atol=1e-8)  # Zte Z'


def test_a_vocabulary_wide_bag_is_never_densified():
    """200 sequences x 2,000,000 token-id columns: dense, one fold's training rows alone would be
    2.1 GB; the sparse path holds the n x n Gram matrix and the sparse rows."""
    rng = np.random.default_rng(0)
    n, p = 200, 2_000_000
    y = np.repeat(np.array(["a", "b"]), n // 2)
    rows = np.repeat(np.arange(n), 30)
    cols = rng.integers(0, p, size=len(rows))
    cols[: n // 2 * 30: 30] = 7  # class a: token 7 in every sequence
    X = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, p))
    splits = inf.repeated_grouped_splits(y, None, folds=2, repeats=1, seed=0)
    tracemalloc.start()
    try:
        res = inf.ridge_cv(X, y, splits, standardize=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2 ** 20, f"peak {peak / 2**20:.0f} MiB"
    assert res.accuracy > 0.9


def test_sparse_path_only_where_sparse_products_pay_or_dense_would_not_fit():
    rng = np.random.default_rng(0)
    few_ids = sparse.random(400, 4096, density=0.22, format="csr", random_state=rng)  # 4k ids, long sequences
    real_vocab = sparse.random(400, 50_000, density=0.008, format="csr", random_state=rng)
    assert not ridge_sparse.sparse_dual_wanted(few_ids, 320)  # dense BLAS is faster there
    assert ridge_sparse.sparse_dual_wanted(real_vocab, 320)
    assert not ridge_sparse.sparse_dual_wanted(real_vocab, 60_000)  # more rows than columns: not the dual
    huge = sparse.random(2000, 17_000, density=0.06, format="csr", random_state=rng)  # 34M cells densified
    assert ridge_sparse.sparse_dual_wanted(huge, 1600)
