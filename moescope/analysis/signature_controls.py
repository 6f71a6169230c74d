"""Token-identity and load-balancing controls of the routing signatures, fitted per training fold.

- :class:`TokenIdControl`: every token is given the k experts its token id gets most often at
  the layer *in the training fold's sequences* (ties to the lower expert id). A token id never
  seen in the training fold gets the layer's expert frequencies in the training fold, scaled to
  k assignments (the fallback; its share of the test tokens is reported). Fitting the map on
  the training fold only keeps the test sequences' own routing out of their control features
  (the old whole-trace map let a token seen in one sequence keep its own routing).
- :func:`tfidf_fold_features`: bag of token ids, tf-idf fitted on the training fold.
- :func:`load_balanced_counts`: expert loads kept, assignments dealt to sequences at random.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from moescope.analysis.routing_counts import layer_index, routes_relation
from moescope.analysis.spilled_keys import SpilledKeys
from moescope.chunked import ChunkedMatrix, lazy_wanted


# Keys per counting step: a long piece of keys is counted a bounded slice at a time.
_COUNT_CHUNK = 1 << 22


def _count_keys(pieces: Iterable[tuple[np.ndarray, np.ndarray | None]], minlength: int, *,
                narrow: bool = False) -> np.ndarray:
    """np.bincount of the concatenated (keys, weights) pieces (int64 counts without weights, or
    int32 with `narrow`; float64 sums with weights), counted piece by piece into one accumulator with np.add.at: no
    concatenation, no int64 copy of the keys, and (without weights) an int32 accumulator, which
    keeps the scattered increments in cache far better than bincount's fresh int64 array per call
    (about 3x faster on the token-id control's (layer, token, expert) keys)."""
    out: np.ndarray | None = None
    ones = np.ones(0, np.int32)
    for key, weights in pieces:
        for a in range(0, len(key), _COUNT_CHUNK):
            k = np.asarray(key[a:a + _COUNT_CHUNK])
            if not len(k):
                continue
            w = None if weights is None else np.asarray(weights[a:a + _COUNT_CHUNK])
            if out is None:
                out = np.zeros(minlength, np.int32 if w is None else np.float64)
            top = int(k.max()) + 1
            if top > len(out):
                out = np.concatenate([out, np.zeros(top - len(out), out.dtype)])
            if w is None:
                if len(ones) < len(k):
                    ones = np.ones(len(k), np.int32)
                np.add.at(out, k, ones[:len(k)])
            else:
                np.add.at(out, k, w.astype(np.float64, copy=False))
    if out is None:
        return np.zeros(minlength, np.int32 if narrow else np.int64)
    return out.astype(np.int64) if out.dtype == np.int32 and not narrow else out


@dataclass
class SequenceTokenExperts:
    """Every (MoE layer, token id, expert) assignment of the analysed sequences, grouped by
    sequence: key[i] is a flat index into (L, V, E) with V the positions of `vocab` (token ids,
    ascending), n[i] its count (None: 1 each); the keys of sequence segment_seq[j] (an index into
    the analysed seq_ids) are key[segment_start[j]:segment_start[j] + segment_len[j]] (a sequence
    may have several segments). key may be a :class:`SpilledKeys` (on disk, read by slices)."""

    key: np.ndarray | SpilledKeys
    n: np.ndarray | None
    segment_seq: np.ndarray
    segment_start: np.ndarray
    segment_len: np.ndarray
    vocab: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def from_rows(cls, seq_idx: np.ndarray, key: np.ndarray, n: np.ndarray | None, vocab: np.ndarray,
                  shape: tuple[int, int, int]) -> "SequenceTokenExperts":
        """From per-row sequence indices (any order)."""
        order = np.argsort(seq_idx, kind="stable")
        seq_sorted = np.asarray(seq_idx)[order]
        starts = np.r_[0, np.flatnonzero(np.diff(seq_sorted)) + 1] if len(order) else np.zeros(0, np.int64)
        lengths = np.diff(np.r_[starts, len(order)])
        return cls(np.asarray(key)[order], None if n is None else np.asarray(n)[order], seq_sorted[starts],
                   starts.astype(np.int64), lengths.astype(np.int64), vocab, shape)

    def select(self, seq_ids: np.ndarray) -> "SequenceTokenExperts":
        """For keys whose segment_seq holds seq_id values (count_routes' seq_token_experts): the
        keys of the sequences `seq_ids` (ascending), segment_seq re-indexed into seq_ids; the keys
        themselves are shared, not copied. The vocabulary stays the pass's (a superset of the
        selected sequences' token ids: the extra columns are never counted, so every control
        value is the same as with the selected sequences' own vocabulary)."""
        seq_ids = np.asarray(seq_ids, np.int64)
        if not len(seq_ids):
            pos, ok = np.zeros(len(self.segment_seq), np.int64), np.zeros(len(self.segment_seq), bool)
        else:
            pos = np.minimum(np.searchsorted(seq_ids, self.segment_seq), len(seq_ids) - 1)
            ok = seq_ids[pos] == self.segment_seq
        return SequenceTokenExperts(self.key, self.n, pos[ok].astype(np.int64), self.segment_start[ok],
                                    self.segment_len[ok], self.vocab, self.shape)

    def rows_of(self, sequences: np.ndarray) -> np.ndarray:
        """Indices into key/n of the given sequences (indices into the analysed seq_ids)."""
        chosen = np.zeros(int(self.segment_seq.max(initial=-1)) + 1, bool)
        sequences = np.asarray(sequences)
        chosen[sequences[sequences < len(chosen)]] = True
        sel = chosen[self.segment_seq]
        start, length = self.segment_start[sel], self.segment_len[sel]
        if not len(start):
            return np.zeros(0, np.int64)
        offsets = np.repeat(start - np.r_[0, np.cumsum(length)[:-1]], length)
        return np.arange(int(length.sum())) + offsets

    def counts_of(self, sequences: np.ndarray, minlength: int = 0, *, narrow: bool = False) -> np.ndarray:
        """bincount of the keys of the given sequences (weighted by n): the same as
        counts(rows_of(sequences)), from contiguous slices of the segments (no index arrays);
        int32 with `narrow` (unweighted keys)."""
        chosen = np.zeros(int(self.segment_seq.max(initial=-1)) + 1, bool)
        sequences = np.asarray(sequences)
        chosen[sequences[sequences < len(chosen)]] = True
        sel = np.flatnonzero(chosen[self.segment_seq])
        spans = [slice(int(a), int(a + b)) for a, b in zip(self.segment_start[sel], self.segment_len[sel])]
        return _count_keys(((self.key[sp], None if self.n is None else self.n[sp]) for sp in spans), minlength,
                           narrow=narrow)

    def counts(self, rows: np.ndarray | None = None, minlength: int = 0, *, narrow: bool = False) -> np.ndarray:
        """bincount of the keys (of `rows`), weighted by n (int32 with `narrow` and no rows)."""
        if rows is None:
            # a generator: the keys on disk are read one chunk at a time (a list would hold them all)
            return _count_keys([(self.key[:], self.n)] if not isinstance(self.key, SpilledKeys)
                                     else ((self.key[a:a + _COUNT_CHUNK], None if self.n is None else
                                            self.n[a:a + _COUNT_CHUNK])
                                           for a in range(0, len(self.key), _COUNT_CHUNK)), minlength, narrow=narrow)
        key = self.key[rows]
        weights = None if self.n is None else self.n[rows]
        return np.bincount(key, weights=weights, minlength=minlength)


def sequence_token_expert_counts(trace: Any, *, phase: str, seq_ids: np.ndarray) -> SequenceTokenExperts:
    """One streaming pass over the routes of `phase` (Arrow batches, numpy): every expert
    assignment of the sequences in `seq_ids` (ascending) as a (layer, token id, expert) key, kept
    per sequence without aggregation (4 bytes per assignment; no hash table), written to a temporary
    file as the pass goes (:class:`SpilledKeys`) so that memory does not grow with the trace.
    Needs the tokens table."""
    from moescope.analysis import route_pass as rp

    where = "" if phase == "all" else f"WHERE phase = '{phase}'"
    tok = trace.con.sql(f"SELECT seq_id, pos, token_id FROM tokens {where}").fetchnumpy()
    seq = np.asarray(tok["seq_id"], np.int64)
    keep = np.isin(seq, seq_ids)
    tkeys = (seq[keep] << 32) | np.asarray(tok["pos"], np.int64)[keep]
    vocab, tindex = np.unique(np.asarray(tok["token_id"], np.int64)[keep], return_inverse=True)
    order = np.argsort(tkeys, kind="stable")
    tkeys, tindex = tkeys[order], tindex[order]
    L, V, E, k = len(trace.moe_layers), len(vocab), trace.n_experts, trace.top_k
    shape = (L, V, E)
    key_type = np.int32 if L * V * E < 2 ** 31 else np.int64
    li_of = layer_index(trace)
    src = routes_relation(trace, phase, ["seq_id", "pos", "layer", "experts"])
    keys, seg_seq, seg_len = SpilledKeys(key_type), [], []
    for batch in trace.con.sql(f"SELECT * FROM {src}").to_arrow_reader(1 << 16):
        if not len(tkeys):
            break
        chunk = rp.decode(batch, li_of, k, E)
        at = np.minimum(np.searchsorted(tkeys, chunk.key), len(tkeys) - 1)
        known = tkeys[at] == chunk.key
        if not known.any():
            continue
        cell = (chunk.li[known] * V + tindex[at[known]]).astype(key_type) * E
        ex = chunk.ex[known]
        valid = ex < E
        row_seq = np.searchsorted(seq_ids, chunk.seq[known])
        if (np.diff(row_seq) < 0).any():  # keep each sequence's rows together
            o = np.argsort(row_seq, kind="stable")
            cell, ex, valid, row_seq = cell[o], ex[o], valid[o], row_seq[o]
        codes = (cell[:, None] + ex.astype(key_type))[valid]
        per_row = valid.sum(axis=1)
        starts = np.r_[0, np.flatnonzero(np.diff(row_seq)) + 1]
        seg_seq.append(row_seq[starts])
        seg_len.append(np.add.reduceat(per_row, starts))
        keys.append(codes)
    key = keys.finish()
    seg_seq_a = np.concatenate(seg_seq) if seg_seq else np.zeros(0, np.int64)
    seg_len_a = np.concatenate(seg_len).astype(np.int64) if seg_len else np.zeros(0, np.int64)
    seg_start = np.r_[0, np.cumsum(seg_len_a)[:-1]].astype(np.int64) if len(seg_len_a) else np.zeros(0, np.int64)
    return SequenceTokenExperts(key, None, seg_seq_a, seg_start, seg_len_a, vocab, shape)


def top_k_map(counts: np.ndarray, k: int) -> np.ndarray:
    """(L, V, E) 0/1: the k experts with the largest counts per (layer, token), ties to the lower
    expert id; rows with no count are all 0."""
    E = counts.shape[-1]
    rows = counts.reshape(-1, E)
    # unique keys (ties to the lower id); int32 when they fit: argpartition is then twice as fast
    dtype = np.int32 if rows.size == 0 or (float(rows.max()) + 1) * E < 2 ** 31 else np.int64
    key = rows.astype(dtype)
    key *= E
    key += (E - 1 - np.arange(E, dtype=dtype))
    top = np.argpartition(key, E - k, axis=1)[:, E - k:]  # the k largest keys
    out = np.zeros(rows.shape, np.float64)
    out[np.arange(len(rows))[:, None], top] = 1.0
    out[~rows.any(axis=1)] = 0.0
    return out.reshape(counts.shape)


_MAP_BLOCK = 1 << 14  # token rows per block of top_k_csr


def top_k_csr(counts: np.ndarray, k: int) -> Any:
    """:func:`top_k_map` of one layer's (V, E) counts as a sparse (V, E) CSR matrix of 1.0s (k
    per token with counts): 12 bytes per chosen expert instead of 8 bytes per (token, expert)."""
    from scipy.sparse import csr_matrix, vstack

    blocks = [csr_matrix(top_k_map(counts[lo:lo + _MAP_BLOCK][None], k)[0])  # dense 0/1 one block at a time
              for lo in range(0, len(counts), _MAP_BLOCK)]
    return vstack(blocks, format="csr") if blocks else csr_matrix((0, counts.shape[1]))


class TokenIdControl:
    """The token-id routing control, refitted on each training fold.

    Args:
        ste: :func:`sequence_token_expert_counts` of the analysed sequences.
        token_counts: (S, V) sparse occurrences of each vocab position in each sequence (the
            analysed phase), V as in ste.vocab.
        n_tokens: (S, L) routed tokens per sequence and layer (the signature denominators).
        top_k: experts per token.
    """

    def __init__(self, ste: SequenceTokenExperts, token_counts: Any, n_tokens: np.ndarray, top_k: int,
                 total: np.ndarray | None = None) -> None:
        self.ste, self.k = ste, top_k
        self.A = token_counts.tocsc()
        self.n_tokens = np.asarray(n_tokens, np.float64)
        L, V, E = ste.shape
        self.per_fold = total is None
        # (L, V, E) whole-trace counts, int32 (4 bytes a cell: at 48 layers x 128 experts x 60,000
        # ids that is 1.5 GB, which float64 would make 3 GB); the map itself is sparse, per layer
        self.total = (ste.counts(minlength=L * V * E, narrow=True).reshape(L, V, E) if total is None
                      else np.asarray(total).astype(np.int64 if np.max(total, initial=0) >= 2 ** 31 else np.int32))
        self.base_map = [top_k_csr(self.total[li], top_k) for li in range(L)]  # (V, E) CSR per layer
        self.layer_freq = self.total.sum(axis=1)  # (L, E) int64: every layer's expert totals
        S = self.A.shape[0]
        # (S, L, E) control counts of the whole-trace map: computed for the rows asked for when
        # large (MapCounts), else held
        self.lazy = lazy_wanted(S, L * E)
        self.A_rows = token_counts.tocsr() if self.lazy else None  # row blocks of the lazy features
        if self.lazy:
            self.base_counts: np.ndarray | MapCounts = MapCounts(self.A_rows, self.base_map)
        else:
            self.base_counts = np.stack([(self.A @ m).toarray() for m in self.base_map], axis=1)

    def fold(self, train_idx: np.ndarray, test_idx: np.ndarray) -> tuple[np.ndarray, float]:
        """((S, L * E) control signature vectors with the map of the training fold, share of the
        test sequences' token occurrences whose id is unseen in the training fold).

        Only (layer, token) rows that occur in the test sequences can differ from the whole-trace
        map, so only those are refitted (the rest of the map is the whole trace's = the training
        fold's); the control counts change by the token occurrences times the map's change."""
        L, V, E = self.ste.shape
        if not self.per_fold:  # too large to keep per-sequence counts: the whole-trace map
            if self.lazy:
                return ControlMatrix(self, {}), 0.0
            base = self.base_counts / np.maximum(self.n_tokens[:, :, None], 1e-12)
            return np.where(self.n_tokens[:, :, None] > 0, base, 0.0).reshape(len(base), -1), 0.0
        # dense bincount (no sort) of the test fold's assignments; only touched rows are refitted
        test_all = self.ste.counts_of(test_idx, minlength=L * V * E, narrow=True).reshape(L * V, E)
        touched = np.flatnonzero(test_all.any(axis=1))
        test = test_all[touched]
        del test_all
        flat_total = self.total.reshape(L * V, E)
        train = flat_total[touched] - test
        layer = touched // V
        freq = self.layer_freq - np.stack([test[layer == li].sum(axis=0) for li in range(L)])
        fallback = self.k * freq / np.maximum(freq.sum(axis=1, keepdims=True), 1e-12)
        new = top_k_map(train[None], self.k)[0]
        unseen_rows = train.sum(axis=1) == 0
        new[unseen_rows] = fallback[layer[unseen_rows]]
        old = np.zeros((len(touched), E))
        for li in np.unique(layer):
            at = np.flatnonzero(layer == li)
            old[at] = self.base_map[li][touched[at] % V].toarray()
        changed = np.flatnonzero(np.any(new != old, axis=1))
        occ = self.A[test_idx]
        unseen_tokens = touched[unseen_rows & (layer == 0)] % V
        unseen = float(occ[:, unseen_tokens].sum() / max(occ.sum(), 1))
        changes = {int(li): (touched[changed[layer[changed] == li]] % V,
                             new[changed[layer[changed] == li]] - old[changed[layer[changed] == li]])
                   for li in np.unique(layer[changed])}
        if self.lazy:  # the fold's map as changes to the whole-trace map; rows built when read
            return ControlMatrix(self, changes), unseen
        counts = self.base_counts.copy()
        for li, (tokens, delta) in changes.items():
            counts[:, li, :] += np.asarray(self.A[:, tokens] @ delta)
        sig = np.divide(counts, self.n_tokens[:, :, None], out=np.zeros(counts.shape), where=self.n_tokens[:, :, None] > 0)
        return sig.reshape(len(sig), -1), unseen


class MapCounts:
    """(S, L, E) token-id control counts occurrences @ map[l], computed for the rows asked for:
    ``counts[rows, l0:l1]`` -> (len(rows), l1 - l0, E) float64 (no S x L x E array is held)."""

    def __init__(self, occurrences: Any, maps: list[Any]) -> None:
        self.occurrences, self.maps = occurrences, maps  # (S, V) CSR, L sparse (V, E) maps
        self.shape = (occurrences.shape[0], len(maps), maps[0].shape[1] if maps else 0)
        self.dtype = np.dtype(np.float64)

    def __getitem__(self, key: tuple[Any, slice]) -> np.ndarray:
        rows, layers = key
        occ = self.occurrences[rows]
        picked = range(*layers.indices(self.shape[1]))
        out = np.empty((occ.shape[0], len(picked), self.shape[2]))
        for i, li in enumerate(picked):
            out[:, i, :] = (occ @ self.maps[li]).toarray()
        return out


class ControlMatrix(ChunkedMatrix):
    """(S, L * E) token-id control signatures of one fold, built a block of rows at a time: the
    whole-trace map's counts plus, per layer, the token occurrences times the fold map's change
    (changes: layer -> (vocab positions, (tokens, E) change of their map rows))."""

    def __init__(self, control: TokenIdControl, changes: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        S, L, E = control.base_counts.shape
        super().__init__(S, L * E)
        self.control, self.changes, self.E = control, changes, E

    def _dense(self, rows: np.ndarray, cols: slice) -> np.ndarray:
        from moescope.analysis.signature_matrix import layer_block

        ctl, E = self.control, self.E
        l0, l1 = cols.start // E, -(-cols.stop // E)
        counts = np.asarray(ctl.base_counts[rows, l0:l1], np.float64)
        occ = ctl.A_rows[rows] if any(l0 <= li < l1 for li in self.changes) else None
        for li, (tokens, delta) in self.changes.items():
            if l0 <= li < l1:
                counts[:, li - l0, :] += np.asarray(occ[:, tokens] @ delta)
        n = ctl.n_tokens[rows, l0:l1]
        return layer_block(counts, n, np.arange(len(rows)), slice(cols.start - l0 * E, cols.stop - l0 * E), E)


def whole_trace_control(token_expert: dict[str, np.ndarray], token_counts: Any, vocab: np.ndarray,
                        n_tokens: np.ndarray, n_layers: int, n_experts: int, top_k: int) -> TokenIdControl:
    """The token-id control from whole-trace (layer, token, expert) counts: the fallback when the
    per-sequence counts a per-fold fit needs are too large to hold. Every fold then uses the same
    map, which has seen the test sequences' own routing (optimistic for the control)."""
    keep = np.isin(token_expert["token_id"], vocab)
    v_idx = np.searchsorted(vocab, token_expert["token_id"][keep])
    total = np.zeros((n_layers, len(vocab), n_experts), np.int64)
    np.add.at(total, (token_expert["layer_index"][keep], v_idx, token_expert["expert"][keep]),
              np.asarray(token_expert["n"][keep]).astype(np.int64))
    empty = SequenceTokenExperts.from_rows(np.zeros(0, np.int64), np.zeros(0, np.int64), None, vocab,
                                           (n_layers, len(vocab), n_experts))
    return TokenIdControl(empty, token_counts, n_tokens, top_k, total=total)


def token_count_matrix(seq_tok: dict[str, np.ndarray], seq_ids: np.ndarray, vocab: np.ndarray | None = None) -> Any:
    """(S, V) sparse CSR counts of each token id in each sequence; columns: `vocab` positions
    (default: the ids present), ids outside `vocab` dropped."""
    from scipy.sparse import csr_matrix

    keep = np.isin(seq_tok["seq_id"], seq_ids)
    tok = seq_tok["token_id"][keep]
    if vocab is None:
        vocab = np.unique(tok)
    inside = np.isin(tok, vocab)
    col = np.searchsorted(vocab, tok[inside])
    row = np.searchsorted(seq_ids, seq_tok["seq_id"][keep][inside])
    return csr_matrix((seq_tok["n"][keep][inside].astype(np.float64), (row, col)), shape=(len(seq_ids), len(vocab)))


#: The bag of tokens keeps at most this many columns when a training fold also has more than this
#: many sequences: with both large, no exact ridge fit is bounded in memory (the n x n Gram matrix
#: and the p x p one both grow), so the ids beyond the most frequent are pooled (see
#: :func:`cap_vocabulary`). Below either size every id keeps its own column.
BAG_MAX_COLUMNS = 8192


def cap_vocabulary(train: Any, test: Any, columns: int) -> tuple[Any, Any]:
    """(train, test) token counts with at most `columns` columns: the `columns` - 1 ids found in
    the most training sequences (ties to the lower column) keep their own column, every other
    id is counted in one last column ("any other id"). Chosen on the training rows only."""
    from scipy.sparse import csr_matrix, hstack

    train, test = csr_matrix(train), csr_matrix(test)
    df = np.bincount(train.indices, minlength=train.shape[1])  # sequences containing each id
    keep = np.sort(np.argsort(-df, kind="stable")[:columns - 1])
    rest = np.ones(train.shape[1], bool)
    rest[keep] = False

    def pooled(m: Any) -> Any:
        return hstack([m[:, keep], csr_matrix(np.asarray(m[:, rest].sum(axis=1)))], format="csr")

    return pooled(train), pooled(test)


def bag_cap(n_train: int, n_ids: int) -> int | None:
    """The columns a training fold of `n_train` sequences keeps of a bag of `n_ids` token ids:
    BAG_MAX_COLUMNS when both exceed it (:func:`cap_vocabulary`), else None (every id kept)."""
    return BAG_MAX_COLUMNS if n_train > BAG_MAX_COLUMNS and n_ids > BAG_MAX_COLUMNS else None


def tfidf_fold_features(bag: Any) -> Any:
    """A ridge_cv features callable: tf-idf of the token counts, idf fitted on the training fold,
    the vocabulary capped first where :func:`bag_cap` says so."""
    from sklearn.feature_extraction.text import TfidfTransformer

    def features(_: int, train: np.ndarray, test: np.ndarray) -> tuple[Any, Any]:
        Btr, Bte = bag[train], bag[test]
        cap = bag_cap(len(train), bag.shape[1])
        if cap is not None:
            Btr, Bte = cap_vocabulary(Btr, Bte, cap)
        tf = TfidfTransformer().fit(Btr)
        return tf.transform(Btr), tf.transform(Bte)

    return features


def load_balanced_counts(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Load-balancing control: per layer, each expert keeps its total count over all sequences and
    each sequence keeps its number of assignments, but which sequence gets which expert
    assignment is re-drawn uniformly (a random table with both margins fixed, drawn expert
    by expert as multivariate hypergeometric draws). Equivalent to shuffling the single
    expert assignments over all (token, slot) positions of the layer."""
    S, L, E = counts.shape
    out = np.zeros_like(counts)
    for li in range(L):
        remaining = counts[:, li, :].sum(axis=1).astype(np.int64)
        totals = counts[:, li, :].sum(axis=0).astype(np.int64)
        for e in np.argsort(-totals):  # largest first: numerically the cheapest order
            if totals[e] == 0:
                continue
            draw = rng.multivariate_hypergeometric(remaining, int(totals[e]))
            out[:, li, e] = draw
            remaining -= draw
    return out
