"""Integer arrays that grow with the trace kept in an anonymous temporary file, not in memory.

:class:`SpilledKeys` (append-only keys) and :class:`SpilledCounts` (a fixed-shape count array
written during the counting pass): both live in anonymous temporary files, removed by the OS
when closed, collected, or when the process ends, also on error.

The per-fold token-id control needs every expert assignment of every analysed sequence as a
4-byte key (:class:`moescope.analysis.signature_controls.SequenceTokenExperts`): 320 MB on a
10M-row trace, growing with rows. Written to disk as the counting pass goes and read back by
contiguous slices, the analysis's memory no longer grows with them (read pages stay in the OS
page cache, which is not this process's memory).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np


class SpilledKeys:
    """An append-only int array in an anonymous temporary file (deleted when closed or
    collected), read back by slices with os.pread (thread-safe: no shared file position)."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self._file = tempfile.TemporaryFile(prefix="moescope-keys-")
        self._len = 0

    def append(self, values: np.ndarray) -> None:
        """Write `values` (cast to this dtype) after the keys so far."""
        data = np.ascontiguousarray(values, self.dtype)
        self._file.write(data.tobytes())
        self._len += len(data)

    def finish(self) -> "SpilledKeys":
        """Flush the writes (call once the pass is over, before reading)."""
        self._file.flush()
        return self

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._len)
            if step != 1:
                return self[start:stop][::step]
            if stop <= start:
                return np.zeros(0, self.dtype)
            size = self.dtype.itemsize
            raw = os.pread(self._file.fileno(), (stop - start) * size, start * size)
            return np.frombuffer(raw, self.dtype)
        return self[:][np.asarray(index)]  # an index array: a whole read (small inputs only)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class SpilledCounts:
    """A fixed-shape (S, ...) count array in an anonymous temporary file (deleted when closed or
    collected, also on error): the per-(sequence, position bucket, layer, expert) counts of the
    signatures, 3 GB of uint16 at 250,000 sequences x 6 buckets x 16 layers x 64 experts.

    Written through a memory map that is dropped and re-opened every REMAP_BYTES of writes, so
    the written pages leave this process (the OS writes them back from its page cache) and its
    resident memory stays bounded; read back by blocks of rows with os.pread. rows: the selected
    rows (ascending indices into the file's rows; None: all)."""

    REMAP_BYTES = 64 << 20

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.file_shape = tuple(int(x) for x in shape)
        self.row_cells = int(np.prod(self.file_shape[1:], dtype=np.int64))
        self._file = tempfile.TemporaryFile(prefix="moescope-counts-")
        self._file.truncate(int(np.prod(self.file_shape, dtype=np.int64)) * self.dtype.itemsize)
        self._map: np.memmap | None = None
        self._written = 0
        self.rows: np.ndarray | None = None

    # -- writing (the counting pass) ---------------------------------------------------------------
    def flat(self) -> np.ndarray:
        """The whole file as a flat writable array (a memory map; see add_at)."""
        if self._map is None:
            self._map = np.memmap(self._file, self.dtype, mode="r+", shape=(int(np.prod(self.file_shape)),))
        return self._map

    def add_at(self, lo: int, counts: np.ndarray) -> None:
        """flat[lo:lo + len(counts)] += counts."""
        target = self.flat()
        target[lo:lo + len(counts)] += counts.astype(self.dtype)
        self._written += len(counts) * self.dtype.itemsize
        if self._written >= self.REMAP_BYTES:
            self.finish()

    def finish(self) -> "SpilledCounts":
        """Write back and drop the memory map (call once the pass is over, before reading)."""
        if self._map is not None:
            self._map.flush()
            self._map = None
        self._written = 0
        return self

    # -- reading -----------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return ((self.file_shape[0] if self.rows is None else len(self.rows)),) + self.file_shape[1:]

    def __len__(self) -> int:
        return self.shape[0]

    def select(self, rows: np.ndarray) -> "SpilledCounts":
        """The rows `rows` (indices into this view, ascending) as a view sharing the file."""
        out = object.__new__(SpilledCounts)
        out.__dict__.update(self.__dict__)
        base = np.arange(self.file_shape[0]) if self.rows is None else self.rows
        out.rows = np.asarray(base[np.asarray(rows)], np.int64)
        return out

    def block(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi of this view as an array (hi - lo, ...) read from the file."""
        self.finish()
        hi = min(hi, len(self))
        if hi <= lo:
            return np.zeros((0,) + self.file_shape[1:], self.dtype)
        first, last = (lo, hi) if self.rows is None else (int(self.rows[lo]), int(self.rows[hi - 1]) + 1)
        size = self.row_cells * self.dtype.itemsize
        raw = os.pread(self._file.fileno(), (last - first) * size, first * size)
        out = np.frombuffer(raw, self.dtype).reshape((last - first,) + self.file_shape[1:])
        return out if self.rows is None else out[self.rows[lo:hi] - first]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.block(0, len(self))
        return out if dtype is None else out.astype(dtype)
