"""Signature vectors built on demand from the per-sequence counts (for many sequences).

A signature row is a sequence's expert counts divided by its token count, per layer. At
250,000 sequences x 16 layers x 64 experts the dense float64 matrix is 2 GB; the uint16 counts
it comes from are 0.5 GB. :class:`SignatureMatrix` keeps the counts and builds float64 rows for
the rows (and layers) asked for, a block at a time (see moescope.chunked).
"""
from __future__ import annotations

import numpy as np

from moescope.chunked import ChunkedMatrix


class SignatureMatrix(ChunkedMatrix):
    """(S, L * E) signatures counts / n_tokens (0 where a layer saw no token), built per block.

    counts: (S, L, E) integer (or float) counts; n_tokens: (S, L) their denominators."""

    def __init__(self, counts: np.ndarray, n_tokens: np.ndarray) -> None:
        S, L, E = counts.shape
        super().__init__(S, L * E)
        self.counts, self.n_tokens, self.E = counts, n_tokens, E

    def _dense(self, rows: np.ndarray, cols: slice) -> np.ndarray:
        return layer_block(self.counts, self.n_tokens, rows, cols, self.E)


def layer_block(counts: np.ndarray, n_tokens: np.ndarray, rows: np.ndarray, cols: slice, E: int) -> np.ndarray:
    """Rows `rows`, flat columns `cols` of counts / n_tokens as float64 (only the layers the
    columns touch are read)."""
    l0, l1 = cols.start // E, -(-cols.stop // E)
    c = np.asarray(counts[rows, l0:l1], np.float64)
    n = np.asarray(n_tokens[rows, l0:l1], np.float64)[:, :, None]
    sig = np.divide(c, n, out=np.zeros(c.shape), where=n > 0).reshape(len(rows), -1)
    return sig[:, cols.start - l0 * E:cols.stop - l0 * E]
