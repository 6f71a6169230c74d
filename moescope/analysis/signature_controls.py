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
from typing import Any

import numpy as np

from moescope.analysis.routing_counts import layer_index, routes_relation


@dataclass
class SequenceTokenExperts:
    """Every (MoE layer, token id, expert) assignment of the analysed sequences, grouped by
    sequence: key[i] is a flat index into (L, V, E) with V the positions of `vocab` (token ids,
    ascending), n[i] its count (None: 1 each); the keys of sequence segment_seq[j] (an index into
    the analysed seq_ids) are key[segment_start[j]:segment_start[j] + segment_len[j]] (a sequence
    may have several segments)."""

    key: np.ndarray
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

    def counts_of(self, sequences: np.ndarray, minlength: int = 0) -> np.ndarray:
        """bincount of the keys of the given sequences (weighted by n): the same as
        counts(rows_of(sequences)), from contiguous slices of the segments (no index arrays)."""
        chosen = np.zeros(int(self.segment_seq.max(initial=-1)) + 1, bool)
        sequences = np.asarray(sequences)
        chosen[sequences[sequences < len(chosen)]] = True
        sel = np.flatnonzero(chosen[self.segment_seq])
        if not len(sel):
            return np.bincount(np.zeros(0, np.int64), minlength=minlength)
        spans = [slice(int(a), int(a + b)) for a, b in zip(self.segment_start[sel], self.segment_len[sel])]
        key = np.concatenate([self.key[sp] for sp in spans])
        weights = None if self.n is None else np.concatenate([self.n[sp] for sp in spans])
        return np.bincount(key, weights=weights, minlength=minlength)

    def counts(self, rows: np.ndarray | None = None, minlength: int = 0) -> np.ndarray:
        """bincount of the keys (of `rows`), weighted by n."""
        key = self.key if rows is None else self.key[rows]
        weights = None if self.n is None else (self.n if rows is None else self.n[rows])
        return np.bincount(key, weights=weights, minlength=minlength)


def sequence_token_expert_counts(trace: Any, *, phase: str, seq_ids: np.ndarray) -> SequenceTokenExperts:
    """One streaming pass over the routes of `phase` (Arrow batches, numpy): every expert
    assignment of the sequences in `seq_ids` (ascending) as a (layer, token id, expert) key, kept
    per sequence without aggregation (4 bytes per assignment; no hash table). Needs the tokens table."""
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
    keys, seg_seq, seg_len = [], [], []
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
    key = np.concatenate(keys) if keys else np.zeros(0, key_type)
    seg_seq_a = np.concatenate(seg_seq) if seg_seq else np.zeros(0, np.int64)
    seg_len_a = np.concatenate(seg_len).astype(np.int64) if seg_len else np.zeros(0, np.int64)
    seg_start = np.r_[0, np.cumsum(seg_len_a)[:-1]].astype(np.int64) if len(seg_len_a) else np.zeros(0, np.int64)
    return SequenceTokenExperts(key, None, seg_seq_a, seg_start, seg_len_a, vocab, shape)


def top_k_map(counts: np.ndarray, k: int) -> np.ndarray:
    """(L, V, E) 0/1: the k experts with the largest counts per (layer, token), ties to the lower
    expert id; rows with no count are all 0."""
    L, V, E = counts.shape
    key = counts.astype(np.int64) * E + (E - 1 - np.arange(E))  # unique keys: ties to the lower id
    top = np.argpartition(-key, k - 1, axis=2)[:, :, :k]
    out = np.zeros(counts.shape, np.float64)
    np.put_along_axis(out, top, 1.0, axis=2)
    out[counts.sum(axis=2) == 0] = 0.0
    return out


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
        self.total = (ste.counts(minlength=L * V * E).reshape(L, V, E).astype(np.float64) if total is None
                      else np.asarray(total, np.float64))
        self.base_map = top_k_map(self.total, top_k)
        self.base_counts = np.stack([np.asarray(self.A @ self.base_map[li]) for li in range(L)], axis=1)  # (S, L, E)

    def fold(self, train_idx: np.ndarray, test_idx: np.ndarray) -> tuple[np.ndarray, float]:
        """((S, L * E) control signature vectors with the map of the training fold, share of the
        test sequences' token occurrences whose id is unseen in the training fold).

        Only (layer, token) rows that occur in the test sequences can differ from the whole-trace
        map, so only those are refitted (the rest of the map is the whole trace's = the training
        fold's); the control counts change by the token occurrences times the map's change."""
        L, V, E = self.ste.shape
        if not self.per_fold:  # too large to keep per-sequence counts: the whole-trace map
            base = self.base_counts / np.maximum(self.n_tokens[:, :, None], 1e-12)
            return np.where(self.n_tokens[:, :, None] > 0, base, 0.0).reshape(len(base), -1), 0.0
        # dense bincount (no sort) of the test fold's assignments; only touched rows are refitted
        test_all = self.ste.counts_of(test_idx, minlength=L * V * E).reshape(L * V, E)
        touched = np.flatnonzero(test_all.any(axis=1))
        test = test_all[touched]
        del test_all
        flat_total = self.total.reshape(L * V, E)
        train = flat_total[touched] - test
        layer = touched // V
        freq = self.total.sum(axis=1) - np.stack([test[layer == li].sum(axis=0) for li in range(L)])
        fallback = self.k * freq / np.maximum(freq.sum(axis=1, keepdims=True), 1e-12)
        new = top_k_map(train[None], self.k)[0]
        unseen_rows = train.sum(axis=1) == 0
        new[unseen_rows] = fallback[layer[unseen_rows]]
        old = self.base_map.reshape(L * V, E)[touched]
        changed = np.flatnonzero(np.any(new != old, axis=1))
        counts = self.base_counts.copy()
        for li in np.unique(layer[changed]):
            sel = changed[layer[changed] == li]
            counts[:, li, :] += np.asarray(self.A[:, touched[sel] % V] @ (new[sel] - old[sel]))
        occ = self.A[test_idx]
        unseen_tokens = touched[unseen_rows & (layer == 0)] % V
        unseen = float(occ[:, unseen_tokens].sum() / max(occ.sum(), 1))
        sig = np.divide(counts, self.n_tokens[:, :, None], out=np.zeros(counts.shape), where=self.n_tokens[:, :, None] > 0)
        return sig.reshape(len(sig), -1), unseen


def whole_trace_control(token_expert: dict[str, np.ndarray], token_counts: Any, vocab: np.ndarray,
                        n_tokens: np.ndarray, n_layers: int, n_experts: int, top_k: int) -> TokenIdControl:
    """The token-id control from whole-trace (layer, token, expert) counts: the fallback when the
    per-sequence counts a per-fold fit needs are too large to hold. Every fold then uses the same
    map, which has seen the test sequences' own routing (optimistic for the control)."""
    keep = np.isin(token_expert["token_id"], vocab)
    v_idx = np.searchsorted(vocab, token_expert["token_id"][keep])
    total = np.zeros((n_layers, len(vocab), n_experts))
    np.add.at(total, (token_expert["layer_index"][keep], v_idx, token_expert["expert"][keep]), token_expert["n"][keep])
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


def tfidf_fold_features(bag: Any) -> Any:
    """A ridge_cv features callable: tf-idf of the token counts, idf fitted on the training fold."""
    from sklearn.feature_extraction.text import TfidfTransformer

    def features(_: int, train: np.ndarray, test: np.ndarray) -> tuple[Any, Any]:
        tf = TfidfTransformer().fit(bag[train])
        return tf.transform(bag[train]), tf.transform(bag[test])

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
