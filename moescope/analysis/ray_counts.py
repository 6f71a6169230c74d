"""`--engine ray`: the counting pass of stats and signatures on Ray tasks, one per shard.

Usage (what the CLI does for ``--engine ray --num-workers N``)::

    from moescope.analysis.engine import use_engine
    from moescope.analysis.ray_counts import RayCounting

    with use_engine(RayCounting(num_workers=4)):
        result = routing_statistics(trace, label="label")   # same result as without the engine

The driver lists the shards, sends each to :func:`count_map.count_shard` as a Ray task (at
most ``num_workers`` at a time, one CPU each), adds the partial counts into its arrays as
they return, and assembles the same :class:`RouteCounts` as the in-process pass.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from moescope.analysis import routing_counts as rc
from moescope.analysis.count_map import (CountSpec, PartialCounts, ShardFiles, count_shard, map_reduce, shards_overlap,
                                         sum_codes, token_code_columns, weight_extremes)
from moescope.analysis.engine import use_engine
from moescope.errors import MoescopeError
from moescope.store.reader import Trace

# Fold buffered sparse token counts into one sorted set once they pass this many rows.
TOKEN_COMPACT_ROWS = 1 << 22


def shard_units(trace: Trace, location: str | None = None) -> list[ShardFiles]:
    """The routes shards of `trace` with the tokens file(s) of their sequences, as paths under
    `location` (a directory or a URI such as ``s3://bucket/trace``; default: the trace's path)."""
    base = (location or os.path.abspath(trace.path)).rstrip("/")

    def at(path: str) -> str:
        rel = os.path.relpath(path, trace.path) if os.path.isabs(path) else path
        return f"{base}/{rel.replace(os.sep, '/')}"

    all_tokens = tuple(at(f) for f in trace.files("tokens"))
    shards = trace.manifest.get("shards")
    if shards is None:  # a trace without a shard list: each routes file with every tokens file
        return [ShardFiles(at(f), all_tokens) for f in trace.files("routes")]
    checks = tuple((at(f["path"]), int(f["bytes"]), str(f["sha256"])) for s in shards for f in s["files"].values()
                   if "bytes" in f and "sha256" in f)
    units = []
    for shard in shards:
        files = shard["files"]
        if "routes" in files:
            tokens = (at(files["tokens"]["path"]),) if "tokens" in files else all_tokens
            mine = {at(files["routes"]["path"]), *tokens}
            units.append(ShardFiles(at(files["routes"]["path"]), tokens, tuple(c for c in checks if c[0] in mine)))
    return units


class _Reducer:
    """Adds up partial counts in the driver as they arrive: array sums in place, per-sequence
    counts kept per shard (joined once at the end), sparse token counts buffered and folded."""

    def __init__(self) -> None:
        self.total = PartialCounts()
        self._sequences: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._tokens: list[tuple[np.ndarray, ...]] = []
        self._token_rows = 0

    def add(self, part: PartialCounts) -> "_Reducer":
        t = self.total
        for name in ("n_rows", "pairs", "transitions", "transition_tokens", "weight_hist", "weight_sum_hist",
                     "weight_total"):
            value = getattr(part, name)
            if value is not None:
                setattr(t, name, value.copy() if getattr(t, name) is None else getattr(t, name) + value)
        t.key_ranges = t.key_ranges + part.key_ranges
        if part.seq_ids is not None:
            self._sequences.append((part.seq_ids, part.seq_counts, part.seq_n_tokens))
        if part.tok_n is not None:
            self._tokens.append((part.tok_code, part.tok_n))
            self._token_rows += len(part.tok_n)
            if self._token_rows > TOKEN_COMPACT_ROWS:
                self._tokens = [self._summed_tokens()]
                self._token_rows = len(self._tokens[0][1])
        return self

    def sequence_counts(self, edges: np.ndarray, L: int, E: int) -> rc.SequenceCounts:
        """The shards' per-sequence counts as one SequenceCounts (seq_ids ascending; a sequence
        found in several shards is summed; cells of the widest type any shard needed)."""
        parts = sorted(self._sequences, key=lambda p: int(p[0][0]) if len(p[0]) else -1)  # shards in sequence order
        self._sequences = []
        dtype = np.result_type(*[p[1].dtype for p in parts]) if parts else np.dtype(np.uint16)
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        shape = (len(edges), L)
        counts = np.concatenate([p[1].astype(dtype, copy=False) for p in parts]) if parts else np.zeros((0,) + shape + (E,), dtype)
        n_tokens = np.concatenate([p[2].astype(dtype, copy=False) for p in parts]) if parts else np.zeros((0,) + shape, dtype)
        del parts
        if (np.diff(ids) > 0).all():  # the usual case: each sequence in one shard, shards in order
            return rc.SequenceCounts(ids, counts, n_tokens, edges)
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = np.zeros((len(uniq),) + counts.shape[1:], dtype)
        summed_n = np.zeros((len(uniq),) + n_tokens.shape[1:], dtype)
        np.add.at(summed, inverse.reshape(-1), counts)
        np.add.at(summed_n, inverse.reshape(-1), n_tokens)
        return rc.SequenceCounts(uniq, summed, summed_n, edges)

    def _summed_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._tokens:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return sum_codes(np.concatenate([p[0] for p in self._tokens]), np.concatenate([p[1] for p in self._tokens]))

    def token_table_columns(self) -> tuple[np.ndarray, ...]:
        """The summed sparse token counts: (layer_index, token_id, expert, n)."""
        code, n = self._summed_tokens()
        return (*token_code_columns(code), n)


@dataclass(frozen=True)
class ShardCounting:
    """A counting engine mapping :func:`count_map.count_shard` over the shards in this process
    (what :class:`RayCounting` runs on Ray; useful to check a trace's shards one by one).

    Attributes:
        location: where the shards are read, when not at the trace's own path (a shared
            mount, or a URI: ``s3://…``, ``gs://…``, ``file:///…``).
    """

    location: str | None = None

    def map_shards(self, units: list[Any], fn: Callable[[Any, Any], Any], spec: Any,
                   add: Callable[[Any, Any], Any], initial: Any) -> Any:
        """add(...add(initial, fn(unit_1, spec))..., fn(unit_n, spec)): the generic hook for
        count-based analyses (`fn` pure, module-level, returning mergeable counts)."""
        return map_reduce(fn, units, spec, add, initial)

    def map_gather(self, units: list[Any], fn: Callable[[Any, Any], Any], spec: Any, n_parts: int) -> Iterator[list[Any]]:
        """For p in range(n_parts), [fn(unit, spec)[p] for unit in units]: the hook for analyses
        whose per-unit results are not counts but must be joined part by part (e.g. one MoE
        layer at a time, :mod:`moescope.analysis.compare_map`). In process every result is
        kept until its part is yielded; RayCounting keeps them in the object store."""
        results = [list(fn(unit, spec)) for unit in units]
        for p in range(n_parts):
            yield [r[p] for r in results]
            for r in results:
                r[p] = None  # the part is the caller's now

    # -- the counting pass of stats and signatures ---------------------------------------------------
    def count_routes(self, trace: Trace, *, phase: str = "all", scan: bool = True, transitions: bool = True,
                     weight_bins: int = 20, sequences: bool = False, bucket_edges: list[int] | None = None,
                     token_experts: bool = False, sequence_ids: np.ndarray | None = None) -> rc.RouteCounts:
        """What :func:`routing_counts.count_routes` returns for the same arguments."""
        E, k, L = trace.n_experts, trace.top_k, len(trace.moe_layers)
        has_w = scan and trace.has_weights and "weights" in trace.columns("routes")
        edges = np.asarray(sorted(set([0] + [int(e) for e in bucket_edges or []])), dtype=np.int64)
        use_tokens = token_experts and trace.has("tokens")
        units = shard_units(trace, self.location)
        # --where: the driver's views hold the selected sequences only; the workers read whole shards
        selected = (np.asarray(trace.selected_seq_ids.to_numpy(zero_copy_only=False), np.int64)
                    if trace.where is not None else None)
        w_max = 1.0
        if has_w:  # the histograms' range (routing_counts.weight_range), from a first map over the shards
            extremes = self.map_shards(units, weight_extremes, selected, np.fmax, np.array([np.nan, np.nan]))
            w_max = rc.weight_range_of([float(x) for x in extremes if not np.isnan(x)])
        spec = CountSpec(
            n_experts=E, top_k=k, layer_index=rc.layer_index(trace), phase=phase,
            phase_filter=rc.needs_phase_filter(trace, phase), scan=scan, transitions=transitions, weights=has_w,
            weight_bins=weight_bins, token_experts=use_tokens, weight_max=w_max,
            sequences=sequences, edges=edges,
            only=None if sequence_ids is None else np.asarray(sequence_ids, np.int64), selected=selected)
        # The driver reads only the manifest here: each task finds its own sequences.
        reducer = self.map_shards(units, count_shard, spec,
                                  lambda total, part: total.add(part), _Reducer())
        total = reducer.total
        if scan and transitions and shards_overlap(total.key_ranges):  # a token may be split between shards
            with use_engine(None):
                local = rc.count_routes(trace, phase=phase, scan=True, transitions=True, weight_bins=weight_bins)
            total.transitions, total.transition_tokens = local.scan.transitions, local.scan.transition_tokens
        result = rc.RouteCounts(None, None, None)
        if scan:
            result.scan = _scan(trace, total, has_w, transitions, weight_bins, w_max)
        if sequences:
            result.sequences = reducer.sequence_counts(edges, L, E)
        if use_tokens:
            li, tok, ex, n = reducer.token_table_columns()
            order = np.lexsort((ex, -n, tok, li))
            result.token_experts = {"layer_index": li[order], "token_id": tok[order], "expert": ex[order],
                                    "n": n[order]}
        return result


@dataclass(frozen=True)
class RayCounting(ShardCounting):
    """A counting engine running one Ray task per shard.

    Attributes:
        num_workers: tasks running at once (one CPU each).
        address: Ray cluster to join (None: the running cluster if any, else a local one).
        location: where the workers read the trace's shards, when not at the trace's own path
            (a shared mount, or an object-store URI: ``s3://…``, ``gs://…``, ``file:///…``).
    """

    num_workers: int = 1
    address: str | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise MoescopeError(f"--num-workers must be at least 1, not {self.num_workers}")

    def map_shards(self, units: list[Any], fn: Callable[[Any, Any], Any], spec: Any,
                   add: Callable[[Any, Any], Any], initial: Any) -> Any:
        """add(...add(initial, fn(unit_1, spec))..., fn(unit_n, spec)) with fn run as Ray tasks,
        at most num_workers at a time; `add(total, part)` runs in the driver as results arrive.
        `fn` must be pure and importable by the workers (a module-level function)."""
        ray = _import_ray()
        started_here = _connect(ray, self.address)
        try:
            remote = ray.remote(num_cpus=1, max_retries=2)(fn)
            spec_ref = ray.put(spec)

            def wait(pending: list) -> tuple[list, list]:
                done, rest = ray.wait(pending, num_returns=1)
                return _get(ray, done), rest

            return map_reduce(fn, units, spec_ref, add, initial, submit=lambda unit, s: remote.remote(unit, s), wait=wait,
                              in_flight=self.num_workers)
        finally:
            if started_here:
                ray.shutdown()

    def map_gather(self, units: list[Any], fn: Callable[[Any, Any], Any], spec: Any, n_parts: int) -> Iterator[list[Any]]:
        """ShardCounting.map_gather with fn run as Ray tasks (at most num_workers at a time),
        each returning its n_parts parts as separate objects: they wait in Ray's object store
        (spilled to disk when it fills) and the driver fetches one part of every unit at a
        time, releasing it before the next."""
        if n_parts == 0 or not units:
            yield from ([] for _ in range(n_parts))
            return
        ray = _import_ray()
        started_here = _connect(ray, self.address)
        try:
            remote = ray.remote(num_cpus=1, max_retries=2, num_returns=n_parts)(_as_parts)
            spec_ref = ray.put(spec)
            refs: list[list[Any]] = []
            pending: list = []
            for unit in units:  # at most num_workers tasks running; the rest wait for a free worker
                if len(pending) >= self.num_workers:
                    _, pending = ray.wait(pending, num_returns=1)
                out = remote.remote(fn, unit, spec_ref, n_parts)
                refs.append(list(out) if n_parts > 1 else [out])
                pending.append(refs[-1][0])
            for p in range(n_parts):
                yield _get(ray, [r[p] for r in refs])
                for r in refs:
                    r[p] = None  # release the part in the object store
        finally:
            if started_here:
                ray.shutdown()


def _as_parts(fn: Callable[[Any, Any], Any], unit: Any, spec: Any, n_parts: int) -> Any:
    """fn(unit, spec) as Ray's num_returns expects it (a tuple of n_parts, or the one part)."""
    parts = fn(unit, spec)
    if len(parts) != n_parts:
        raise ValueError(f"{fn.__name__} returned {len(parts)} parts, not {n_parts}")
    return tuple(parts) if n_parts > 1 else parts[0]


def _scan(trace: Trace, total: PartialCounts, has_w: bool, transitions: bool, weight_bins: int,
          weight_max: float) -> rc.RouteScan:
    E, k, L = trace.n_experts, trace.top_k, len(trace.moe_layers)
    n_trans = max(L - 1, 0)
    pairs = total.pairs if total.pairs is not None else np.zeros((L, E, E), np.int64)
    n_rows = total.n_rows if total.n_rows is not None else np.zeros(L, np.int64)
    whist = None
    if has_w:
        whist = total.weight_hist if total.weight_hist is not None else np.zeros(L * k * weight_bins, np.int64)
        whist = whist.reshape(L, k, weight_bins)
    have_trans = transitions and total.transitions is not None
    return rc.RouteScan(
        n_experts=E, top_k=k, moe_layers=trace.moe_layers, n_rows=n_rows, load=pairs[:, np.arange(E), np.arange(E)].copy(),
        pairs=pairs, transitions=total.transitions if have_trans else np.zeros((n_trans, E, E), np.int64),
        transition_tokens=total.transition_tokens if have_trans else np.zeros(n_trans, np.int64),
        weight_hist=whist,
        weight_sum_hist=None if whist is None else (total.weight_sum_hist if total.weight_sum_hist is not None
                                                    else np.zeros(L * weight_bins, np.int64)).reshape(L, weight_bins),
        weight_mean=None if whist is None else (total.weight_total if total.weight_total is not None
                                                else np.zeros(L * k)).reshape(L, k) / np.maximum(whist.sum(axis=2), 1),
        weight_bins=weight_bins, weight_max=weight_max)


def _get(ray: Any, refs: list) -> list:
    """ray.get, re-raising a task's MoescopeError (e.g. a damaged shard) as itself: one line,
    not Ray's wrapper with the worker's traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, MoescopeError):
            raise cause from None
        raise


def _connect(ray: Any, address: str | None) -> bool:
    """Join `address` (None: the running cluster, else a new local one) unless this process is
    already connected; True when it connected here (and so must disconnect). MoescopeError in
    one line for a cluster that does not answer (a host:port is probed first, so a wrong address
    fails in seconds rather than after Ray's own retries)."""
    if ray.is_initialized():
        return False
    if address and address not in ("auto", "local"):
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(address if "://" in address else f"ray://{address}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise MoescopeError(f"--ray-address {address!r} is not host:port (or ray://host:port, or auto)")
        try:
            socket.create_connection((parts.hostname, port), timeout=5).close()
        except OSError as exc:
            raise MoescopeError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
                                "`ray start --head` or fix --ray-address") from None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise MoescopeError(f"cannot reach the Ray cluster at {address or 'a new local cluster'} "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return True


def engine_for_pair(engine: str, num_workers: int = 1, address: str | None = None, shards_at_a: str | None = None,
                    shards_at_b: str | None = None) -> tuple[ShardCounting | None, tuple[str | None, str | None]]:
    """The counting engine and the shard locations of a two-trace command (compare, agreement):
    --engine/--num-workers/--ray-address as for one trace, --shards-at-a/--shards-at-b per trace."""
    if engine == "local" and (shards_at_a or shards_at_b):
        raise MoescopeError("--shards-at-a and --shards-at-b need --engine ray")
    return engine_for(engine, num_workers, address), (shards_at_a, shards_at_b)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MoescopeError("--engine ray needs Ray: pip install 'moescope[ray]'") from exc
    return ray


def engine_for(engine: str, num_workers: int = 1, address: str | None = None,
               shards_at: str | None = None) -> ShardCounting | None:
    """The counting engine of the CLI's ``--engine/--num-workers/--ray-address/--shards-at``
    (None: the in-process streaming pass). MoescopeError for an unknown engine."""
    if engine not in ("local", "ray"):
        raise MoescopeError(f"--engine must be 'local' or 'ray', not {engine!r}")
    if engine == "local":
        if num_workers != 1 or address or shards_at:
            raise MoescopeError("--num-workers, --ray-address and --shards-at need --engine ray")
        return None
    return RayCounting(num_workers=num_workers, address=address, location=shards_at)

