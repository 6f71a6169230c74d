"""Per-sequence expert visit frequencies, within vs across sequences (part 4 of the geometry analysis).

Per sequence and MoE layer, the visit vector counts how often each expert was selected over
the sequence's tokens. A sequence's even and odd positions give two vectors: their cosine
(within) is compared with the cosine between different sequences (across) and with
multinomial chance; with generated tokens, a sequence's prompt vector is compared with its
own rollout's and with other sequences' rollouts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from moescope.analysis.geometry import GeometryParams


def _unit(h: np.ndarray) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)


@dataclass
class LayerVisits:
    """Expert selection counts of one MoE layer per (sequence, phase, position parity).

    counts: (m, E) selections; n_tokens: (m,) tokens behind each row; half: pos % 2.
    """

    layer: int
    seq_id: np.ndarray
    generated: np.ndarray
    half: np.ndarray
    counts: np.ndarray
    n_tokens: np.ndarray


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _unit(a) @ _unit(b).T


def _within_across(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean cosine of matching rows of a and b (within) and of non-matching rows (across)."""
    c = _cos_rows(a, b)
    s = len(c)
    within = float(np.trace(c) / s)
    across = float((c.sum() - np.trace(c)) / (s * (s - 1))) if s > 1 else float("nan")
    return within, across


def _multinomial_within(sizes_a: np.ndarray, sizes_b: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> float:
    """Within-row cosine when both sides' selections are drawn independently from loads p."""
    a = rng.multinomial(sizes_a, p)
    b = rng.multinomial(sizes_b, p)
    return float(np.mean(np.einsum("ij,ij->i", _unit(a), _unit(b))))


def visit_measures(vis: LayerVisits, n_experts: int, params: "GeometryParams", rng: np.random.Generator,
                   generated: bool | None = None) -> dict[str, Any]:
    """Visit-frequency cosine within vs across sequences (halves = even / odd positions).

    Chance: both halves' selections drawn as multinomials with the same number of
    selections, from uniform loads and from the layer's pooled loads (within-token sampling
    without replacement is ignored; its effect is of order k/E).
    """
    rows = np.ones(len(vis.seq_id), bool) if generated is None else vis.generated == generated
    seq, half, counts = vis.seq_id[rows], vis.half[rows], vis.counts[rows]
    ntok = vis.n_tokens[rows]
    seqs, inv = np.unique(seq, return_inverse=True)
    halves = np.zeros((2, len(seqs), n_experts))
    tokens = np.zeros((2, len(seqs)))
    np.add.at(halves, (half, inv), counts)
    np.add.at(tokens, (half, inv), ntok)
    keep = np.flatnonzero((tokens >= params.min_visit_tokens).all(axis=0))
    if len(keep) > params.max_sequences:
        keep = np.sort(rng.choice(keep, params.max_sequences, replace=False))
    if len(keep) < 2:
        return {"n_sequences": int(len(keep))}
    a, b = halves[0, keep], halves[1, keep]
    within, across = _within_across(a, b)
    load = counts.sum(axis=0) / max(counts.sum(), 1)
    sa, sb = a.sum(axis=1).astype(np.int64), b.sum(axis=1).astype(np.int64)
    return {"n_sequences": int(len(keep)), "within": within, "across": across,
            "uniform_chance": _multinomial_within(sa, sb, np.full(n_experts, 1 / n_experts), rng),
            "load_chance": _multinomial_within(sa, sb, load, rng)}


def prompt_vs_rollout(vis: LayerVisits, n_experts: int, rng: np.random.Generator) -> dict[str, Any]:
    """Cosine of each sequence's prompt and generated visit vectors, vs other sequences' and chance."""
    seqs, inv = np.unique(vis.seq_id, return_inverse=True)
    both = np.zeros((2, len(seqs), n_experts))
    np.add.at(both, (vis.generated.astype(np.int64), inv), vis.counts)
    keep = np.flatnonzero((both.sum(axis=2) > 0).all(axis=0))
    if len(keep) < 2:
        return {"n_sequences": int(len(keep))}
    p, g = both[0, keep], both[1, keep]
    within, across = _within_across(p, g)
    sp, sg = p.sum(axis=1).astype(np.int64), g.sum(axis=1).astype(np.int64)
    uniform = np.full(n_experts, 1 / n_experts)
    return {"n_sequences": int(len(keep)), "same_sequence": within, "other_sequences": across,
            "uniform_chance": float(np.mean(np.einsum("ij,ij->i", _unit(rng.multinomial(sp, uniform)),
                                                       _unit(rng.multinomial(sg, uniform)))))}
