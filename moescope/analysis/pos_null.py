"""The token-identity nulls of the POS analysis: of the routing statistics (KL from uniform, top
experts' gain) and of the cross-validated probe (:func:`token_identity_fold_permutations`).

Why: in a trained LM both the tag and the routing of a token follow its token id ("the" is
DET and goes to the experts of "the"). Shuffling tags across all tokens then makes every
tag look specialised, although routing knows nothing of the tag beyond the token id. The
null here keeps token identity: tags are permuted only among occurrences of the same token
id (every id keeps its tag mix, every token its routing path), so what survives is the part
of the tag → expert association that the token id does not explain.

Exactness and cost: a Monte Carlo permutation test of conditional independence of tag and
routing given the token id. Tokens whose id occurs once, or always with one tag, cannot
change tag under this null; their counts are computed once, and only the other tokens are
permuted, many permutations per numpy pass (a bincount over permutation × tag × layer ×
expert). p = (1 + #{null ≥ observed}) / (1 + n), one-sided, per tag × layer; Holm across all
tag × layer cells (``moescope.inference.holm``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["default_permutations", "kl_and_gain", "token_identity_null", "token_identity_fold_permutations"]


def default_permutations(n_cells: int, alpha: float = 0.01) -> int:
    """Permutations needed so that a cell at the permutation floor survives Holm at `alpha`:
    n_cells / (n + 1) < alpha (at least 1,000)."""
    return max(1000, int(np.ceil(n_cells / alpha)))


def kl_and_gain(counts: np.ndarray, tag_counts: np.ndarray, top_k: int, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """KL from uniform (nats) and the top-n experts' mean Spec − 1, each (..., P, L), of counts (..., P, L, E)."""
    n_experts = counts.shape[-1]
    q = counts / (np.maximum(tag_counts, 1)[:, None, None] * top_k)  # shares normalised to sum 1 over experts
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(q > 0, q * np.log(q * n_experts), 0.0).sum(axis=-1)
    spec = q * n_experts
    top = -np.sort(-spec, axis=-1)[..., :top_n]
    return kl, top.mean(axis=-1) - 1.0


def _strata(y: np.ndarray, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stratum index per token, mask of tokens whose stratum holds more than one distinct tag)."""
    stratum = np.unique(token_ids, return_inverse=True)[1].ravel()
    first_tag = np.full(stratum.max() + 1 if len(stratum) else 0, -1)
    first_tag[stratum] = y  # any one tag of the stratum
    differs = np.bincount(stratum, weights=(y != first_tag[stratum]), minlength=len(first_tag)) > 0
    return stratum, differs[stratum]


def token_identity_null(paths: np.ndarray, y: np.ndarray, token_ids: np.ndarray, *, n_tags: int, n_experts: int,
                        top_k: int, top_n: int, n_permutations: int, seed: int) -> dict[str, Any]:
    """KL and top-n gain per tag × layer against tags permuted within token-id strata.

    Args:
        paths: (n, L, k) expert ids; y: (n,) tag index; token_ids: (n,) token id of each token.
    Returns:
        kl, gain: observed (P, L); kl_null, gain_null: their means under the null (P, L);
        kl_p, gain_p: one-sided permutation p-values (P, L); n_permutations; n_tokens_permutable
        (tokens in a stratum with more than one tag: the only ones the null moves).
    """
    n, L, k = paths.shape
    P, E = n_tags, n_experts
    tag_counts = np.bincount(y, minlength=P)
    cols = (np.arange(L)[None, :, None] * E + paths.astype(np.int64)).reshape(n, L * k)  # (layer, expert) cells

    def counts_of(tags: np.ndarray, c: np.ndarray) -> np.ndarray:
        idx = (tags[:, None] * (L * E) + c).ravel()
        return np.bincount(idx, minlength=P * L * E).reshape(P, L, E)

    kl, gain = kl_and_gain(counts_of(y, cols), tag_counts, top_k, top_n)
    stratum, movable = _strata(y, token_ids)
    fixed = counts_of(y[~movable], cols[~movable]).astype(np.int64)
    m_idx = np.nonzero(movable)[0]
    m_idx = m_idx[np.argsort(stratum[m_idx], kind="stable")]  # movable tokens grouped by stratum
    m_strata, m_tags, m_cols = stratum[m_idx].astype(np.float64), y[m_idx], cols[m_idx]
    M = len(m_idx)
    rng = np.random.default_rng(seed)
    kl_sum, gain_sum = np.zeros((P, L)), np.zeros((P, L))
    kl_hits, gain_hits = np.zeros((P, L), np.int64), np.zeros((P, L), np.int64)
    chunk = max(1, min(256, 4_000_000 // max(M * L * k, 1)))
    done = 0
    while done < n_permutations:
        b = min(chunk, n_permutations - done)
        if M:
            # Sorting (stratum + U[0,1)) shuffles positions within each stratum only.
            order = np.argsort(m_strata[None, :] + rng.random((b, M)), axis=1)
            tags = m_tags[order]  # (b, M): the tag each movable token carries in this permutation
            idx = ((np.arange(b)[:, None, None] * P + tags[:, :, None]) * (L * E) + m_cols[None, :, :]).ravel()
            counts = np.bincount(idx, minlength=b * P * L * E).reshape(b, P, L, E) + fixed
        else:
            counts = np.broadcast_to(fixed, (b, P, L, E))
        kl_b, gain_b = kl_and_gain(counts, tag_counts, top_k, top_n)
        kl_sum += kl_b.sum(0)
        gain_sum += gain_b.sum(0)
        kl_hits += (kl_b >= kl - 1e-12).sum(0)
        gain_hits += (gain_b >= gain - 1e-12).sum(0)
        done += b
    B = max(n_permutations, 1)
    return {"kl": kl, "gain": gain, "kl_null": kl_sum / B, "gain_null": gain_sum / B,
            "kl_p": (1 + kl_hits) / (1 + n_permutations), "gain_p": (1 + gain_hits) / (1 + n_permutations),
            "n_permutations": int(n_permutations), "n_tokens_permutable": int(M)}


def token_identity_fold_permutations(y: np.ndarray, token_ids: np.ndarray, splits: list, n: int,
                                     seed: int = 0) -> np.ndarray:
    """(R, n, S) tag vectors for the probe's permutation null: in every repeat, within each test
    fold, tags are permuted among the occurrences of the same token id.

    Why token ids: the probe's claim is that routing says something about POS. Tags shuffled over
    all tokens of a fold (the earlier null) are beaten by any router that sends a token id to its
    own experts, since the tag follows the id (the trap of :func:`token_identity_null`); this null
    keeps each id's tag mix, so a probe trained and tested on it learns what routing knows of the
    id and nothing more, and the real probe beats it only if routing separates tags *within* an id
    (e.g. "run" as NOUN vs VERB). Tokens whose id occurs once in the fold, or with one tag, keep
    their tag: they carry no information on this question, in both the real and the null runs.

    Why within test folds, and why this respects the sentence grouping: every token of a sentence
    sits in one test fold (grouped CV), and tags move only among tokens of that fold, so each
    permuted tag set has the same per-fold counts of every (id, tag) as the real one, training
    folds are built from exactly the same sentences, and no sentence contributes to both sides of
    any split (a shuffle across folds would also unbalance the stratified folds; see
    :func:`moescope.inference.fold_permutations`). Tags do move between sentences of a fold, and a
    sentence's own tag sequence is not kept: that is intended, the probe classifies one token at a
    time from its own routing, and under the null (routing independent of the tag given the id,
    including the context routing sees) the occurrences of an id are exchangeable whichever
    sentence they are in. In token mode (ungrouped folds) the same holds with tokens as the units.
    """
    y = np.asarray(y)
    token_ids = np.asarray(token_ids)
    rng = np.random.default_rng(seed)
    out = np.empty((len(splits), max(n, 0), len(y)), dtype=y.dtype)
    for r, rep in enumerate(splits):
        out[r] = y
        for _, test in rep:
            stratum = np.unique(token_ids[test], return_inverse=True)[1].ravel().astype(np.float64)
            slots = test[np.argsort(stratum, kind="stable")]  # the fold's tokens grouped by id
            for i in range(n):
                # sorting (stratum + U[0,1)) orders the tokens by id, randomly within an id
                out[r, i, slots] = y[test][np.argsort(stratum + rng.random(len(test)))]
    return out
