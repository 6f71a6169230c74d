"""The counting pass of stats and signatures as a map over shards (on Ray) and a reduce.

:func:`count_shard` is pure: one shard's routes (and its tokens, for the phase and the token
ids) in, :class:`PartialCounts` out, every array of which adds up across shards
(:func:`merge_counts`). :class:`RayCounting` runs it as Ray tasks, at most ``num_workers``
at a time, merging results in the driver as they arrive (driver memory: the merged arrays plus
the partials in flight), then builds the same :class:`~routing_counts.RouteCounts` as the
in-process pass. Counts are equal exactly; weight means to float64 rounding.

Shards are read with pyarrow's filesystems, so workers may read them from a shared
filesystem (the default: the trace's own directory) or from object storage
(``location="s3://bucket/trace"``, ``gs://…``, ``file:///…``), where the trace's shard
files sit under the same relative paths as in its manifest.

The driver reads only the manifest for the pass (each task finds its own sequences and
their first generated positions in its shard) and merges. Transitions need each token's
rows together: a shard whose rows are out of (seq_id, pos, layer) order is sorted by its
worker, and if shards' token key ranges overlap (a token split across shards, which
moescope's writers never do) the transitions are recounted in process.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moescope.analysis import route_pass as rp
from moescope.errors import TraceError

BATCH_ROWS = 1 << 16


@dataclass(frozen=True)
class ShardFiles:
    """One unit of work: a routes file and the tokens file(s) holding its tokens (paths or
    URIs); checks: (path, bytes, sha256) from the manifest, verified before a file is read."""

    routes: str
    tokens: tuple[str, ...] = ()
    checks: tuple[tuple[str, int, str], ...] = ()

    def expected(self, path: str) -> tuple[int, str] | None:
        """(bytes, sha256) the manifest records for `path`, or None."""
        return next(((n, h) for p, n, h in self.checks if p == path), None)


@dataclass(frozen=True)
class CountSpec:
    """What to count (pickled to every task). sequences: expert counts per sequence, split at
    `edges` (positions within the phase), of the sequences in `only` (None: all of them)."""

    n_experts: int
    top_k: int
    layer_index: np.ndarray
    phase: str
    phase_filter: bool
    scan: bool
    transitions: bool
    weights: bool
    weight_bins: int
    token_experts: bool
    weight_max: float = 1.0
    sequences: bool = False
    edges: np.ndarray | None = None
    only: np.ndarray | None = None
    selected: np.ndarray | None = None  # the trace's --where selection: rows of other sequences are not counted

    @property
    def n_layers(self) -> int:
        return int((self.layer_index >= 0).sum())


@dataclass
class PartialCounts:
    """Mergeable counts of some shards (None: not counted). tok_code, tok_n: the sparse
    token-expert counts, codes ascending (see :func:`token_code`); seq_*: per-sequence counts of the
    sequences seen (seq_ids ascending). key_ranges: (first, last) token key of each shard."""

    n_rows: np.ndarray | None = None
    pairs: np.ndarray | None = None
    transitions: np.ndarray | None = None
    transition_tokens: np.ndarray | None = None
    weight_hist: np.ndarray | None = None
    weight_sum_hist: np.ndarray | None = None
    weight_total: np.ndarray | None = None
    seq_ids: np.ndarray | None = None
    seq_counts: np.ndarray | None = None
    seq_n_tokens: np.ndarray | None = None
    tok_code: np.ndarray | None = None
    tok_n: np.ndarray | None = None
    key_ranges: list[tuple[int, int]] = field(default_factory=list)


# -- reading one shard ----------------------------------------------------------------------------
def _filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path within it) for a local path or a URI (file://, s3://, gs://, ...)."""
    from pyarrow import fs

    if "://" in path:
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), os.path.abspath(path)


def read_parquet(path: str, columns: list[str], expected: tuple[int, str] | None = None) -> pa.Table:
    """The `columns` of one Parquet file that it has (others are simply absent). With
    `expected` = (bytes, sha256) from the manifest, a file that differs is refused
    (TraceError): a damaged or partly copied shard is never counted."""
    filesystem, inner = _filesystem(path)
    with filesystem.open_input_file(inner) as handle:
        data = handle.read()
    if expected is not None and (len(data) != expected[0] or hashlib.sha256(data).hexdigest() != expected[1]):
        raise TraceError(f"{path} is not the shard the manifest lists (size or SHA-256 differ): it is damaged or "
                         "a partial copy; copy it again from the original trace")
    parquet = pq.ParquetFile(pa.BufferReader(data))
    have = [c for c in columns if c in parquet.schema_arrow.names]
    return parquet.read(columns=have)


def _keys(table: pa.Table) -> np.ndarray:
    return (table.column("seq_id").to_numpy().astype(np.int64) << 32) | table.column("pos").to_numpy().astype(np.int64)


def _tokens(files: ShardFiles, spec: CountSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """Sorted token keys of the phase and their token ids (None when no tokens are needed)."""
    generated_offsets = spec.sequences and spec.phase == "generated"
    if not (spec.phase_filter or spec.token_experts or generated_offsets) or not files.tokens:
        return None
    parts = [read_parquet(f, ["seq_id", "pos", "token_id", "phase"], files.expected(f)) for f in files.tokens]
    table = pa.concat_tables(parts, promote_options="default")
    keys = _keys(table)
    ids = table.column("token_id").to_numpy().astype(np.int64)
    if spec.phase != "all":
        keep = pc.fill_null(pc.equal(table.column("phase"), spec.phase), False).to_numpy(zero_copy_only=False)
        keys, ids = keys[keep], ids[keep]
    order = np.argsort(keys, kind="stable")
    return keys[order], ids[order]


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index in sorted_keys, found) of each key."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return at, sorted_keys[at] == keys


def _chunks(table: pa.Table, spec: CountSpec) -> Iterator[rp.Chunk]:
    for batch in table.to_batches(max_chunksize=BATCH_ROWS):
        yield rp.decode(batch, spec.layer_index, spec.top_k, spec.n_experts)


# -- the map: one shard -> PartialCounts ----------------------------------------------------------
def count_shard(files: ShardFiles, spec: CountSpec) -> PartialCounts:
    """Count one shard's routes rows of the phase as `spec` asks. Pure: reads, never writes."""
    from threadpoolctl import threadpool_limits

    E, k, L = spec.n_experts, spec.top_k, spec.n_layers
    columns = ["seq_id", "pos", "layer", "experts"] + (["weights"] if spec.weights else [])
    table = _selected(read_parquet(files.routes, columns, files.expected(files.routes)), spec.selected)
    tokens = _tokens(files, spec)
    if spec.phase_filter and tokens is not None:
        table = table.filter(pa.array(_lookup(tokens[0], _keys(table))[1]))
    out = PartialCounts()
    keys = _keys(table)
    if len(keys):
        out.key_ranges = [(int(keys.min()), int(keys.max()))]
    pairs = rp.PairCounter(L, E) if spec.scan else None
    trans = rp.TransitionCounter(L, E) if spec.scan and spec.transitions else None
    weights = (rp.WeightCounter(L, k, spec.weight_bins, spec.weight_max)
               if spec.scan and spec.weights and "weights" in table.column_names else None)
    seqs = _shard_sequence_counter(keys, tokens, spec, L, E)
    tok_codes: list[tuple[np.ndarray, np.ndarray]] = []
    vocab = np.unique(tokens[1]) if spec.token_experts and tokens is not None else None
    ordered = True
    with threadpool_limits(limits=1):
        for chunk, in_order in rp.whole_tokens(_chunks(table, spec)):
            blocks = rp.LayerBlocks(chunk, L, E) if spec.scan else None
            if pairs is not None:
                pairs.add(chunk, blocks)
            ordered = ordered and in_order
            if trans is not None and ordered:
                trans.add(chunk, blocks)
            if weights is not None:
                weights.add(chunk)
            if seqs is not None and len(seqs.seq_ids):
                seqs.add(chunk)
            if vocab is not None:
                tok_codes.append(_token_codes(chunk, tokens, vocab, E))
        if trans is not None and not ordered:  # this shard's rows are not grouped by token: sort them
            trans = rp.TransitionCounter(L, E)
            order = np.lexsort((table.column("layer").to_numpy(), keys & 0xFFFFFFFF, keys >> 32))
            for chunk, _ in rp.whole_tokens(_chunks(table.take(pa.array(order)), spec)):
                trans.add(chunk, rp.LayerBlocks(chunk, L, E))
    if pairs is not None:
        out.n_rows, out.pairs = pairs.n_rows, pairs.pairs
    if trans is not None:
        out.transitions, out.transition_tokens = trans.counts, trans.tokens
    if weights is not None:
        out.weight_hist, out.weight_sum_hist, out.weight_total = weights.hist, weights.sum_hist, weights.total
    if seqs is not None:
        out.seq_ids, out.seq_counts, out.seq_n_tokens = seqs.seq_ids, seqs.counts, seqs.n_tokens
    if vocab is not None:
        out.tok_code, out.tok_n = _sparse_tokens(tok_codes, vocab, E)
    return out


def _selected(table: pa.Table, selected: np.ndarray | None) -> pa.Table:
    """The rows of the selected sequences (all rows when there is no selection)."""
    if selected is None:
        return table
    return table.filter(pc.is_in(table.column("seq_id").cast(pa.int64()), value_set=pa.array(selected, pa.int64())))


def weight_extremes(files: ShardFiles, spec: Any = None) -> np.ndarray:
    """[largest weight, largest weight sum of a row] of one shard's routes (NaN: no weights);
    merged with np.fmax. What routing_counts.weight_range reads with DuckDB, per shard.
    spec: the selected seq_ids (None: every row)."""
    table = read_parquet(files.routes, ["seq_id", "weights"], files.expected(files.routes))
    table = _selected(table, spec)
    if "weights" not in table.column_names or table.column("weights").null_count == table.num_rows:
        return np.array([np.nan, np.nan])
    lists = table.column("weights").combine_chunks()
    flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.float64)
    lengths = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(), np.int64)
    if not len(flat):
        return np.array([np.nan, np.nan])
    starts = np.r_[0, np.cumsum(lengths)[:-1]][lengths > 0]
    sums = np.add.reduceat(np.nan_to_num(flat), starts)
    return np.array([np.nanmax(flat), sums.max()])


def _shard_sequence_counter(keys: np.ndarray, tokens: tuple[np.ndarray, np.ndarray] | None, spec: CountSpec,
                            L: int, E: int) -> rp.SequenceCounter | None:
    """A sequence counter over the shard's own sequences (its arrays stay shard-sized), set up
    as routing_counts._sequence_counter sets up the whole trace's: positions from each
    sequence's first token of the phase when the phase is 'generated', cells as narrow as
    the longest position allows."""
    if not spec.sequences:
        return None
    seq_ids = np.unique(keys >> 32)
    if spec.only is not None:
        seq_ids = seq_ids[np.isin(seq_ids, spec.only)]
    offsets = np.zeros(len(seq_ids), np.int64)
    if spec.phase == "generated" and tokens is not None and len(tokens[0]):
        tok_seq = tokens[0] >> 32  # sorted keys: the first of each sequence is its first generated position
        first = np.r_[True, tok_seq[1:] != tok_seq[:-1]]
        at, found = _lookup(seq_ids, tok_seq[first])
        offsets[at[found]] = (tokens[0][first] & 0xFFFFFFFF)[found]
    longest = int((keys & 0xFFFFFFFF).max()) + 1 if len(keys) else 1
    return rp.SequenceCounter(seq_ids, offsets, spec.edges, L, E, max_tokens=longest)


def _token_codes(chunk: rp.Chunk, tokens: tuple[np.ndarray, np.ndarray], vocab: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique codes (layer * U + token index) * E + expert of a chunk's rows and their counts."""
    at, known = _lookup(tokens[0], chunk.key)
    token_index = np.searchsorted(vocab, tokens[1][at[known]])
    cell = chunk.li[known] * len(vocab) + token_index
    codes = rp._expert_codes(cell, chunk.ex[known], E)
    return np.unique(codes, return_counts=True)


def token_code(layer_index: np.ndarray, token_id: np.ndarray, expert: np.ndarray) -> np.ndarray:
    """One int64 per (MoE layer index, token id, expert): layer << 48 | token id << 16 | expert
    (token ids are uint32, expert ids below 2**16), so sparse counts merge by 1-D sorting."""
    return (layer_index.astype(np.int64) << 48) | (token_id.astype(np.int64) << 16) | expert.astype(np.int64)


def token_code_columns(code: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(layer_index, token_id, expert) of :func:`token_code` codes."""
    return code >> 48, (code >> 16) & 0xFFFFFFFF, code & 0xFFFF


def sum_codes(codes: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique codes ascending, summed counts)."""
    uniq, inverse = np.unique(codes, return_inverse=True)
    return uniq, np.bincount(inverse.reshape(-1), weights=counts, minlength=len(uniq)).astype(np.int64)


def _sparse_tokens(parts: list[tuple[np.ndarray, np.ndarray]], vocab: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    codes = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    counts = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    uniq, n = sum_codes(codes, counts)
    cell, expert = np.divmod(uniq, E)
    li, tok = np.divmod(cell, len(vocab))
    return token_code(li, vocab[tok], expert), n  # ascending: vocab is sorted


# -- the reduce -----------------------------------------------------------------------------------
_SUMMED = ("n_rows", "pairs", "transitions", "transition_tokens", "weight_hist", "weight_sum_hist", "weight_total")


def merge_counts(a: PartialCounts, b: PartialCounts) -> PartialCounts:
    """The counts of a's shards and b's shards together (associative and commutative up to
    float64 rounding of the weight sums)."""
    out = PartialCounts(key_ranges=a.key_ranges + b.key_ranges)
    for name in _SUMMED:
        x, y = getattr(a, name), getattr(b, name)
        setattr(out, name, y if x is None else x if y is None else x + y)
    if a.seq_ids is None or b.seq_ids is None:
        out.seq_ids, out.seq_counts, out.seq_n_tokens = (a.seq_ids, a.seq_counts, a.seq_n_tokens) if b.seq_ids is None \
            else (b.seq_ids, b.seq_counts, b.seq_n_tokens)
    else:
        ids = np.union1d(a.seq_ids, b.seq_ids)
        counts = np.zeros((len(ids),) + a.seq_counts.shape[1:], np.result_type(a.seq_counts, b.seq_counts))
        n_tokens = np.zeros((len(ids),) + a.seq_n_tokens.shape[1:], counts.dtype)
        for part in (a, b):
            at = np.searchsorted(ids, part.seq_ids)
            counts[at] += part.seq_counts
            n_tokens[at] += part.seq_n_tokens
        out.seq_ids, out.seq_counts, out.seq_n_tokens = ids, counts, n_tokens
    if a.tok_n is None or b.tok_n is None:
        src = a if b.tok_n is None else b
        out.tok_code, out.tok_n = src.tok_code, src.tok_n
    else:
        out.tok_code, out.tok_n = sum_codes(np.concatenate([a.tok_code, b.tok_code]), np.concatenate([a.tok_n, b.tok_n]))
    return out


def shards_overlap(key_ranges: list[tuple[int, int]]) -> bool:
    """Whether any two shards' token key ranges overlap (then a token may be split between them)."""
    ranges = sorted(key_ranges)
    return any(b[0] <= a[1] for a, b in zip(ranges, ranges[1:]))


def map_reduce(fn: Callable[..., Any], units: list[Any], spec: Any, add: Callable[[Any, Any], Any], initial: Any,
               submit: Callable[[Any, Any], Any] | None = None, wait: Callable[[list], tuple[list, list]] | None = None,
               in_flight: int = 1) -> Any:
    """add(...add(initial, fn(unit_1, spec))..., fn(unit_n, spec)) with at most `in_flight` units
    running (submit/wait: e.g. Ray's remote call and ray.wait returning values; None: in this
    process, one unit after the other). Results are added in the order they finish."""
    total = initial
    if submit is None:
        for unit in units:
            total = add(total, fn(unit, spec))
        return total
    pending: list = []
    queue = list(units)
    while queue or pending:
        while queue and len(pending) < in_flight:
            pending.append(submit(queue.pop(0), spec))
        done, pending = wait(pending)
        for part in done:
            total = add(total, part)
    return total
