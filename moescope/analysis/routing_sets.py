"""Similarity of expert choices between tokens, and the chance levels it is compared with.

Notation: a token's expert set S (|S| = k of E experts) is an (n, k) integer array per
layer, one row per token (ids 0..E-1; -1 pads rows of traces whose k varies). Everything
here is vectorised over rows and pure (numpy in, numpy out).

Measures and their chance levels under two independent uniform top-k draws:
- overlap o = |S_a ∩ S_b| / k                        chance k / E
- at least one shared expert [|S_a ∩ S_b| > 0]        chance 1 − C(E−k, k) / C(E, k)
- Hamming similarity of the E-long k-hot masks,
  1 − |S_a Δ S_b| / E = 1 − 2(k − |S_a ∩ S_b|) / E     chance 1 − 2k(1 − k/E) / E
  (with k fixed it is an affine function of the overlap: rank statistics are identical;
  the normalisation by 2k instead of E, 1 − |Δ|/(2k), *is* the overlap)
- top-p Jaccard |P_a ∩ P_b| / |P_a ∪ P_b| of the smallest sets of experts holding a share p
  of the router probability mass; its chance is size-matched: the expected Jaccard of two
  uniform random sets with the same sizes (a hypergeometric expectation).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pyarrow as pa


# -- closed-form chance levels ----------------------------------------------------------------
def expected_overlap_chance(n_experts: int, top_k: int) -> float:
    """E[|S_a ∩ S_b|] / k for two independent uniform k-subsets of E experts: k / E."""
    return top_k / n_experts


def share_at_least_one_chance(n_experts: int, top_k: int) -> float:
    """P(|S_a ∩ S_b| >= 1) for two independent uniform k-subsets: 1 − C(E−k, k) / C(E, k)."""
    return 1.0 - math.comb(n_experts - top_k, top_k) / math.comb(n_experts, top_k)


def hamming_chance(n_experts: int, top_k: int) -> float:
    """E[1 − |S_a Δ S_b| / E] for two independent uniform k-subsets: 1 − 2k(1 − k/E) / E."""
    return 1.0 - 2.0 * top_k * (1.0 - top_k / n_experts) / n_experts


def load_aware_overlap_chance(usage_a: np.ndarray, usage_b: np.ndarray, top_k: int) -> float:
    """Expected overlap / k of independent tokens given each side's expert loads.

    `usage_*` (E,) are selection frequencies per token (each sums to k): the chance that a
    random token of A and a random token of B share expert e is usage_a[e] * usage_b[e].
    Equals k / E when both loads are uniform, and is higher when both favour the same experts.
    """
    return float(np.dot(usage_a, usage_b) / top_k)


@lru_cache(maxsize=65536)
def _jaccard_chance_ab(a: int, b: int, n_experts: int) -> float:
    from scipy.stats import hypergeom

    x = np.arange(0, min(a, b) + 1)
    pmf = hypergeom.pmf(x, n_experts, a, b)  # shared members when drawing b of E with a marked
    return float(np.sum(pmf * x / np.maximum(a + b - x, 1)))


def jaccard_chance(size_a: np.ndarray, size_b: np.ndarray, n_experts: int) -> np.ndarray:
    """(n,) expected Jaccard of two independent uniform random sets of these sizes among E."""
    pairs = np.stack([np.minimum(size_a, size_b), np.maximum(size_a, size_b)], axis=1).astype(np.int64)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    table = np.array([_jaccard_chance_ab(int(a), int(b), n_experts) for a, b in uniq])
    return table[inverse.reshape(-1)]


# -- arrays from Arrow ------------------------------------------------------------------------
def list_matrix(column: pa.Array | pa.ChunkedArray, dtype: type = np.int16, fill: float = -1) -> np.ndarray:
    """(n, m) numpy array from a list<...> column; shorter lists are padded with `fill`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), dtype=dtype)
    offsets = column.offsets.to_numpy()
    lengths = np.diff(offsets)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    width = int(lengths.max())
    if (lengths == width).all() and offsets[0] == 0:
        return values.reshape(n, width)
    out = np.full((n, width), fill, dtype=dtype)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    out[rows, cols] = values
    return out


# -- set similarity, row-wise -----------------------------------------------------------------
def intersections(experts_a: np.ndarray, experts_b: np.ndarray) -> np.ndarray:
    """(n,) |S_a ∩ S_b| for aligned rows of (n, k) expert arrays (ids within a row are distinct)."""
    eq = experts_a[:, :, None] == experts_b[:, None, :]
    eq &= experts_a[:, :, None] >= 0  # -1 padding never counts
    return eq.sum(axis=(1, 2))


def hamming_similarity(inter: np.ndarray, top_k: int, n_experts: int) -> np.ndarray:
    """1 − |S_a Δ S_b| / E from intersection counts (|S| = k on both sides)."""
    return 1.0 - 2.0 * (top_k - inter) / n_experts


def top_p_members(probs: np.ndarray, p: float) -> np.ndarray:
    """(n, E) bool: the smallest set of experts whose probabilities sum to at least p per row.

    Rows are renormalised to sum to 1 first, so sigmoid routers (whose scores do not sum to
    1) and float16 rounding are handled alike.
    """
    probs = np.asarray(probs, dtype=np.float32)
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    order = np.argsort(-probs, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    size = np.minimum((cum < p - 1e-6).sum(axis=1) + 1, probs.shape[1])
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(probs.shape[1])[None, :].repeat(len(probs), 0), axis=1)
    return rank < size[:, None]


def jaccard(members_a: np.ndarray, members_b: np.ndarray) -> np.ndarray:
    """(n,) Jaccard similarity of aligned rows of (n, E) boolean membership masks."""
    inter = (members_a & members_b).sum(axis=1)
    union = (members_a | members_b).sum(axis=1)
    return inter / np.maximum(union, 1)


# -- usage, co-occurrence, matching -------------------------------------------------------------
def usage(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """(E,) selections per token of each expert (sums to k when no row is padded)."""
    valid = experts[experts >= 0].astype(np.int64)
    return np.bincount(valid, minlength=n_experts)[:n_experts] / max(len(experts), 1)


def usage_entropy(experts: np.ndarray, n_experts: int) -> float:
    """Entropy of the expert-usage distribution over log(E): 1 = balanced, 0 = one expert only."""
    u = usage(experts, n_experts)
    p = u / max(u.sum(), 1e-12)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(n_experts))


def cooccurrence(experts_a: np.ndarray, experts_b: np.ndarray, n_experts: int) -> np.ndarray:
    """(E, E) counts: C[i, j] = aligned tokens that A sent to expert i and B sent to expert j."""
    k_a, k_b = experts_a.shape[1], experts_b.shape[1]
    ia = np.repeat(experts_a.astype(np.int64), k_b, axis=1).reshape(-1)
    ib = np.tile(experts_b.astype(np.int64), (1, k_a)).reshape(-1)
    ok = (ia >= 0) & (ib >= 0) & (ia < n_experts) & (ib < n_experts)
    flat = np.bincount(ia[ok] * n_experts + ib[ok], minlength=n_experts * n_experts)
    return flat.reshape(n_experts, n_experts)


def match_experts(cooc: np.ndarray) -> np.ndarray:
    """(E,) the one-to-one matching maximising co-occurrence: entry i = B's expert matched to A's i.

    Hungarian algorithm (scipy.optimize.linear_sum_assignment), since expert ids are
    arbitrary labels across independently trained models.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cooc, maximize=True)
    perm = np.empty(cooc.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def relabel(experts_b: np.ndarray, matching: np.ndarray) -> np.ndarray:
    """B's expert ids rewritten in A's labels: B's expert matching[i] becomes i."""
    inverse = np.empty_like(matching)
    inverse[matching] = np.arange(len(matching))
    out = experts_b.astype(np.int64).copy()
    ok = (out >= 0) & (out < len(matching))
    out[ok] = inverse[out[ok]]
    return out


# -- pair sampling -----------------------------------------------------------------------------
def random_pairs(n: int, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """m uniform pairs (i, j) of distinct rows among n (with replacement across pairs)."""
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i = rng.integers(0, n, m)
    j = (i + 1 + rng.integers(0, n - 1, m)) % n
    return i, j


def same_value_pairs(values: np.ndarray, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """m pairs of distinct rows sharing a value (e.g. the token id), anchored at a uniform row.

    The anchor is uniform among rows whose value occurs at least twice, the partner uniform
    among the other rows with that value. Returns empty arrays when no value repeats.
    """
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    sizes = np.diff(np.r_[starts, len(values)])
    group_of = np.repeat(np.arange(len(starts)), sizes)
    eligible = np.flatnonzero(sizes[group_of] >= 2)
    if len(eligible) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    anchor = eligible[rng.integers(0, len(eligible), m)]
    g = group_of[anchor]
    offset = anchor - starts[g]
    step = 1 + (rng.random(m) * (sizes[g] - 1)).astype(np.int64)  # 1 .. size-1: never the anchor itself
    partner = starts[g] + (offset + step) % sizes[g]
    return order[anchor], order[partner]


def pair_overlap_collapse(experts: np.ndarray, top_k: int, m: int, rng: np.random.Generator) -> float:
    """Mean overlap of random pairs of tokens: k / E when routing is spread, 1 when it collapses."""
    i, j = random_pairs(len(experts), m, rng)
    if len(i) == 0:
        return float("nan")
    return float(intersections(experts[i], experts[j]).mean() / top_k)
