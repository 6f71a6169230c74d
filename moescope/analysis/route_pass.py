"""One streaming pass of numpy over the routes rows, feeding several counters at once.

Rows arrive in record batches (DuckDB's Arrow reader over the Parquet shards), are decoded
once into arrays (token key, layer position, experts padded to k), and cut at token
boundaries so that a chunk holds whole tokens. Each counter adds the chunk to its own
arrays. Memory: one chunk plus the counters' arrays, whatever the size of the trace.

Why numpy here and not DuckDB: on 10M token-layer rows (E=64, k=8) the per-(sequence, layer,
expert) and per-(layer, token id, expert) GROUP BYs over unnested lists took 5 s and 9 s in
DuckDB, pair counting with list lambdas 27 s; the same counts as np.bincount / float32
one-hot products over streamed chunks take a fraction of that, in the same bounded memory.

Counting tricks:
- Within a chunk the rows are stably sorted by MoE layer, so each layer is one contiguous
  block; its one-hot matrix X_l (rows, E) gives every pair of the top-k at once as
  X_l^T X_l (diagonal: the load). float32 is exact: a chunk is far below 2**24 rows.
- When every token of the chunk has one row per MoE layer (captures, write_trace), the
  stable sort keeps the tokens aligned across layer blocks, and transitions between MoE
  layers i and i+1 are X_i^T X_{i+1}. Otherwise adjacent rows of the same token are paired
  one by one (rows must arrive grouped by token and in layer order; the caller re-reads
  the routes sorted by DuckDB if they do not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moescope.analysis.spilled_keys import SpilledCounts, SpilledKeys


@dataclass
class Chunk:
    """Whole tokens' rows. key = seq_id << 32 | pos; li = position of the layer in moe_layers;
    ex (n, k) int64 expert ids padded with E; w (n, k) float32 weights (NaN: missing) or None."""

    key: np.ndarray
    li: np.ndarray
    ex: np.ndarray
    w: np.ndarray | None

    def __len__(self) -> int:
        return len(self.key)

    def cat(self, other: "Chunk") -> "Chunk":
        return Chunk(*(None if a is None else np.concatenate([a, b])
                       for a, b in zip((self.key, self.li, self.ex, self.w), (other.key, other.li, other.ex, other.w))))

    def slice(self, lo: int, hi: int | None = None) -> "Chunk":
        return Chunk(*(None if a is None else a[lo:hi] for a in (self.key, self.li, self.ex, self.w)))

    @property
    def seq(self) -> np.ndarray:
        return self.key >> 32

    @property
    def pos(self) -> np.ndarray:
        return self.key & 0xFFFFFFFF


def dense_lists(lists: pa.Array, width: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, width) array of a list column padded with `fill` (longer lists cut to width),
    and the mask of non-null rows."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    valid = ~np.asarray(lists.is_null().to_numpy(zero_copy_only=False), bool)
    lengths = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(), np.int64)
    flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    if lists.null_count == 0 and len(lengths) and (lengths == width).all():
        return flat.reshape(-1, width), valid
    out = np.full((len(lists), width), fill, dtype=np.result_type(flat.dtype, type(fill)))
    kept = np.minimum(lengths, width)
    rows = np.repeat(np.arange(len(lists)), kept)
    col = np.arange(len(rows)) - np.repeat(np.cumsum(kept) - kept, kept)
    src = np.repeat(np.cumsum(lengths) - lengths, kept) + col
    out[rows, col] = flat[src]
    return out, valid


def decode(batch: pa.RecordBatch, li_of: np.ndarray, k: int, E: int) -> Chunk:
    key = (batch.column("seq_id").to_numpy().astype(np.int64) << 32) | batch.column("pos").to_numpy().astype(np.int64)
    li = li_of[batch.column("layer").to_numpy().astype(np.int64)]
    ex = np.minimum(dense_lists(batch.column("experts"), k, E)[0].astype(np.int64), E)
    w = None
    if "weights" in batch.schema.names:
        values, valid = dense_lists(batch.column("weights"), k, np.nan)
        w = values.astype(np.float32)
        w[~valid] = np.nan
    return Chunk(key, li, ex, w)


def whole_tokens(batches: Iterator[Chunk]) -> Iterator[tuple[Chunk, bool]]:
    """Re-cut chunks at token boundaries; yields (chunk, ordered). Once rows are seen out of
    (seq_id, pos, layer) order, `ordered` is False for the rest and chunks are passed on as is."""
    carry: Chunk | None = None
    ordered = True
    for chunk in batches:
        if carry is not None:
            chunk = carry.cat(chunk)
            carry = None
        if ordered:
            same = chunk.key[1:] == chunk.key[:-1]
            if (chunk.key[1:] < chunk.key[:-1]).any() or (same & (chunk.li[1:] <= chunk.li[:-1])).any():
                ordered = False
            else:
                cut = int(np.flatnonzero(np.r_[True, ~same])[-1])  # start of the last token
                carry, chunk = chunk.slice(cut), chunk.slice(0, cut)
        if len(chunk):
            yield chunk, ordered
    if carry is not None and len(carry):
        yield carry, ordered


class LayerBlocks:
    """A chunk's rows stably sorted by MoE layer, as float32 one-hot blocks (one per layer)."""

    def __init__(self, chunk: Chunk, n_layers: int, E: int) -> None:
        self.order = np.argsort(chunk.li.astype(np.int16), kind="stable")
        sizes = np.bincount(chunk.li, minlength=n_layers)
        self.bounds = np.r_[0, np.cumsum(sizes)]
        # contiguous (rows, E) one-hot (a sliced wider array would be copied by every product)
        ex = chunk.ex[self.order]
        flat = (np.arange(len(ex), dtype=np.int32) * E)[:, None] + ex.astype(np.int32)
        self.onehot = np.zeros((len(ex), E), np.float32)
        self.onehot.reshape(-1)[flat[ex < E]] = 1.0
        # aligned: every layer block holds the same tokens in the same order
        T = int(sizes[0])
        self.aligned = bool((sizes == T).all()) and bool(
            (chunk.key[self.order].reshape(n_layers, T) == chunk.key[self.order][:T]).all())

    def block(self, layer: int) -> np.ndarray:
        return self.onehot[self.bounds[layer]:self.bounds[layer + 1]]


class PairCounter:
    """Tokens per layer, load, and every pair within the top-k: pairs[l] = X_l^T X_l."""

    def __init__(self, n_layers: int, E: int) -> None:
        self.n_rows = np.zeros(n_layers, np.int64)
        self.pairs = np.zeros((n_layers, E, E), np.int64)

    def add(self, chunk: Chunk, blocks: LayerBlocks) -> None:
        self.n_rows += np.diff(blocks.bounds)
        for layer in range(len(self.n_rows)):
            X = blocks.block(layer)
            if len(X):
                self.pairs[layer] += np.rint(X.T @ X).astype(np.int64)


class TransitionCounter:
    """(expert at MoE layer i, expert at layer i+1) over the tokens seen at both."""

    def __init__(self, n_layers: int, E: int) -> None:
        self.E, self.n_pairs = E, max(n_layers - 1, 0)
        self.counts = np.zeros((self.n_pairs, E, E), np.int64)
        self.tokens = np.zeros(self.n_pairs, np.int64)

    def add(self, chunk: Chunk, blocks: LayerBlocks) -> None:
        if self.n_pairs == 0:
            return
        if blocks.aligned:
            for i in range(self.n_pairs):
                A, B = blocks.block(i), blocks.block(i + 1)
                self.counts[i] += np.rint(A.T @ B).astype(np.int64)
                self.tokens[i] += len(A)
            return
        # rows grouped by token in layer order: pair each row with the next row of the same token
        nxt = np.flatnonzero((chunk.key[1:] == chunk.key[:-1]) & (chunk.li[1:] == chunk.li[:-1] + 1))
        if len(nxt) == 0:
            return
        Eb = self.E + 1
        a = chunk.ex[nxt] * Eb + (chunk.li[nxt] * Eb * Eb)[:, None]
        codes = a[:, :, None] + chunk.ex[nxt + 1][:, None, :]
        flat = np.bincount(codes.reshape(-1), minlength=self.n_pairs * Eb * Eb)
        self.counts += flat.reshape(self.n_pairs, Eb, Eb)[:, :self.E, :self.E]
        self.tokens += np.bincount(chunk.li[nxt], minlength=self.n_pairs)


class WeightCounter:
    """Histograms on [0, weight_max] of the weight of each (layer, rank) and of each token's
    weight sum (weight_max 1 unless the router scales its weights, e.g. routed_scaling_factor)."""

    def __init__(self, n_layers: int, k: int, bins: int, weight_max: float = 1.0) -> None:
        self.k, self.bins = k, bins
        self.per_unit = bins / weight_max  # bins per unit of weight
        self.hist = np.zeros(n_layers * k * bins, np.int64)
        self.sum_hist = np.zeros(n_layers * bins, np.int64)
        self.total = np.zeros(n_layers * k, np.float64)

    def add(self, chunk: Chunk, blocks: LayerBlocks | None = None) -> None:
        if chunk.w is None:
            return
        w, li = chunk.w, chunk.li
        ok = ~np.isnan(w)
        complete = bool(ok.all())  # the common case: skip the masking
        if not complete:
            rows = ok.any(axis=1)  # null weights lists are left out
            w, ok, li = np.where(ok, w, 0.0)[rows], ok[rows], li[rows]
        cell = (li.astype(np.int32) * self.k)[:, None] + np.arange(self.k, dtype=np.int32)
        codes = cell * self.bins + np.clip((w * self.per_unit).astype(np.int32), 0, self.bins - 1)
        self.hist += np.bincount(codes.reshape(-1) if complete else codes[ok], minlength=self.hist.size)
        self.total += np.bincount(cell.reshape(-1), weights=w.reshape(-1), minlength=self.total.size)
        sums = np.clip((w.sum(axis=1) * self.per_unit).astype(np.int32), 0, self.bins - 1)
        self.sum_hist += np.bincount(li * self.bins + sums, minlength=self.sum_hist.size)


class SequenceCounter:
    """Expert counts per (sequence, position bucket, layer): counts (S, B, L, E), n_tokens (S, B, L).
    Positions are taken relative to offsets[s] (the first position of the phase).
    spill: keep counts in a temporary file (a :class:`SpilledCounts`), not in memory."""

    def __init__(self, seq_ids: np.ndarray, offsets: np.ndarray, edges: np.ndarray, n_layers: int, E: int,
                 max_tokens: int = 1 << 31, spill: bool = False) -> None:
        self.seq_ids, self.offsets, self.edges = seq_ids, offsets, edges
        self.shape = (len(seq_ids), len(edges), n_layers)
        self.E = E
        # A cell counts at most one sequence's tokens: the narrowest type that holds that
        # halves this, the analysis's largest array, for sequences under 65,536 tokens.
        dtype = np.uint16 if max_tokens < np.iinfo(np.uint16).max else np.int32
        self.counts: np.ndarray | SpilledCounts = (SpilledCounts(self.shape + (E,), dtype) if spill
                                                   else np.zeros(self.shape + (E,), dtype))
        self.n_tokens = np.zeros(self.shape, dtype)

    def add(self, chunk: Chunk, blocks: LayerBlocks | None = None) -> None:
        s = np.searchsorted(self.seq_ids, chunk.seq)
        s = np.minimum(s, len(self.seq_ids) - 1)
        known = self.seq_ids[s] == chunk.seq
        b = np.searchsorted(self.edges, chunk.pos - self.offsets[s], side="right") - 1
        cell = ((s * self.shape[1] + b) * self.shape[2] + chunk.li)[known]
        _add_range(self.n_tokens.reshape(-1), cell)
        codes = _expert_codes(cell, chunk.ex[known], self.E)
        if isinstance(self.counts, SpilledCounts):
            _add_spans(self.counts, codes)
        else:
            _add_range(self.counts.reshape(-1), codes)


class SequenceKeyRecorder:
    """Every assignment's flat (layer, token, expert) code, kept per sequence (for the per-fold
    token-id control) in a :class:`SpilledKeys` file: segments of consecutive codes of one
    sequence (segment_seq: seq_id values), in the order the rows arrive."""

    def __init__(self, seq_ids: np.ndarray, E: int, dtype: Any) -> None:
        self.seq_ids, self.E = np.asarray(seq_ids, np.int64), E
        self.keys = SpilledKeys(dtype)
        self.segment_seq: list[np.ndarray] = []
        self.segment_len: list[np.ndarray] = []

    def add(self, seq: np.ndarray, ex: np.ndarray, codes: np.ndarray) -> None:
        """seq (rows,) the rows' seq_ids; ex (rows, k) their experts (E: padding); codes: the
        rows' codes as _expert_codes returns them (row-major over the real experts)."""
        if not len(seq) or not len(self.seq_ids):
            return
        per_row = (ex < self.E).sum(axis=1)
        at = np.minimum(np.searchsorted(self.seq_ids, seq), len(self.seq_ids) - 1)
        known = self.seq_ids[at] == seq
        if not known.all():  # rows of sequences not recorded
            codes = codes[np.repeat(known, per_row)]
            seq, per_row = seq[known], per_row[known]
        if len(seq) > 1 and (np.diff(seq) < 0).any():  # keep each sequence's rows together
            order = np.argsort(seq, kind="stable")
            row_start = np.cumsum(per_row) - per_row
            new_len = per_row[order]
            codes = codes[np.repeat(row_start[order] - (np.cumsum(new_len) - new_len), new_len) + np.arange(int(new_len.sum()))]
            seq, per_row = seq[order], new_len
        if not len(seq):
            return
        starts = np.r_[0, np.flatnonzero(np.diff(seq)) + 1]
        self.segment_seq.append(seq[starts])
        self.segment_len.append(np.add.reduceat(per_row, starts))
        self.keys.append(codes)

    def segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(segment seq_ids, segment starts, segment lengths), int64."""
        seg_seq = np.concatenate(self.segment_seq).astype(np.int64) if self.segment_seq else np.zeros(0, np.int64)
        seg_len = np.concatenate(self.segment_len).astype(np.int64) if self.segment_len else np.zeros(0, np.int64)
        return seg_seq, (np.cumsum(seg_len) - seg_len).astype(np.int64), seg_len


class TokenExpertCounter:
    """Counts per (layer, token, expert) in a dense (L, U, E) array, U = len(vocab) the distinct
    token ids; a row's token is found by its (seq_id, pos) key among the sorted token keys.
    record_seq_ids: also keep every assignment's code per sequence for these sequences
    (self.recorder, a :class:`SequenceKeyRecorder`)."""

    def __init__(self, keys: np.ndarray, token_index: np.ndarray, vocab: np.ndarray, n_layers: int, E: int,
                 record_seq_ids: np.ndarray | None = None) -> None:
        self.keys, self.token_index, self.vocab, self.E = keys, token_index, vocab, E
        self.counts = np.zeros((n_layers, len(vocab), E), np.int64)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        key_type = np.int32 if self.counts.size < 2 ** 31 else np.int64
        self.recorder = None if record_seq_ids is None else SequenceKeyRecorder(record_seq_ids, E, key_type)

    def add(self, chunk: Chunk, blocks: LayerBlocks | None = None) -> None:
        at = np.minimum(np.searchsorted(self.keys, chunk.key), len(self.keys) - 1)
        known = self.keys[at] == chunk.key
        L, U, E = self.counts.shape
        cell = (chunk.li * U + self.token_index[at])[known]
        ex = chunk.ex[known]
        self._pending.append(_expert_codes(cell, ex, E))
        if self.recorder is not None:
            self.recorder.add(chunk.seq[known], ex, self._pending[-1])
        self._n_pending += len(self._pending[-1])
        if self._n_pending >= self.counts.size:  # one pass over the dense array per that many codes
            self.finish()

    def finish(self) -> None:
        """Fold the buffered codes into the counts (call once the pass is over)."""
        if self._pending:
            codes = np.concatenate(self._pending)
            self.counts += np.bincount(codes, minlength=self.counts.size).reshape(self.counts.shape)
        self._pending, self._n_pending = [], 0


def _expert_codes(cell: np.ndarray, ex: np.ndarray, E: int) -> np.ndarray:
    """Flat codes cell * E + expert of every real (non-padding) expert of every row."""
    codes = (cell * E)[:, None] + ex
    return codes[ex < E] if (ex >= E).any() else codes.reshape(-1)


def _range_bincount(codes: np.ndarray) -> tuple[int, np.ndarray] | None:
    """bincount over the codes' own range (chunks of sorted traces touch few sequences)."""
    if len(codes) == 0:
        return None
    lo = int(codes.min())
    return lo, np.bincount(codes - lo)


#: Widest span of cells one bincount covers when adding to a SpilledCounts (32 MB of int64).
_SPAN = 1 << 22


def _add_spans(target: SpilledCounts, cells: np.ndarray) -> None:
    """Add the cells' counts to the file: one bincount over their range when it is narrow (rows
    grouped by sequence), else over sorted spans of at most _SPAN cells (rows in any order)."""
    if not len(cells):
        return
    lo, hi = int(cells.min()), int(cells.max())
    if hi - lo < _SPAN:
        target.add_at(lo, np.bincount(cells - lo))
        return
    cells = np.sort(cells)
    i = 0
    while i < len(cells):
        start = int(cells[i])
        j = int(np.searchsorted(cells, start + _SPAN))
        target.add_at(start, np.bincount(cells[i:j] - start))
        i = j


def _add_range(target: np.ndarray, cells: np.ndarray) -> None:
    res = _range_bincount(cells)
    if res is not None:
        lo, counts = res
        target[lo:lo + len(counts)] += counts.astype(target.dtype)
