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
    """Per (sequence, MoE layer, token id, expert): how often the token id of that sequence went
    to the expert. seq_idx: index into the analysed seq_ids; key: flat index into (L, V, E) with
    V the positions of `vocab` (token ids, ascending); n: the count."""

    seq_idx: np.ndarray
    key: np.ndarray
    n: np.ndarray
    vocab: np.ndarray
    shape: tuple[int, int, int]


def sequence_token_expert_counts(trace: Any, *, phase: str, seq_ids: np.ndarray) -> SequenceTokenExperts:
    """One DuckDB aggregation over routes x tokens of `phase`, rows of sequences in `seq_ids`
    (ascending) only. Needs the tokens table."""
    src = routes_relation(trace, phase, ["seq_id", "pos", "layer", "experts"])
    res = trace.con.sql(
        f"WITH x AS (SELECT r.seq_id, r.layer, t.token_id, r.experts FROM {src} r JOIN tokens t "
        f"ON r.seq_id = t.seq_id AND r.pos = t.pos) "
        f"SELECT seq_id, layer, token_id, e AS expert, count(*)::INTEGER AS n FROM "
        f"(SELECT seq_id, layer, token_id, unnest(experts) AS e FROM x) GROUP BY ALL").fetchnumpy()
    seq = np.asarray(res["seq_id"], np.int64)
    keep = np.isin(seq, seq_ids)
    tok = np.asarray(res["token_id"], np.int64)[keep]
    vocab, v_idx = np.unique(tok, return_inverse=True)
    L, E = len(trace.moe_layers), trace.n_experts
    li = layer_index(trace)[np.asarray(res["layer"], np.int64)[keep]]
    key = (li * len(vocab) + v_idx) * E + np.asarray(res["expert"], np.int64)[keep]
    return SequenceTokenExperts(np.searchsorted(seq_ids, seq[keep]).astype(np.int64), key,
                                np.asarray(res["n"], np.int64)[keep], vocab, (L, len(vocab), E))


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

    def __init__(self, ste: SequenceTokenExperts, token_counts: Any, n_tokens: np.ndarray, top_k: int) -> None:
        self.ste, self.k = ste, top_k
        self.A = token_counts.tocsc()
        self.n_tokens = np.asarray(n_tokens, np.float64)
        L, V, E = ste.shape
        self.total = np.bincount(ste.key, weights=ste.n, minlength=L * V * E).reshape(L, V, E)
        self.base_map = top_k_map(self.total, top_k)
        self.base_counts = np.stack([np.asarray(self.A @ self.base_map[li]) for li in range(L)], axis=1)  # (S, L, E)

    def fold(self, train_idx: np.ndarray, test_idx: np.ndarray) -> tuple[np.ndarray, float]:
        """((S, L * E) control signature vectors with the map of the training fold, share of the
        test sequences' token occurrences whose id is unseen in the training fold).

        Only (layer, token) rows that occur in the test sequences can differ from the whole-trace
        map, so only those are refitted (the rest of the map is the whole trace's = the training
        fold's); the control counts change by the token occurrences times the map's change."""
        L, V, E = self.ste.shape
        in_test = np.zeros(len(self.n_tokens), bool)
        in_test[test_idx] = True
        rows = in_test[self.ste.seq_idx]
        key, n = self.ste.key[rows], self.ste.n[rows]
        lv, e = key // E, key % E
        touched, local = np.unique(lv, return_inverse=True)  # (layer, token) rows seen in the test fold
        test = np.bincount(local * E + e, weights=n, minlength=len(touched) * E).reshape(len(touched), E)
        flat_total = self.total.reshape(L * V, E)
        train = flat_total[touched] - test
        layer = touched // V
        freq = self.total.sum(axis=1) - np.bincount(layer[local] * E + e, weights=n, minlength=L * E).reshape(L, E)
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
