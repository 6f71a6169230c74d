"""The ridge classifier's fold fit in feature space, for many more items than features.

moescope.inference.ridge_cv fits each training fold through the thin SVD of the standardised
training features (n x p) and keeps the one-hot targets of every label set (n x classes x
label sets). At 200,000 training sequences x 1,024 features x 201 label sets that is several GB
of float64. :func:`fit_fold_pspace` computes the same fit from p x p and p x M sums accumulated
over blocks of rows (M = classes x label sets), so its memory is one block of rows plus those
sums, whatever n; ridge_cv dispatches to it (see :func:`pspace_wanted`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
#: The p-space fold fit is taken when the training rows x features exceed this many cells and the
#: training fold has at least twice as many rows as features (as many, for sparse rows; or the features are a
#: moescope.chunked.ChunkedMatrix), with at most PSPACE_MAX_FEATURES features (its p x p Gram
#: matrix is factorised once per fold). Tests set PSPACE_MIN_CELLS to 0 to force it.
PSPACE_MIN_CELLS = 1 << 24
PSPACE_MAX_FEATURES = 8192


def pspace_wanted(X: Any, n_train: int) -> bool:
    """Whether ridge_cv should fit a fold with :func:`fit_fold_pspace` (see PSPACE_MIN_CELLS)."""
    from moescope.chunked import ChunkedMatrix

    p = X.shape[1]
    if p > PSPACE_MAX_FEATURES:
        return False
    # sparse rows: the Gram matrix costs their non-zeros, so p x p beats densifying n x p whenever n >= p
    enough_rows = n_train >= (p if hasattr(X, "tocsr") else 2 * p)
    return isinstance(X, ChunkedMatrix) or (enough_rows and n_train * p > PSPACE_MIN_CELLS)


def _onehot_rows(labels: np.ndarray, C: int) -> np.ndarray:
    """(rows, n_sets * C) float64 one-hot of labels (n_sets, rows): set m, class c at column m * C + c."""
    n_sets, rows = labels.shape
    out = np.zeros((rows, n_sets * C))
    out[np.arange(rows)[:, None], np.arange(n_sets)[None, :] * C + labels.T] = 1.0
    return out


def fit_fold_pspace(Xtr: Any, tr_rows: np.ndarray, Xte: Any, te_rows: np.ndarray, labels: np.ndarray, C: int,
                     g_train: np.ndarray, factors: Sequence[float], standardize: bool,
                     block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """moescope.inference.ridge._fit_fold for n >> p without any n x p or n x (label sets x C) array.

    The training rows (rows `tr_rows` of Xtr) are read a block at a time (dense, sparse or
    moescope.chunked.ChunkedMatrix): one pass accumulates the column sums, the p x p Gram
    matrix and X'T (in float64, around a shift so that centring loses no precision); its eigen
    decomposition gives the same basis as the SVD of the standardised features (U = Z V / s);
    a second pass computes every penalty's exact leave-one-group-out (or leave-one-out) error
    from U's rows block by block; the test rows (rows `te_rows` of Xte) are scored a block at a
    time. labels: (n_sets, n_train) class index of every training item (in tr_rows order) in
    every label set (set 0 the real one).
    Returns (predicted class (n_sets, n_test), chosen factor index per set), as _fit_fold's
    scores would give after argmax (equal up to floating-point rounding)."""
    from moescope.chunked import BLOCK_ROWS
    from moescope.inference.ridge import _group_index

    block = block_rows or BLOCK_ROWS
    n, p = len(tr_rows), Xtr.shape[1]
    n_sets = labels.shape[0]
    M = n_sets * C
    tr_labels = labels
    sparse = hasattr(Xtr, "tocsr")
    # pass 1: shift (dense rows: centring then loses no precision), column sums, Gram, X'T, label counts
    shift = np.zeros(p) if sparse else _raw(Xtr, tr_rows[:block]).mean(axis=0)
    s1, G, XT, tsum = np.zeros(p), np.zeros((p, p)), np.zeros((p, M)), np.zeros(M)
    for lo in range(0, n, block):
        T = _onehot_rows(tr_labels[:, lo:lo + block], C)
        Xc = _raw(Xtr, tr_rows[lo:lo + block])
        if sparse:  # sparse products: cost in non-zeros, not n x p
            s1 += np.asarray(Xc.sum(axis=0)).ravel()
            G += (Xc.T @ Xc).toarray()
        else:
            Xc = Xc - shift
            s1 += Xc.sum(axis=0)
            G += Xc.T @ Xc
        XT += np.asarray(Xc.T @ T)
        tsum += T.sum(axis=0)
    mu_s = s1 / n  # mean of the shifted columns
    Gc = G - n * np.outer(mu_s, mu_s)  # centred cross-products
    mu = shift + mu_s
    if standardize:
        sd = np.sqrt(np.maximum(np.diag(Gc), 0.0) / n)
        sd[sd == 0] = 1.0
    else:
        sd = np.ones(p)
    tbar = tsum / n
    ZT = (XT - np.outer(mu_s, tsum)) / sd[:, None]  # Z'T = Z'(T - tbar): Z's columns sum to 0
    lam, V = np.linalg.eigh(Gc / np.outer(sd, sd))
    keep = lam > max(lam.max(initial=0.0), 0.0) * 1e-10
    V, s = V[:, keep], np.sqrt(lam[keep])
    s2 = s ** 2
    UT = (V.T @ ZT) / s[:, None]  # (r, M)
    alphas = np.asarray(factors) * (s2.mean() if len(s2) else 1.0)
    H = s2[None, :] / (s2[None, :] + alphas[:, None])
    proj = V / (sd[:, None] * s[None, :])  # a raw row x: U row = (x - mu) @ proj
    UT32 = UT.astype(np.float32)
    press = np.zeros((len(alphas), n_sets))
    buckets = _group_index(g_train)

    def u_rows(pos: np.ndarray) -> np.ndarray:
        return _centred_product(_raw(Xtr, tr_rows[pos]), mu, proj)

    if all(idx.shape[1] == 1 for idx in buckets):  # leave-one-out: leverage-weighted residuals
        for lo in range(0, n, block):
            pos = np.arange(lo, min(lo + block, n))
            U = u_rows(pos)
            lev = 1.0 / n + (U * U) @ H.T
            w = (1.0 / np.maximum(1.0 - lev, 1e-12) ** 2).astype(np.float32)
            Tc = (_onehot_rows(tr_labels[:, pos], C) - tbar).astype(np.float32)
            U32 = U.astype(np.float32)
            for ai in range(len(alphas)):
                E = Tc - U32 @ (H[ai][:, None].astype(np.float32) * UT32)
                np.square(E, out=E)
                press[ai] += (w[:, ai] @ E).reshape(n_sets, -1).sum(axis=1)
    else:  # whole groups at a time: the exact leave-one-group-out residuals
        for idx in buckets:
            m = idx.shape[1]
            per = max(1, block // m)
            for glo in range(0, len(idx), per):
                gidx = idx[glo:glo + per]  # (G, m) training positions
                flat = gidx.reshape(-1)
                U = u_rows(flat)
                Tc = (_onehot_rows(tr_labels[:, flat], C) - tbar).astype(np.float32)
                U32 = U.astype(np.float32)
                Ug = U.reshape(len(gidx), m, -1)
                for ai in range(len(alphas)):
                    h = H[ai]
                    E = Tc - U32 @ (h[:, None].astype(np.float32) * UT32)
                    if m == 1:
                        hii = 1.0 / n + np.einsum("ir,r,ir->i", U, h, U)
                        e = E / np.maximum(1.0 - hii, 1e-12)[:, None]
                    else:
                        Hgg = 1.0 / n + np.einsum("gir,r,gjr->gij", Ug, h, Ug)
                        e = np.linalg.solve(np.eye(m)[None] - Hgg, E.reshape(len(gidx), m, -1)).reshape(-1, M)
                    press[ai] += np.einsum("ij,ij->j", e, e).reshape(n_sets, -1).sum(axis=1)
    best = len(alphas) - 1 - np.argmin(press[::-1], axis=0)  # ties -> the stronger penalty
    # coefficients per label set (p x M, from its chosen penalty), then the test rows by blocks
    W = np.empty((p, M))
    for ai in np.unique(best):
        sets = np.flatnonzero(best == ai)
        cols = (sets[:, None] * C + np.arange(C)[None, :]).reshape(-1)
        W[:, cols] = (V / sd[:, None]) @ ((s / (s2 + alphas[ai]))[:, None] * UT[:, cols])
    pred = np.empty((n_sets, len(te_rows)), np.int64)
    for lo in range(0, len(te_rows), block):
        scores = tbar + _centred_product(_raw(Xte, te_rows[lo:lo + block]), mu, W)
        pred[:, lo:lo + block] = scores.reshape(-1, n_sets, C).argmax(axis=2).T
    return pred, best


def _raw(X: Any, idx: np.ndarray) -> Any:
    """Rows idx of X: scipy sparse stays sparse (CSR), anything else dense float64."""
    from moescope.chunked import ChunkedMatrix

    if isinstance(X, ChunkedMatrix):
        return np.asarray(X.take(idx), np.float64)
    if hasattr(X, "tocsr"):
        return X.tocsr()[idx] if not hasattr(X, "indptr") else X[idx]
    return np.asarray(X[idx], np.float64)


def _centred_product(raw: Any, mu: np.ndarray, M: np.ndarray) -> np.ndarray:
    """(raw - mu) @ M, without densifying sparse rows."""
    if hasattr(raw, "tocsr"):
        return np.asarray(raw @ M) - mu @ M
    return (raw - mu) @ M
