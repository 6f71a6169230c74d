"""Feature matrices too large to hold as one dense array, read a block of rows at a time.

At 250,000 sequences x 16 MoE layers x 64 experts, a signature matrix is 2 GB of float64, and
the classifier used to copy it (standardising, per fold). A :class:`ChunkedMatrix` keeps what
the values are computed from (e.g. uint16 counts and the token counts that divide them) and
builds dense rows only for the rows asked for; the ridge classifier's p-space path
(moescope.inference) reads its training and test rows this way, a bounded block at a time.

Indexing is lazy: ``M[rows]`` and ``M[:, a:b]`` (and ``M[rows, a:b]``) return views that
remember the selection; :meth:`ChunkedMatrix.block` (or ``np.asarray``) builds the dense rows.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

#: Above this many cells (rows x columns) the analyses keep features as a ChunkedMatrix and the
#: classifier takes its p-space path; below it everything stays a dense float64 array (the
#: results are then bit-identical to the in-memory computation). Tests set it to 0.
LAZY_CELLS = 1 << 24

#: Rows per dense block read from a ChunkedMatrix (x columns x 8 bytes: 64 MB at 1,024 columns).
BLOCK_ROWS = 8192


def lazy_wanted(n_rows: int, n_cols: int) -> bool:
    """Whether a (n_rows, n_cols) feature matrix should be kept chunked (see LAZY_CELLS)."""
    return n_rows * n_cols > LAZY_CELLS


class ChunkedMatrix:
    """A (rows, columns) matrix built on demand. Subclasses implement :meth:`_dense`.

    rows: the selected rows of the underlying matrix (None: all); cols: a column slice
    (step 1) of the underlying matrix."""

    def __init__(self, n_rows: int, n_cols: int, rows: np.ndarray | None = None, cols: slice | None = None) -> None:
        self._n_rows, self._n_cols = n_rows, n_cols
        self.rows = rows
        self.cols = cols if cols is not None else slice(0, n_cols)

    # -- what a subclass provides ----------------------------------------------------------------
    def _dense(self, rows: np.ndarray, cols: slice) -> np.ndarray:
        """Dense float rows `rows` (indices into the underlying matrix), columns `cols`."""
        raise NotImplementedError

    def _view(self, rows: np.ndarray | None, cols: slice) -> "ChunkedMatrix":
        """The same matrix with another selection (subclasses copy their data references)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.rows, out.cols = rows, cols
        return out

    # -- the array-like surface -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        n = self._n_rows if self.rows is None else len(self.rows)
        return n, self.cols.stop - self.cols.start

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    def _base_rows(self, sel: Any) -> np.ndarray:
        """Indices into the underlying matrix of the rows `sel` of this view."""
        idx = np.arange(self._n_rows) if self.rows is None else self.rows
        return np.asarray(idx[sel], np.int64).reshape(-1)

    def __getitem__(self, key: Any) -> "ChunkedMatrix":
        rows_key, col_key = (key if isinstance(key, tuple) else (key, slice(None)))
        if isinstance(rows_key, slice) and rows_key == slice(None):
            rows = self.rows
        else:
            if isinstance(rows_key, np.ndarray) and rows_key.dtype == bool:
                rows_key = np.flatnonzero(rows_key)
            rows = self._base_rows(rows_key)
        start, stop, step = col_key.indices(self.shape[1])
        if step != 1:
            raise IndexError("a ChunkedMatrix takes column slices with step 1")
        cols = slice(self.cols.start + start, self.cols.start + max(stop, start))
        return self._view(rows, cols)

    def block(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Dense rows lo..hi of this view (float64 or float32, see the subclass)."""
        return self._dense(self._base_rows(slice(lo, hi)), self.cols)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Dense rows `idx` (indices into this view)."""
        return self._dense(self._base_rows(np.asarray(idx, np.int64)), self.cols)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.block()
        return out if dtype is None else out.astype(dtype)

    def toarray(self) -> np.ndarray:
        return self.block()


def row_blocks(X: Any, block_rows: int = BLOCK_ROWS) -> Iterator[np.ndarray]:
    """Dense float64 blocks of consecutive rows of X (ndarray, scipy sparse or ChunkedMatrix)."""
    for lo in range(0, X.shape[0], block_rows):
        yield dense_rows(X, slice(lo, lo + block_rows))


def dense_rows(X: Any, sel: Any) -> np.ndarray:
    """Rows `sel` (a slice or an index array) of X as a dense float64 array."""
    if isinstance(X, ChunkedMatrix):
        part = X.block(sel.start, sel.stop) if isinstance(sel, slice) else X.take(sel)
        return np.asarray(part, np.float64)
    part = X[sel]
    if hasattr(part, "toarray"):
        part = part.toarray()
    return np.asarray(part, np.float64)
