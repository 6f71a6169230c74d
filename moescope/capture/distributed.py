"""Capture a dataset on a Ray cluster: one model per worker, one trace, one manifest writer.

The driver (this process) validates the data, splits the records that no committed shard
holds into chunks of contiguous records (a multiple of the batch size, so every worker runs
exactly the batches a single-process run would: same batch composition, same padding, same
routing), and hands the chunk descriptors to a Ray Data actor pool. Each actor loads the
model once (the same loader and options as `moescope capture`), captures its chunks with the
same :class:`~moescope.capture.dataset.BatchCapture` code, writes each chunk's Parquet files
atomically into the trace directory under names of their own (``routes/part-r<start>.parquet``)
and returns their metadata. The driver is the only writer of manifest.json: it commits each
returned chunk as a shard (:meth:`TraceWriter.commit`) and, at the end, lists the shards in
input order. A killed run resumes with the same command, on Ray or in one process: the
engine and the number of workers are not part of the trace's fingerprint.

Requirements: ``pip install 'moescope[ray]'``; the trace directory and the data file at the
same path on every node (a shared POSIX filesystem: commits rely on atomic rename).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

from moescope.capture.data import Record, TextDataset
from moescope.capture.dataset import RunOptions, TraceIdentity, open_capture_writer, report_truncation
from moescope.capture.loading import LoadOptions
from moescope.capture.recorder import CaptureOptions
from moescope.errors import MoescopeError, TraceError

DEFAULT_CHUNK = 64  # sequences per chunk: small enough to balance workers, big enough to amortise a task


@dataclass(frozen=True)
class RayOptions:
    """How to spread a capture over Ray workers.

    Attributes:
        num_workers: actors, each holding one copy of the model.
        gpus_per_worker: GPUs reserved per actor (0: CPU workers; > 1: the model is spread
            over the actor's GPUs with device_map="auto"; fractions share a GPU).
        threads_per_worker: torch threads (and Ray CPUs reserved) per actor.
        chunk_size: sequences per chunk, rounded up to a multiple of the batch size.
        address: Ray cluster to join (None: the running cluster if any, else a local one).
        max_chunks: stop after committing this many chunks, leaving the trace unfinished
            (a partial run; the same call without it completes the trace).
    """

    num_workers: int = 1
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    chunk_size: int = DEFAULT_CHUNK
    address: str | None = None
    max_chunks: int | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise MoescopeError(f"--num-workers must be at least 1, not {self.num_workers}")
        if self.gpus_per_worker < 0:
            raise MoescopeError(f"--gpus-per-worker must be 0 or more, not {self.gpus_per_worker}")
        if self.threads_per_worker < 1:
            raise MoescopeError(f"--threads-per-worker must be at least 1, not {self.threads_per_worker}")
        if self.chunk_size < 1:
            raise MoescopeError(f"--chunk-size must be at least 1, not {self.chunk_size}")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to load the model and capture chunks (pickled to each actor)."""

    model: str | None
    load: LoadOptions
    dataset: TextDataset
    options: CaptureOptions
    run: RunOptions
    model_name: str | None
    threads: int
    out: str
    fingerprint: str | None = None  # None for the identity probe
    identity: dict | None = None  # the driver's, to name what differs when a worker disagrees


def plan_chunks(pending: list[tuple[int, int]], chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) chunks of at most `chunk_size` records covering each pending range."""
    return [(s, min(s + chunk_size, end)) for start, end in pending for s in range(start, end, chunk_size)]


def chunk_size_for(requested: int, batch_size: int) -> int:
    """`requested` rounded up to a multiple of `batch_size` (chunks must hold whole batches)."""
    return max(1, math.ceil(requested / batch_size)) * batch_size


def worker_device(device: str, gpus_per_worker: float) -> str:
    """The device a worker loads its model on: Ray gives each actor its own GPUs (through
    CUDA_VISIBLE_DEVICES), so "cuda" is the actor's GPU and "auto" spreads over its GPUs."""
    if gpus_per_worker == 0:
        return "cpu" if device != "auto" else "auto"
    return "auto" if gpus_per_worker > 1 or device == "auto" else "cuda"


# -- worker side ---------------------------------------------------------------------------------
def _load(spec: WorkerSpec, set_threads: bool = True) -> tuple[Any, Any, TraceIdentity]:
    import torch

    from moescope.capture.dataset import trace_identity
    from moescope.capture.loading import load_model

    if set_threads:  # a worker process owns its threads; the driver's caller keeps its own
        torch.set_num_threads(spec.threads)
    model, tokenizer = load_model(spec.model, spec.load)
    ident = trace_identity(model, tokenizer, spec.dataset, spec.options, spec.run, spec.model_name)
    return model, tokenizer, ident


def probe_identity(spec: WorkerSpec, set_threads: bool = True) -> TraceIdentity:
    """Load the model as a worker would and return the trace's header and fingerprint."""
    return _load(spec, set_threads)[2]


class _ChunkReader:
    """Records of [start, end) chunks, reading the data file forward: an actor receives its
    chunks in increasing order, so it reads the file about once however many chunks it runs."""

    def __init__(self, dataset: TextDataset) -> None:
        self.dataset = dataset
        self._records: Iterator[Record] | None = None
        self._next = 0

    def read(self, start: int, end: int) -> list[Record]:
        if self._records is None or start < self._next:
            self._records, self._next = self.dataset.iter_from(start), start
        for _ in islice(self._records, start - self._next):  # chunks other workers took
            pass
        records = list(islice(self._records, end - start))
        self._next = end
        return records


class CaptureWorker:
    """A Ray Data actor: loads the model once, then captures one chunk per call.

    A user error (MoescopeError: a text too long with --on-long refuse, another model on
    this node) is returned as the chunk's `error` rather than raised: Ray Data would wrap it
    in its own exception and lose it, and the driver must show the user its one line.
    """

    FIELDS = ("start", "end", "n_sequences", "tokens", "truncated", "cpu_seconds", "meta", "error")

    def __init__(self, spec: WorkerSpec) -> None:
        from moescope.capture.dataset import BatchCapture

        self.spec, self.error = spec, None
        try:
            model, tokenizer, ident = _load(spec)
            if ident.fingerprint != spec.fingerprint:
                from moescope.store.manifest import identity_differences

                diffs = identity_differences(ident.header.get("identity") or {}, spec.identity or {})
                what = f" ({'; '.join(diffs[:3])}, 'here' being the worker)" if diffs else ""
                raise TraceError(f"a worker loaded a different model or software than the driver's probe{what}; "
                                 "give every node the same model files, moescope, torch and transformers")
        except MoescopeError as exc:
            self.error = exc
            return
        self.capture = BatchCapture(model, tokenizer, spec.options, spec.run, ident.max_length)
        self.reader = _ChunkReader(spec.dataset)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in self.FIELDS}
        for start, end in zip(batch["start"].tolist(), batch["end"].tolist()):
            try:
                if self.error is not None:
                    raise self.error
                result = self.capture_chunk(int(start), int(end))
            except MoescopeError as exc:
                result = {"start": int(start), "end": int(end), "n_sequences": 0, "tokens": 0, "truncated": 0,
                          "cpu_seconds": 0.0, "meta": "", "error": json.dumps([type(exc).__name__, str(exc)])}
            for key in out:
                out[key].append(result[key])
        return out

    def capture_chunk(self, start: int, end: int) -> dict[str, Any]:
        """Capture records [start, end) and write their shard files; returns what the driver commits."""
        import pyarrow as pa
        import torch

        from moescope.capture.dataset import _batches
        from moescope.store.writer import seq_id_first_last, write_shard_file

        cpu = time.process_time()  # this worker's CPU time (all its threads): tells scaling from starvation
        records = self.reader.read(start, end)
        parts: dict[str, list[pa.Table]] = {}
        tokens = truncated = 0
        with self.capture.recorder, torch.inference_mode():
            for batch in _batches(iter(records), self.spec.run.batch_size):
                groups, n_trunc, n_tok = self.capture.forward(batch)
                for name, table in self.capture.assemble(groups).items():
                    parts.setdefault(name, []).append(table)
                tokens, truncated = tokens + n_tok, truncated + n_trunc
        tables = {name: pa.concat_tables(p, promote_options="default") for name, p in parts.items()}
        # Named by the chunk's first record: unique in the trace whatever the chunk size of
        # earlier runs, since committed ranges never overlap the chunks still to do.
        files = {name: write_shard_file(self.spec.out, name, f"part-r{start:012d}", t) for name, t in tables.items()}
        meta = {"files": files, "seq_ids": seq_id_first_last(tables.get("sequences"))}
        return {"start": start, "end": end, "n_sequences": len(records), "tokens": tokens, "truncated": truncated,
                "cpu_seconds": time.process_time() - cpu, "meta": json.dumps(meta), "error": ""}


# -- driver side ---------------------------------------------------------------------------------
def capture_distributed(
    model: str | None,
    data: str | Path | TextDataset,
    out: str | Path,
    *,
    load: LoadOptions | None = None,
    options: CaptureOptions | None = None,
    run: RunOptions | None = None,
    ray_options: RayOptions | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Capture every record of `data` with `model` (a local directory or hub id; None: the
    built-in model) on Ray workers into the trace directory `out`.

    Returns the manifest (finished, unless `ray_options.max_chunks` stopped the run early).
    `progress(done_sequences, total_sequences, tokens)` is called as chunks are committed;
    `notify(line)` receives the same one-line notes as :func:`capture_dataset`.
    The trace equals the one `capture_dataset` writes for the same arguments, row for row.
    """
    run = run or RunOptions()
    options = options or CaptureOptions(seed=run.seed)
    ray_options = ray_options or RayOptions()
    load = load or LoadOptions()
    dataset = data if isinstance(data, TextDataset) else TextDataset(data)
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=ray_options.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        return _drive(ray, model, dataset, Path(out), load, options, run, ray_options, model_name, overwrite,
                      progress, notify)
    finally:
        if started_here:
            ray.shutdown()


def _drive(ray: Any, model: str | None, dataset: TextDataset, out: Path, load: LoadOptions,
           options: CaptureOptions, run: RunOptions, ray_options: RayOptions, model_name: str | None,
           overwrite: bool, progress: Callable[[int, int, int], None] | None,
           notify: Callable[[str], None] | None = None) -> dict[str, Any]:
    gpus, threads = ray_options.gpus_per_worker, ray_options.threads_per_worker
    # Workers may run in another directory (or on another node): give them absolute paths,
    # while the manifest keeps the names as the user gave them (the same as a local run's).
    local_model = model is not None and Path(model).exists()
    readable = copy.copy(dataset)
    readable.path = dataset.path.resolve()
    spec = WorkerSpec(str(Path(model).resolve()) if local_model else model,
                      replace(load, device=worker_device(load.device, gpus)), readable, options, run,
                      model_name if model_name is not None else model, threads, str(out.resolve()))
    ident = _identity(ray, spec, gpus)
    say = notify or (lambda line: None)
    total = len(dataset)
    with open_capture_writer(out, ident, run, overwrite, dataset, say) as writer:
        if writer.complete:
            return writer.manifest
        pending = writer.pending(total)
        chunks = plan_chunks(pending, chunk_size_for(ray_options.chunk_size, run.batch_size))
        if ray_options.max_chunks is not None:
            chunks = chunks[:ray_options.max_chunks]
        done = total - sum(end - start for start, end in pending)
        tokens = truncated = 0
        cpu_seconds = 0.0
        for row in _results(ray, chunks, replace(spec, fingerprint=ident.fingerprint,
                                                     identity=ident.header.get("identity")), ray_options):
            if row["error"]:
                raise _error_from(row["error"])
            meta = json.loads(row["meta"])
            writer.commit(meta["files"], int(row["start"]), int(row["end"]), int(row["n_sequences"]), meta["seq_ids"])
            done, tokens = done + int(row["n_sequences"]), tokens + int(row["tokens"])
            truncated += int(row["truncated"])
            cpu_seconds += float(row["cpu_seconds"])
            if progress:
                progress(done, total, tokens)
        if writer.pending(total):
            return writer.manifest  # stopped early on purpose (max_chunks): resumable
        report_truncation(truncated, ident.max_length, notify)
        # "run" describes this session, not the trace (it is no part of the fingerprint).
        return writer.finish({"run": {"truncated_texts": truncated, "engine": "ray", "workers": ray_options.num_workers,
                                      "gpus_per_worker": ray_options.gpus_per_worker,
                                      "worker_cpu_seconds": cpu_seconds}})


def _identity(ray: Any, spec: WorkerSpec, gpus: float) -> TraceIdentity:
    """The trace's header and fingerprint, from the model loaded exactly as a worker loads it.

    CPU workers: the driver loads it itself (a worker-sized CPU load, freed at once). GPU
    workers: the driver may have no GPU or not the memory, so one worker-shaped Ray task
    loads it on a worker's resources.
    """
    if gpus == 0:
        return probe_identity(spec, set_threads=False)
    return _remote(ray, ray.remote(num_cpus=spec.threads, num_gpus=gpus)(probe_identity).remote(spec))


def _results(ray: Any, chunks: list[tuple[int, int]], spec: WorkerSpec, ray_options: RayOptions) -> Iterator[dict]:
    """Rows returned by the actor pool, one per chunk, as they complete."""
    if not chunks:
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own bar over sequences
    items = [{"start": s, "end": e} for s, e in chunks]
    # One chunk per block: an idle actor takes the next chunk (balance), and each result
    # streams back as soon as its chunk is done (progress, commits).
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    mapped = ds.map_batches(
        CaptureWorker,
        fn_constructor_kwargs={"spec": spec},
        batch_size=1,  # one chunk per call: results stream back chunk by chunk
        compute=ray.data.ActorPoolStrategy(size=ray_options.num_workers),
        num_cpus=ray_options.threads_per_worker,
        num_gpus=ray_options.gpus_per_worker or None,
        batch_format="numpy",
    )
    rows = iter(mapped.iter_rows())
    try:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as exc:  # a worker's error arrives wrapped by Ray: show the user's one line
                raise _user_error(exc) or exc
            yield row
    finally:
        close = getattr(rows, "close", None)
        if close:
            close()


def _error_from(encoded: str) -> MoescopeError:
    """The MoescopeError a worker returned as [class name, message]."""
    import moescope.errors

    name, message = json.loads(encoded)
    kind = getattr(moescope.errors, name, MoescopeError)
    return kind(message) if isinstance(kind, type) and issubclass(kind, MoescopeError) else MoescopeError(message)


def _remote(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except Exception as exc:
        raise _user_error(exc) or exc


def _user_error(exc: BaseException) -> MoescopeError | None:
    """A fresh copy of the MoescopeError a Ray task's exception wraps (RayTaskError keeps the
    original as `cause`), or None."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MoescopeError):
            return type(e)(str(e))
        stack += [e.__context__, e.__cause__, getattr(e, "cause", None)]  # RayTaskError.cause first
    return None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MoescopeError("--engine ray needs Ray: pip install 'moescope[ray]' (ray[data]==2.60.0)") from exc
    return ray
