"""The ridge classifier's fold basis for sparse features with more columns than training rows.

A bag of token ids over a real model's vocabulary has tens of thousands of columns (one per id
present: OLMoE 50k, Qwen 151k) and few non-zeros per row. Densifying the training fold to
take the n x n Gram matrix of the centred features, as :func:`moescope.inference.ridge._basis`
does, costs n x p float64 (1.3 GB at 4,000 sequences x 40,000 ids) and n^2 x p multiply-adds.
:func:`sparse_dual_basis` builds the same Gram matrix from sparse products, a block of rows at a
time, with the centring (and scaling) applied as rank-one corrections, so memory is the n x n
Gram matrix plus the sparse rows and the cost follows the non-zeros.
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: Rows per block of the sparse Gram products (a block's n x rows slice is densified).
GRAM_BLOCK_ROWS = 2048
#: Sparse products beat dense BLAS below this share of non-zeros (a real vocabulary's bag of
#: tokens: about 1%); denser small matrices (a 4,096-id bag over 1,024-token sequences: 22%) are
#: densified as before, unless that would take more than DENSE_MAX_CELLS cells.
SPARSE_MAX_DENSITY = 0.05
DENSE_MAX_CELLS = 1 << 25  # 256 MB of float64


def sparse_dual_wanted(X: Any, n_train: int) -> bool:
    """Whether a fold's training features should go through :func:`sparse_dual_basis`: scipy
    sparse with more columns than training rows (the regime where _basis takes the n x n Gram),
    and either sparse enough for sparse products to pay or too large to densify."""
    if not (hasattr(X, "tocsr") and X.shape[1] > n_train):
        return False
    cells = X.shape[0] * X.shape[1]
    return X.nnz < SPARSE_MAX_DENSITY * cells or cells > DENSE_MAX_CELLS


def _column_moments(X: Any) -> tuple[np.ndarray, np.ndarray]:
    """Column means and population SDs of a sparse matrix (SD 0 -> 1, as ridge.standardise)."""
    n = X.shape[0]
    mu = np.asarray(X.sum(axis=0)).ravel() / n
    sq = np.asarray(X.multiply(X).sum(axis=0)).ravel() / n
    sd = np.sqrt(np.maximum(sq - mu * mu, 0.0))
    sd[sd == 0] = 1.0
    return mu, sd


def _gram(A: Any, B: Any, block_rows: int) -> np.ndarray:
    """Dense A @ B.T of two sparse CSR matrices, a block of A's rows at a time."""
    out = np.empty((A.shape[0], B.shape[0]))
    Bt = B.T.tocsc()
    for lo in range(0, A.shape[0], block_rows):
        out[lo:lo + block_rows] = (A[lo:lo + block_rows] @ Bt).toarray()
    return out


def sparse_dual_basis(X_train: Any, X_test: Any, *, standardize: bool,
                      block_rows: int = GRAM_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U (n, r), s (r,), A (n_test, r)) of the centred (and, with `standardize`, scaled)
    training features, exactly what ridge._basis returns for the dense matrices, from sparse
    rows: with Y = X D^-1 (D the training SDs, or 1) and m = mu D^-1, the centred Gram matrix is
    Y Y' - (Y m) 1' - 1 (Y m)' + m.m, and the test rows' products Yte Y' - (Yte m) 1' - 1 (Y m)' + m.m.
    Memory: the n x n and n_test x n products (float64) and the sparse rows; no n x p array."""
    from scipy import sparse

    Xtr = sparse.csr_matrix(X_train, dtype=np.float64)
    Xte = sparse.csr_matrix(X_test, dtype=np.float64)
    mu, sd = _column_moments(Xtr)
    if not standardize:
        sd = np.ones_like(sd)
    scale = sparse.diags(1.0 / sd)
    Ytr, Yte = Xtr @ scale, Xte @ scale
    m = mu / sd
    r_tr, r_te, mm = Ytr @ m, Yte @ m, float(m @ m)
    K = _gram(Ytr, Ytr, block_rows)
    K -= r_tr[:, None]
    K -= r_tr[None, :]
    K += mm
    Kte = _gram(Yte, Ytr, block_rows)
    Kte -= r_te[:, None]
    Kte -= r_tr[None, :]
    Kte += mm
    lam, Q = np.linalg.eigh(K)
    keep = lam > max(lam.max(initial=0.0), 0.0) * 1e-10
    U, s = Q[:, keep], np.sqrt(lam[keep])
    return U, s, Kte @ U / s
