"""Within- and across-label cosine similarity of signature vectors (and Cohen's d between them),
exact and in bounded memory: used by the signatures, their controls and their figures."""
from __future__ import annotations

from typing import Any

import numpy as np

from moescope.chunked import BLOCK_ROWS, dense_rows, lazy_wanted


def cosine_stats(X: Any, y: np.ndarray) -> dict[str, float]:
    """Mean and sd of the cosine similarity over all pairs of sequences with the same label
    (within) and with different labels (across), and Cohen's d = (within - across) / pooled sd.

    Exact, without the S x S matrix: for unit vectors U, the sum of pairwise cosines is
    (|sum U|^2 - n) / 2 and the sum of their squares (|U^T U|_F^2 - n) / 2. X: an array or a
    moescope.chunked.ChunkedMatrix; a large X is read a block of rows at a time (the sums add up)."""
    y = np.asarray(y)
    block = max(len(X) if not lazy_wanted(*X.shape) else BLOCK_ROWS, 1)
    p = X.shape[1]
    tot_vec, tot_gram = np.zeros(p), np.zeros((p, p))
    w_sum = w_sq = w_n = n_all = 0.0
    for c in np.unique(y):  # one class at a time: a single p x p sum besides the total's
        rows = np.flatnonzero(y == c)
        vec, gram, nc = np.zeros(p), np.zeros((p, p)), 0.0
        for lo in range(0, len(rows), block):
            Xb = dense_rows(X, rows[lo:lo + block])
            norms = np.linalg.norm(Xb, axis=1, keepdims=True)
            Uc = np.divide(Xb, norms, out=np.zeros_like(Xb, dtype=np.float64), where=norms > 0)
            vec += Uc.sum(0)
            gram += Uc.T @ Uc
            nc += float((norms[:, 0] > 0).sum())
        w_sum += (np.sum(vec ** 2) - nc) / 2
        w_sq += (np.sum(gram ** 2) - nc) / 2
        w_n += len(rows) * (len(rows) - 1) / 2
        tot_vec += vec
        tot_gram += gram
        n_all += nc
    tot_sum = (np.sum(tot_vec ** 2) - n_all) / 2
    tot_sq = (np.sum(tot_gram ** 2) - n_all) / 2
    tot_n = len(y) * (len(y) - 1) / 2
    a_sum, a_sq, a_n = tot_sum - w_sum, tot_sq - w_sq, tot_n - w_n

    def mean_sd(s: float, sq: float, n: float) -> tuple[float, float]:
        if n < 1:
            return float("nan"), float("nan")
        mean = s / n
        var = max(sq / n - mean ** 2, 0.0) * (n / (n - 1) if n > 1 else 1.0)
        return mean, float(np.sqrt(var))

    wm, wsd = mean_sd(w_sum, w_sq, w_n)
    am, asd = mean_sd(a_sum, a_sq, a_n)
    pooled = np.sqrt(((w_n - 1) * wsd ** 2 + (a_n - 1) * asd ** 2) / max(w_n + a_n - 2, 1))
    d = (wm - am) / pooled if pooled > 0 else float("nan")
    return {"within_cosine_mean": wm, "within_cosine_sd": wsd, "across_cosine_mean": am, "across_cosine_sd": asd,
            "cohens_d": float(d), "n_within_pairs": int(w_n), "n_across_pairs": int(a_n)}
