"""What experts receive, next to chance: the tokens each expert gets more often than their
frequency predicts (lift, binomial p, token purity against a token-blind simulated router), and
how much each layer's expert choice depends on the sequence's label (mutual information against
label permutations, Holm across layers). Part of the routing statistics
(:mod:`moescope.analysis.stats`, which runs both); units: bits, shares of a layer's assignments."""
from __future__ import annotations

from typing import Any

import numpy as np


# -- token specialisation --------------------------------------------------------------------------
def token_specialisation(counts: dict[str, np.ndarray], top_k: int, n_layers: int, *, top_tokens: int = 10,
                         min_count: int = 20, token_text: dict[int, str] | None = None, seed: int = 0) -> dict[str, Any]:
    """For each layer and expert, the tokens it receives most relative to their frequency.

    `counts` is :func:`token_expert_counts` output. lift(e, t) = n(e, t) / (n_t * r_e): the
    share of token t's occurrences sent to e over e's share of all tokens (1 = chance);
    only tokens seen at least `min_count` times; p_value: binomial tail P(X >= n(e, t)) with
    X ~ Bin(n_t, r_e). Also per layer token_purity: the share of expert assignments that
    go to each token's own k most frequent experts (1 when routing is a function of the
    token id), with token_purity_chance from one simulated routing that ignores token ids.
    """
    from scipy.stats import binom

    li, tok, ex, n = counts["layer_index"], counts["token_id"], counts["expert"], counts["n"].astype(np.float64)
    # per (layer, token): occurrences = assignments / k (every occurrence has k experts)
    key = li * (int(tok.max()) + 1 if len(tok) else 1) + tok
    ukey, inv = np.unique(key, return_inverse=True)
    assigned = np.bincount(inv, weights=n)
    n_tok = assigned / top_k
    layer_total = np.bincount(li, weights=n, minlength=n_layers)
    E = int(ex.max()) + 1 if len(ex) else 0
    rate = np.zeros((n_layers, max(E, 1)))
    np.add.at(rate, (li, ex), n)
    rate = rate / np.maximum(layer_total[:, None] / top_k, 1)  # share of tokens choosing e
    lift = n / np.maximum(n_tok[inv] * rate[li, ex], 1e-12)
    # purity: counts are sorted by (layer, token, n desc), so the first k rows of each group are its top-k
    first = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    rank = np.arange(len(key)) - np.repeat(first, np.diff(np.r_[first, len(key)]))
    purity = np.bincount(li[rank < top_k], weights=n[rank < top_k], minlength=n_layers) / np.maximum(layer_total, 1)
    chance = _purity_chance(n_tok, ukey, int(tok.max()) + 1 if len(tok) else 1, rate, top_k, n_layers, seed)
    per_layer = []
    keep = n_tok[inv] >= min_count
    for layer in range(n_layers):
        sel = np.flatnonzero((li == layer) & keep)
        experts = {}
        if len(sel):
            order = sel[np.lexsort((-n[sel], -lift[sel], ex[sel]))]
            e_sorted = ex[order]
            starts = np.r_[0, np.flatnonzero(np.diff(e_sorted)) + 1]
            for s, e_next in zip(starts, np.r_[starts[1:], len(order)]):
                rows = order[s:min(e_next, s + top_tokens)]
                p = binom.sf(n[rows] - 1, np.rint(n_tok[inv[rows]]).astype(np.int64), rate[layer, ex[rows]])
                experts[int(ex[rows[0]])] = [
                    {"token_id": int(tok[r]), "token": (token_text or {}).get(int(tok[r])), "count": int(n[r]),
                     "token_count": int(round(n_tok[inv[r]])), "lift": float(lift[r]), "p_value": float(pv)}
                    for r, pv in zip(rows, p)]
        per_layer.append(experts)
    return {"min_count": min_count, "top_tokens": top_tokens, "token_purity": purity, "token_purity_chance": chance,
            "experts": per_layer}


def _purity_chance(n_tok: np.ndarray, ukey: np.ndarray, stride: int, rate: np.ndarray, top_k: int, n_layers: int,
                   seed: int) -> np.ndarray:
    """Token purity of one simulated trace with the same token counts and expert shares but
    routing independent of the token id (each occurrence's k experts drawn with replacement)."""
    rng = np.random.default_rng(seed)
    layer = ukey // stride
    out = np.zeros(n_layers)
    for li in range(n_layers):
        sel = layer == li
        if not sel.any():
            continue
        p = rate[li] / max(rate[li].sum(), 1e-12)
        draws = rng.multinomial(np.rint(n_tok[sel] * top_k).astype(np.int64), p)
        kk = min(top_k, draws.shape[1])
        top = -np.partition(-draws, kk - 1, axis=1)[:, :kk]
        out[li] = top.sum() / max(draws.sum(), 1)
    return out


# -- label specialisation --------------------------------------------------------------------------
def label_specialisation(counts: np.ndarray, labels: np.ndarray, *, permutations: int | None = None, seed: int = 0,
                         top: int = 5) -> dict[str, Any]:
    """How much the expert choice of each layer depends on the sequence's label.

    `counts` (S, L, E) assignments per sequence; `labels` (S,). mi_bits[l] = I(label; expert)
    at layer l over all assignments = sum_c w_c KL(P(e | c) || P(e)); baseline: the same with
    labels shuffled across sequences `permutations` times (None: L / 0.01 - 1 and at least 100,
    moescope.inference.holm_ready_draws, so a real effect can reach p <= 0.01 after the correction; the shuffles are cheap: one
    product per batch) (mean, 95th percentile, p-value (1 + #perm >= real) / (1 + permutations),
    and Holm-adjusted across layers: mi_p_value_holm). top_experts[l][c]: experts with the
    largest lift P(e | c) / P(e).
    """
    S, L, E = counts.shape
    if permutations is None:
        from moescope.inference import holm_ready_draws

        permutations = holm_ready_draws(L, minimum=100)
    classes, y = np.unique(labels, return_inverse=True)
    X = counts.reshape(S, L * E).astype(np.float64)

    def mi(assign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mi (P, L), per-class counts (P, C, L, E)) for P label assignments (P, S) at once:
        one product for all of them (counts are integers, so the sums are exact in float64)."""
        onehot = np.zeros((len(assign), len(classes), S))
        onehot[np.arange(len(assign))[:, None], assign, np.arange(S)[None, :]] = 1.0
        per_class = (onehot.reshape(-1, S) @ X).reshape(len(assign), len(classes), L, E)
        total = per_class.sum(axis=(1, 3))  # (P, L)
        joint = per_class / np.maximum(total, 1)[:, None, :, None]
        pc, pe = joint.sum(axis=3, keepdims=True), joint.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(joint > 0, joint * np.log2(joint / (pc * pe)), 0.0)
        return terms.sum(axis=(1, 3)), per_class

    real, per_class = mi(y[None])
    real, per_class = real[0], per_class[0]
    rng = np.random.default_rng(seed)
    step = max(1, 4_000_000 // max(len(classes) * max(S, L * E), 1))  # bounded memory for many labels/sequences
    # the shuffles of one step at a time: (permutations, S) at once would be GBs for many sequences
    perm = np.concatenate([mi(np.array([rng.permutation(y) for _ in range(min(step, permutations - i))]))[0]
                           for i in range(0, permutations, step)]) if permutations else np.zeros((0, L))
    p_e = per_class.sum(axis=0) / np.maximum(per_class.sum(axis=(0, 2)), 1)[:, None]  # (L, E)
    p_ec = per_class / np.maximum(per_class.sum(axis=2, keepdims=True), 1)  # (C, L, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(p_e[None] > 0, p_ec / p_e[None], np.nan)
    top_experts = [{str(c): [[int(e), float(lift[ci, li, e])] for e in np.argsort(-np.nan_to_num(lift[ci, li], nan=-1))[:top]]
                    for ci, c in enumerate(classes)} for li in range(L)]
    from moescope.inference import holm, permutation_p_value

    p_values = np.array([permutation_p_value(real[li], perm[:, li]) for li in range(L)]) if permutations else None
    return {"labels": [str(c) for c in classes], "mi_bits": real,
            "mi_permutation_mean_bits": perm.mean(axis=0) if permutations else None,
            "mi_permutation_p95_bits": np.percentile(perm, 95, axis=0) if permutations else None,
            "mi_p_value": p_values,
            "mi_p_value_holm": holm(p_values) if permutations else None,
            "permutations": permutations, "top_experts": top_experts}
