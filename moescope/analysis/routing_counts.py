"""Counting routing events over a trace with bounded memory: the inputs of stats and signatures.

:func:`count_routes` makes ONE streaming pass over the routes rows (numpy over Arrow record
batches, see :mod:`moescope.analysis.route_pass`) and fills whichever counters are asked
for: load and every pair within the top-k, layer-to-layer transitions, weight histograms,
expert counts per (sequence, position bucket, layer), and per (layer, token id). DuckDB
serves what is cheap or row-order independent: phase selection (a SEMI JOIN with tokens),
the token table lookups, labels, per-phase loads, a sorted re-read for traces whose rows are
not grouped by token, and the (layer, token id, expert) GROUP BY when the vocabulary is too
large for a dense count array.

Phase selection (``phase``): 'prompt', 'generated' or 'all'. A trace without a tokens table
is taken to hold prompt tokens only (importers that record no token table).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from moescope.analysis import route_pass as rp
from moescope.analysis.engine import current_engine
from moescope.analysis.spilled_keys import SpilledCounts

from moescope.errors import MoescopeError
from moescope.store.reader import Trace

PHASE_CHOICES = ("prompt", "generated", "all")
BATCH_ROWS = 1 << 16
# dense (layer, token, expert) counts up to this many cells (64 MB of int64), DuckDB beyond
MAX_DENSE_TOKEN_CELLS = 1 << 23


# -- phase selection ------------------------------------------------------------------------------
def trace_phases(trace: Trace) -> set[str]:
    """Phases present in the trace's tokens table ({'prompt'} when it has no tokens table)."""
    if not trace.has("tokens"):
        return {"prompt"}
    return {str(r[0]) for r in trace.rows("SELECT DISTINCT phase FROM tokens")}


def needs_phase_filter(trace: Trace, phase: str) -> bool:
    """Whether selecting `phase` drops any routes row (False for 'all' and single-phase traces)."""
    if phase not in PHASE_CHOICES:
        raise MoescopeError(f"unknown phase {phase!r}; choose one of {', '.join(PHASE_CHOICES)}")
    present = trace_phases(trace)
    if phase == "generated" and "generated" not in present:
        raise MoescopeError(f"{trace.path} has no generated tokens; capture with --generate N or use --phase prompt")
    return phase != "all" and not present <= {phase}


def routes_relation(trace: Trace, phase: str, columns: list[str]) -> str:
    """SQL (a parenthesised sub-query) selecting `columns` of the routes rows of tokens in `phase`.

    No join is made when the phase covers every token of the trace, so the common case
    (a forward-only capture, phase 'prompt' or 'all') reads the routes shards directly.
    """
    if not needs_phase_filter(trace, phase):
        return f"(SELECT {', '.join(columns)} FROM routes)"
    return (f"(SELECT {', '.join('r.' + c for c in columns)} FROM routes r SEMI JOIN tokens t "
            f"ON r.seq_id = t.seq_id AND r.pos = t.pos AND t.phase = '{phase}')")


# -- DuckDB aggregations --------------------------------------------------------------------------
def layer_index(trace: Trace) -> np.ndarray:
    """Lookup array: model layer id -> position in trace.moe_layers (-1 for non-MoE layers)."""
    layers = trace.moe_layers
    index = np.full(max(layers) + 1, -1, dtype=np.int64)
    index[layers] = np.arange(len(layers))
    return index


def expert_load(trace: Trace, *, phase: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Expert assignments per MoE layer: (load (L, E) int64, token rows per layer (L,) int64),
    layers in trace.moe_layers order. load[l, e] counts the tokens whose top-k holds e."""
    if current_engine() is not None:
        scan = current_engine().count_routes(trace, phase=phase, transitions=False).scan
        return scan.load, scan.n_rows
    src = routes_relation(trace, phase, ["layer", "experts"])
    rows = trace.rows(f"SELECT layer, e, count(*) FROM (SELECT layer, unnest(experts) AS e FROM {src}) GROUP BY ALL")
    tokens = trace.rows(f"SELECT layer, count(*) FROM {src} GROUP BY layer")
    li, E = layer_index(trace), trace.n_experts
    load = np.zeros((len(trace.moe_layers), E), np.int64)
    n_rows = np.zeros(len(trace.moe_layers), np.int64)
    if rows:
        arr = np.asarray(rows, dtype=np.int64)
        np.add.at(load, (li[arr[:, 0]], arr[:, 1]), arr[:, 2])
    for layer, n in tokens:
        n_rows[li[layer]] = n
    return load, n_rows


#: Per-sequence bucket counts above this many cells (sequences x buckets x layers x experts;
#: 128 MB of uint16) are kept in a temporary file (SpilledCounts), not in memory. Tests set it to 0.
SPILL_SEQUENCE_CELLS = 1 << 26

#: Sequences per block when bucket counts are summed from a SpilledCounts file.
_SUM_ROWS = 4096


@dataclass
class SequenceCounts:
    """Expert counts per sequence and MoE layer, optionally split into position buckets.

    Attributes:
        seq_ids: (S,) sequence ids, ascending.
        counts: (S, B, L, E) uint16 (int32 for sequences of 65,536 tokens or more): tokens of the
            sequence in bucket b whose top-k at layer l holds e. A numpy array, or a
            :class:`~moescope.analysis.spilled_keys.SpilledCounts` (a temporary file read by
            blocks of sequences) when large: :meth:`total` and :meth:`first` read either.
        n_tokens: (S, B, L), same type: token rows of the sequence in bucket b at layer l.
        bucket_edges: (B,) first position (within the phase) of each bucket; bucket b holds
            positions [edges[b], edges[b+1]).
    """

    seq_ids: np.ndarray
    counts: Any
    n_tokens: np.ndarray
    bucket_edges: np.ndarray

    def total(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts (S, L, E), n_tokens (S, L)) over all positions (from a file: in the counts'
        own type, which holds any one sequence's total)."""
        if isinstance(self.counts, np.ndarray):
            return self.counts.sum(axis=1), self.n_tokens.sum(axis=1)
        return self._summed(self.counts.shape[1]), self.n_tokens.sum(axis=1)

    def first(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(counts, n_tokens) over the first n tokens of each sequence (n must be a bucket edge)."""
        b = int(np.searchsorted(self.bucket_edges, n, side="left"))
        if isinstance(self.counts, np.ndarray):
            return self.counts[:, :b].sum(axis=1), self.n_tokens[:, :b].sum(axis=1)
        return self._summed(b), self.n_tokens[:, :b].sum(axis=1)

    def _summed(self, buckets: int) -> np.ndarray:
        """(S, L, E) sum of the first `buckets` buckets, read from the file a block of sequences at a time."""
        src = self.counts
        out = np.empty((src.shape[0],) + src.shape[2:], src.dtype)
        for lo in range(0, len(out), _SUM_ROWS):
            out[lo:lo + _SUM_ROWS] = src.block(lo, lo + _SUM_ROWS)[:, :buckets].sum(axis=1, dtype=src.dtype)
        return out

    def select(self, keep: np.ndarray) -> "SequenceCounts":
        """The sequences where the boolean mask `keep` is true (a file is shared, not copied)."""
        counts = self.counts[keep] if isinstance(self.counts, np.ndarray) else self.counts.select(np.flatnonzero(keep))
        return SequenceCounts(self.seq_ids[keep], counts, self.n_tokens[keep], self.bucket_edges)


def token_expert_counts(trace: Trace, *, phase: str = "all") -> dict[str, np.ndarray]:
    """Per (MoE layer, token id, expert): how many times that token id was sent to that expert.

    Returns numpy columns layer_index (position in moe_layers), token_id, expert, n, sorted by
    (layer_index, token_id, n descending, expert). Requires the tokens table.
    """
    if not trace.has("tokens"):
        raise MoescopeError(f"{trace.path} has no tokens table; token-level measures need one")
    src = routes_relation(trace, phase, ["seq_id", "pos", "layer", "experts"])
    res = trace.con.sql(
        f"WITH x AS (SELECT r.layer, t.token_id, r.experts FROM {src} r JOIN tokens t "
        f"ON r.seq_id = t.seq_id AND r.pos = t.pos) "
        f"SELECT layer, token_id, e AS expert, count(*)::BIGINT AS n FROM "
        f"(SELECT layer, token_id, unnest(experts) AS e FROM x) GROUP BY ALL").fetchnumpy()
    li = layer_index(trace)
    out = {"layer_index": li[np.asarray(res["layer"], np.int64)], "token_id": np.asarray(res["token_id"], np.int64),
           "expert": np.asarray(res["expert"], np.int64), "n": np.asarray(res["n"], np.int64)}
    order = np.lexsort((out["expert"], -out["n"], out["token_id"], out["layer_index"]))
    return {k: v[order] for k, v in out.items()}


def sequence_token_counts(trace: Trace, *, phase: str = "prompt", seq_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per (sequence, token id): occurrences among the sequence's tokens of `phase`
    (numpy columns seq_id, token_id, n); of the sequences in `seq_ids` only, when given."""
    if not trace.has("tokens"):
        raise MoescopeError(f"{trace.path} has no tokens table; token-level measures need one")
    conds = [] if phase == "all" else [f"phase = '{phase}'"]
    with only_sequences(trace, seq_ids) as cond:
        conds += [cond] if cond else []
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        res = trace.con.sql(f"SELECT seq_id, token_id, count(*)::BIGINT AS n FROM tokens {where} GROUP BY ALL").fetchnumpy()
    return {k: np.asarray(v, np.int64) for k, v in res.items()}


@contextlib.contextmanager
def only_sequences(trace: Trace, seq_ids: np.ndarray | None, column: str = "seq_id") -> Iterator[str | None]:
    """A SQL condition keeping the rows whose `column` is in `seq_ids` (None: no condition),
    valid inside the block (the ids are a temporary DuckDB view)."""
    if seq_ids is None:
        yield None
        return
    name = f"_only_sequences_{id(seq_ids)}"
    trace.con.register(name, pa.table({"seq_id": pa.array(np.asarray(seq_ids, np.int64))}))
    try:
        yield f"{column} IN (SELECT seq_id FROM {name})"
    finally:
        trace.con.unregister(name)


# -- the numpy pass: pairs, transitions, weights ---------------------------------------------------
@dataclass
class RouteScan:
    """Token-level counts from one streaming pass over the routes (layers in moe_layers order).

    Attributes:
        n_rows: (L,) token rows per layer.
        load: (L, E) tokens whose top-k holds expert e.
        pairs: (L, E, E) symmetric: tokens whose top-k holds both a and b (a != b); the
            diagonal holds the load.
        transitions: (L-1, E, E): tokens with a in their top-k at MoE layer i and b at MoE layer i+1.
        transition_tokens: (L-1,) tokens seen at both layers of each adjacent pair.
        weight_hist: (L, k, bins) weights per rank, histogram on [0, weight_max] (None without weights).
        weight_sum_hist: (L, bins) sum of a token's k weights, histogram on [0, weight_max]; sums
            above it (float16 rounding) fall in the last bin.
        weight_mean: (L, k) mean weight per rank.
    """

    n_experts: int
    top_k: int
    moe_layers: list[int]
    n_rows: np.ndarray
    load: np.ndarray
    pairs: np.ndarray
    transitions: np.ndarray
    transition_tokens: np.ndarray
    weight_hist: np.ndarray | None
    weight_sum_hist: np.ndarray | None
    weight_mean: np.ndarray | None
    weight_bins: int
    weight_max: float = 1.0  # upper end of the weight histograms: 1, or the router's scale rounded up


def weight_range(trace: Trace) -> float:
    """Upper end for the weight histograms: 1 when every weight and every token's weight sum is
    at most 1 (float16 rounding allowed), else the largest of them rounded up to a half (routers
    that scale their weights, e.g. DeepSeek-V3's routed_scaling_factor, put everything above 1)."""
    top = trace.rows("SELECT max(list_max(weights)), max(list_sum(weights)) FROM routes")[0]
    return weight_range_of([float(x) for x in top if x is not None])


def weight_range_of(extremes: list[float]) -> float:
    """:func:`weight_range` from the largest weight and largest weight sum (an engine that
    maps over shards finds them per shard)."""
    largest = max(extremes, default=1.0)
    return 1.0 if largest <= 1.002 else float(np.ceil(round(largest, 2) * 2) / 2)


@dataclass
class RouteCounts:
    """What :func:`count_routes` counted (None for what was not asked)."""

    scan: RouteScan | None
    sequences: SequenceCounts | None
    token_experts: dict[str, np.ndarray] | None
    # per-sequence token-expert keys (SequenceTokenExperts, segment_seq holding seq_id values:
    # take .select(seq_ids)); only when asked with sequence_keys_limit
    seq_token_experts: Any = None


def _route_batches(trace: Trace, phase: str, columns: list[str], ordered: bool) -> Iterator[pa.RecordBatch]:
    # DuckDB's reader, not pyarrow's dataset scanner: it keeps the scan order and, without the
    # scanner's read-ahead, holds less in memory (measured: 400 vs 790 MB peak on 10M rows).
    order = " ORDER BY seq_id, pos, layer" if ordered else ""
    yield from trace.con.sql(f"SELECT * FROM {routes_relation(trace, phase, columns)}{order}").to_arrow_reader(BATCH_ROWS)


def _sequence_counter(trace: Trace, phase: str, bucket_edges: list[int] | None,
                      only: np.ndarray | None = None) -> rp.SequenceCounter:
    """A counter of the sequences with routes in `phase` (among `only`, when given)."""
    edges = np.asarray(sorted(set([0] + [int(e) for e in bucket_edges or []])), dtype=np.int64)
    src = routes_relation(trace, phase, ["seq_id"])
    seq_ids = np.sort(np.asarray(trace.con.sql(f"SELECT DISTINCT seq_id FROM {src}").fetchnumpy()["seq_id"], np.int64))
    if only is not None:  # e.g. signatures' --max-sequences sample: the counter's arrays hold these only
        seq_ids = seq_ids[np.isin(seq_ids, np.asarray(only, np.int64))]
    offsets = np.zeros(len(seq_ids), np.int64)
    if phase == "generated":  # positions count from each sequence's first generated token
        first = trace.con.sql("SELECT seq_id, min(pos) AS p FROM tokens WHERE phase = 'generated' GROUP BY seq_id").fetchnumpy()
        at = np.searchsorted(seq_ids, np.asarray(first["seq_id"], np.int64))
        ok = (at < len(seq_ids)) & (seq_ids[np.minimum(at, len(seq_ids) - 1)] == np.asarray(first["seq_id"], np.int64))
        offsets[at[ok]] = np.asarray(first["p"], np.int64)[ok]
    longest = trace.con.sql(f"SELECT coalesce(max(pos), 0) + 1 AS n FROM {routes_relation(trace, phase, ['pos'])}").fetchnumpy()["n"]
    cells = len(seq_ids) * len(edges) * len(trace.moe_layers) * trace.n_experts
    return rp.SequenceCounter(seq_ids, offsets, edges, len(trace.moe_layers), trace.n_experts,
                              max_tokens=int(longest[0]), spill=cells > SPILL_SEQUENCE_CELLS)


def _token_counter(trace: Trace, phase: str, record_seq_ids: np.ndarray | None = None,
                   record_limit: int = 0) -> rp.TokenExpertCounter | None:
    """A dense token x expert counter, or None when the vocabulary is too large for one.
    record_seq_ids: also keep every assignment of these sequences per sequence (on disk), unless
    they have more than record_limit assignments."""
    where = "" if phase == "all" else f"WHERE phase = '{phase}'"
    tok = trace.con.sql(f"SELECT seq_id, pos, token_id FROM tokens {where}").fetchnumpy()
    seq = np.asarray(tok["seq_id"], np.int64)
    keys = (seq << 32) | np.asarray(tok["pos"], np.int64)
    vocab, index = np.unique(np.asarray(tok["token_id"], np.int64), return_inverse=True)
    L, E = len(trace.moe_layers), trace.n_experts
    if L * len(vocab) * E > MAX_DENSE_TOKEN_CELLS or len(keys) == 0:
        return None
    if record_seq_ids is not None and int(np.isin(seq, record_seq_ids).sum()) * L * trace.top_k > record_limit:
        record_seq_ids = None
    order = np.argsort(keys, kind="stable")
    return rp.TokenExpertCounter(keys[order], index[order], vocab, L, E, record_seq_ids=record_seq_ids)


def _token_table(counter: rp.TokenExpertCounter) -> dict[str, np.ndarray]:
    """The dense counts as token_expert_counts' columns, in its row order
    (layer, token id, count descending, expert)."""
    counter.finish()
    order = np.argsort(-counter.counts, axis=2, kind="stable")  # within each (layer, token): most used first
    n = np.take_along_axis(counter.counts, order, axis=2)
    li, tok, rank = np.nonzero(n)
    return {"layer_index": li.astype(np.int64), "token_id": counter.vocab[tok].astype(np.int64),
            "expert": order[li, tok, rank].astype(np.int64), "n": n[li, tok, rank].astype(np.int64)}


def count_routes(trace: Trace, *, phase: str = "all", scan: bool = True, transitions: bool = True,
                 weight_bins: int = 20, sequences: bool = False, bucket_edges: list[int] | None = None,
                 token_experts: bool = False, sequence_ids: np.ndarray | None = None,
                 sequence_keys_limit: int | None = None) -> RouteCounts:
    """One streaming pass over the routes of `phase`, filling the counters asked for:

    scan: load, pairs, weights (and transitions unless transitions=False) -> RouteScan;
    sequences: expert counts per sequence, split at `bucket_edges` (positions within the
    phase) -> SequenceCounts; token_experts: per (layer, token id, expert), as
    :func:`token_expert_counts` returns them (needs the tokens table). sequence_ids: count
    sequences among these only (the other counters still see every row). sequence_keys_limit
    (with sequences and token_experts): also keep every expert assignment of the counted
    sequences as a per-sequence key on disk (RouteCounts.seq_token_experts, for the per-fold
    token-id control) when there are at most this many; the token lookup is shared with the
    token_experts counter, so this costs no second pass (engines other than the in-process one
    leave it None).
    """
    from threadpoolctl import threadpool_limits

    engine = current_engine()
    if engine is not None:  # e.g. --engine ray: the same counts from a map over the shards
        return engine.count_routes(trace, phase=phase, scan=scan, transitions=transitions, weight_bins=weight_bins,
                                   sequences=sequences, bucket_edges=bucket_edges, token_experts=token_experts,
                                   sequence_ids=sequence_ids)
    E, k, L = trace.n_experts, trace.top_k, len(trace.moe_layers)
    li_of = layer_index(trace)
    has_w = scan and trace.has_weights and "weights" in trace.columns("routes")
    pairs = rp.PairCounter(L, E) if scan else None
    trans = rp.TransitionCounter(L, E) if scan and transitions else None
    w_max = weight_range(trace) if has_w else 1.0
    weights = rp.WeightCounter(L, k, weight_bins, w_max) if has_w else None
    seqs = _sequence_counter(trace, phase, bucket_edges, sequence_ids) if sequences else None
    record = seqs.seq_ids if seqs is not None and sequence_keys_limit is not None else None
    tokens = (_token_counter(trace, phase, record, sequence_keys_limit or 0)
              if token_experts and trace.has("tokens") else None)
    row_counters = [c for c in (weights, seqs, tokens) if c is not None]
    columns = ["seq_id", "pos", "layer", "experts"] + (["weights"] if has_w else [])
    ordered = True
    with threadpool_limits(limits=1):  # many small float32 products: threads would only contend
        decoded = (rp.decode(b, li_of, k, E) for b in _route_batches(trace, phase, columns, ordered=False))
        for chunk, in_order in rp.whole_tokens(decoded):
            blocks = rp.LayerBlocks(chunk, L, E) if scan else None
            if pairs is not None:
                pairs.add(chunk, blocks)
            ordered = ordered and in_order
            if trans is not None and ordered:
                trans.add(chunk, blocks)
            for counter in row_counters:
                counter.add(chunk)
        if trans is not None and not ordered:  # rows not grouped by token: count transitions on sorted rows
            trans = rp.TransitionCounter(L, E)
            sorted_rows = (rp.decode(b, li_of, k, E) for b in _route_batches(trace, phase, columns[:4], ordered=True))
            for chunk, _ in rp.whole_tokens(sorted_rows):
                trans.add(chunk, rp.LayerBlocks(chunk, L, E))
    result = RouteCounts(None, None, None)
    if scan:
        n_trans = max(L - 1, 0)
        load = pairs.pairs[:, np.arange(E), np.arange(E)].copy()
        whist = weights.hist.reshape(L, k, weight_bins) if weights else None
        result.scan = RouteScan(
            n_experts=E, top_k=k, moe_layers=trace.moe_layers, n_rows=pairs.n_rows, load=load, pairs=pairs.pairs,
            transitions=trans.counts if trans else np.zeros((n_trans, E, E), np.int64),
            transition_tokens=trans.tokens if trans else np.zeros(n_trans, np.int64), weight_hist=whist,
            weight_sum_hist=weights.sum_hist.reshape(L, weight_bins) if weights else None,
            weight_mean=weights.total.reshape(L, k) / np.maximum(whist.sum(axis=2), 1) if weights else None,
            weight_bins=weight_bins, weight_max=w_max)
    if seqs is not None:
        counts = seqs.counts.finish() if isinstance(seqs.counts, SpilledCounts) else seqs.counts
        result.sequences = SequenceCounts(seqs.seq_ids, counts, seqs.n_tokens, seqs.edges)
    if tokens is not None and tokens.recorder is not None:
        from moescope.analysis.signature_controls import SequenceTokenExperts

        seg_seq, seg_start, seg_len = tokens.recorder.segments()
        result.seq_token_experts = SequenceTokenExperts(tokens.recorder.keys.finish(), None, seg_seq, seg_start, seg_len,
                                                        tokens.vocab, tokens.counts.shape)
    if token_experts and trace.has("tokens"):
        result.token_experts = _token_table(tokens) if tokens is not None else token_expert_counts(trace, phase=phase)
    return result


def scan_routes(trace: Trace, *, phase: str = "all", weight_bins: int = 20, transitions: bool = True) -> RouteScan:
    """Load, pair co-activation, adjacent-layer transitions and weight histograms in one
    streaming pass (memory: one chunk of rows plus the (L, E, E) count arrays)."""
    return count_routes(trace, phase=phase, weight_bins=weight_bins, transitions=transitions).scan


def sequence_expert_counts(trace: Trace, *, phase: str = "prompt", bucket_edges: list[int] | None = None) -> SequenceCounts:
    """Expert counts per (sequence, position bucket, MoE layer) over the routes of `phase`.
    Positions count from each sequence's first token of the phase (generated tokens from the
    first generated one); buckets let signatures of the first n tokens come from one pass."""
    return count_routes(trace, phase=phase, scan=False, sequences=True, bucket_edges=bucket_edges).sequences
