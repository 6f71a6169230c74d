"""The token-identity null of the POS routing statistics (KL from uniform, top experts' gain).

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

__all__ = ["default_permutations", "kl_and_gain", "token_identity_null"]


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
