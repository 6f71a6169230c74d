"""One writer per trace directory: an exclusive advisory lock on TRACE/.lock.

The lock is an ``fcntl.flock`` on a file inside the trace directory, so the operating system
releases it when the holding process ends in any way (even ``kill -9``): a lock is never
left stale. The file holds the holder's pid, for the refusal message only; its existence
means nothing. Readers never take the lock.
"""
from __future__ import annotations

import os
from pathlib import Path

from moescope.errors import TraceError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking, as before
    fcntl = None  # type: ignore[assignment]


class TraceLock:
    """Hold the exclusive writer lock of `trace_dir` (created if missing) until :meth:`release`.

    Raises TraceError naming the holder's pid when another process (or another writer in
    this process) holds it.
    """

    def __init__(self, trace_dir: str | os.PathLike) -> None:
        self.path = Path(trace_dir) / LOCK_FILE
        self._fd: int | None = None
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_pid(fd)
                os.close(fd)
                raise TraceError(
                    f"{trace_dir} is being written by another process (pid {holder}); wait for it to finish "
                    "or stop it, then rerun (the same command resumes), or choose another --out"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock (idempotent). The file stays: removing it would race with the next writer."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __del__(self) -> None:  # a writer dropped without close() must not keep the directory locked
        try:
            self.release()
        except Exception:
            pass


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text or "unknown"
