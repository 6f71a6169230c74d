"""Integer arrays that grow with the trace kept in an anonymous temporary file, not in memory.

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
