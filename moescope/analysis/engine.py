"""Which engine runs the counting pass of the count-based analyses (stats, signatures,
agreement; and the routes reading of compare).

The analyses call :func:`moescope.analysis.routing_counts.count_routes` as always; when a
counting engine is active (``with use_engine(RayCounting(num_workers=4)): ...``), that
function hands the pass to it instead of streaming the routes in this process. The engine
must return exactly what the in-process pass returns (see :mod:`moescope.analysis.count_map`).

Hook for other count-based analyses: build your counts with a pure per-unit function
returning mergeable arrays, and when :func:`current_engine` is not None, run it through
``engine.map_shards(units, fn, spec, add, initial)`` (see
:class:`moescope.analysis.ray_counts.RayCounting`; :func:`moescope.analysis.count_map.map_reduce`
runs the same fold in process). Units can be anything picklable, e.g. ranges of sequences
read from two traces (:mod:`moescope.analysis.trace_pairs`, used by ``analyze agreement``).
Results that are not sums but must be joined part by part (``analyze compare``: per-token
expert sets, one MoE layer at a time) go through ``engine.map_gather(units, fn, spec, n_parts)``.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

_ENGINE: contextvars.ContextVar[Any] = contextvars.ContextVar("moescope_count_engine", default=None)


def current_engine() -> Any:
    """The active counting engine, or None for the in-process pass."""
    return _ENGINE.get()


@contextlib.contextmanager
def use_engine(engine: Any) -> Iterator[Any]:
    """Run the counting passes of the analyses called inside the block on `engine` (None: in process)."""
    token = _ENGINE.set(engine)
    try:
        yield engine
    finally:
        _ENGINE.reset(token)
