"""Routing agreement of two traces of the same model over the same tokens.

Typical pairs: a serving engine's import vs its transformers replay, bfloat16 vs float32,
two engine versions. Sequences are aligned by their token ids (identical token sequences
are paired, whatever their seq_id); tokens in sequences without a twin are counted as
unaligned and reported. Then, per MoE layer, on every token routed in both traces:

- exact top-k set agreement (same k experts, any order), top-1 agreement (same first
  expert: weight order in captures, the engine's order in imports), mean overlap / k;
- the same by phase (prompt / generated) and by position bucket;
- where router logits were recorded (in A, else B): agreement as a function of the router's
  margin between its k-th and (k+1)-th logit -- precision or kernel differences can only
  flip near-ties, so mismatches should sit at small margins;
- the tokens with the most disagreeing layers.

Everything but the worst-token list is a count array (:class:`AgreementCounts`) summed over
any partition of the aligned rows, so shards can be counted separately (e.g. on Ray) and
merged with :meth:`AgreementCounts.merge`.

Baselines: two independent uniform top-k draws among E experts agree on the whole set with
probability 1 / C(E, k) and overlap k / E on average (``chance_*`` values); the reference for
"the same computation" is agreement 1.0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa

from moescope.errors import MoescopeError

POSITION_EDGES = (0, 1, 4, 16, 64, 256, 1024)  # bucket b holds positions [edges[b], edges[b+1])
MARGIN_EDGES = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # logit units, last bucket open
PHASES = ("prompt", "generated")
N_WORST = 20


@dataclass
class Alignment:
    """Which sequence of B is the twin of which sequence of A, and over how many tokens.

    A pair of identical token sequences is compared whole; a pair that shares only a prefix
    (two runs whose generations diverged) is compared over that prefix: later tokens saw
    different contexts and count as unaligned.
    """

    pairs: list[tuple[int, int]]  # (seq_id in A, seq_id in B)
    lengths: list[int]  # tokens compared per pair (from each sequence's first position)
    first_pos_a: list[int]
    first_pos_b: list[int]
    n_tokens_aligned: int
    n_tokens_unaligned_a: int
    n_tokens_unaligned_b: int
    n_sequences_unaligned_a: int
    n_sequences_unaligned_b: int
    n_pairs_prefix_only: int = 0


PREFIX_HEAD = 4  # a prefix-only pair shares at least its first PREFIX_HEAD tokens


def _token_sequences(tokens: pa.Table) -> dict[int, tuple[int, np.ndarray]]:
    """seq_id -> (first position, token ids in position order)."""
    pos_all = tokens.column("pos").to_numpy()
    order = np.lexsort((pos_all, tokens.column("seq_id").to_numpy()))
    seq = tokens.column("seq_id").to_numpy()[order]
    pos = pos_all[order]
    ids = tokens.column("token_id").to_numpy()[order].astype(np.uint32)
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]]) if len(seq) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(seq)]
    return {int(seq[a]): (int(pos[a]), ids[a:b]) for a, b in zip(starts, ends)}


def _common_prefix(x: np.ndarray, y: np.ndarray) -> int:
    n = min(len(x), len(y))
    diff = np.flatnonzero(x[:n] != y[:n])
    return int(diff[0]) if len(diff) else n


def align_sequences(tokens_a: pa.Table, tokens_b: pa.Table) -> Alignment:
    """Pair sequences of A and B by their token ids: identical sequences first (duplicates in
    seq_id order), then, among the rest, the B sequence sharing the longest common prefix
    (at least PREFIX_HEAD tokens) with each A sequence."""
    seqs_a, seqs_b = _token_sequences(tokens_a), _token_sequences(tokens_b)
    waiting: dict[bytes, list[int]] = {}
    for sid in sorted(seqs_b):
        waiting.setdefault(seqs_b[sid][1].tobytes(), []).append(sid)
    matched: dict[int, tuple[int, int]] = {}  # a -> (b, length)
    used_b: set[int] = set()
    for sid in sorted(seqs_a):
        twins = waiting.get(seqs_a[sid][1].tobytes())
        if twins:
            b = twins.pop(0)
            matched[sid] = (b, len(seqs_a[sid][1]))
            used_b.add(b)
    heads: dict[bytes, list[int]] = {}
    for sid in sorted(seqs_b):
        ids = seqs_b[sid][1]
        if sid not in used_b and len(ids) >= PREFIX_HEAD:
            heads.setdefault(ids[:PREFIX_HEAD].tobytes(), []).append(sid)
    n_prefix = 0
    for sid in sorted(seqs_a):
        ids = seqs_a[sid][1]
        if sid in matched or len(ids) < PREFIX_HEAD:
            continue
        cands = [b for b in heads.get(ids[:PREFIX_HEAD].tobytes(), []) if b not in used_b]
        if cands:
            best = max(cands, key=lambda b: (_common_prefix(ids, seqs_b[b][1]), -b))
            matched[sid] = (best, _common_prefix(ids, seqs_b[best][1]))
            used_b.add(best)
            n_prefix += 1
    pairs = sorted(matched.items())
    aligned = sum(n for _, (_, n) in pairs)
    return Alignment(pairs=[(a, b) for a, (b, _) in pairs], lengths=[n for _, (_, n) in pairs],
                     first_pos_a=[seqs_a[a][0] for a, _ in pairs], first_pos_b=[seqs_b[b][0] for _, (b, _) in pairs],
                     n_tokens_aligned=aligned,
                     n_tokens_unaligned_a=sum(len(v[1]) for v in seqs_a.values()) - aligned,
                     n_tokens_unaligned_b=sum(len(v[1]) for v in seqs_b.values()) - aligned,
                     n_sequences_unaligned_a=len(seqs_a) - len(pairs), n_sequences_unaligned_b=len(seqs_b) - len(pairs),
                     n_pairs_prefix_only=n_prefix)


@dataclass
class AgreementCounts:
    """Count arrays of the comparison (L = MoE layers). Sum two with :meth:`merge`."""

    n: np.ndarray  # (L,) token-layer rows routed in both traces
    set_equal: np.ndarray  # (L,) rows with the same top-k set
    top1_equal: np.ndarray  # (L,)
    overlap: np.ndarray  # (L,) sum over rows of |A ∩ B|
    only_a: np.ndarray  # (L,) rows routed in A only (e.g. the last generated token, prefix-cache hits)
    only_b: np.ndarray  # (L,)
    phase_n: np.ndarray  # (2, L) prompt / generated
    phase_set_equal: np.ndarray  # (2, L)
    position_n: np.ndarray  # (P, L) position buckets
    position_set_equal: np.ndarray  # (P, L)
    margin_n: np.ndarray  # (M, L) margin buckets (zeros when no logits)
    margin_set_equal: np.ndarray  # (M, L)
    pair_n: np.ndarray  # (G, L) per aligned sequence pair: the clusters of the bootstrap CIs
    pair_set_equal: np.ndarray  # (G, L)
    worst: list[dict[str, Any]] = field(default_factory=list)  # tokens with most disagreeing layers

    @classmethod
    def zeros(cls, n_layers: int, n_pairs: int = 0) -> "AgreementCounts":
        z = lambda *shape: np.zeros(shape, np.int64)  # noqa: E731
        p, m = len(POSITION_EDGES), len(MARGIN_EDGES)
        return cls(z(n_layers), z(n_layers), z(n_layers), z(n_layers), z(n_layers), z(n_layers),
                   z(2, n_layers), z(2, n_layers), z(p, n_layers), z(p, n_layers), z(m, n_layers), z(m, n_layers),
                   z(n_pairs, n_layers), z(n_pairs, n_layers))

    def merge(self, other: "AgreementCounts") -> "AgreementCounts":
        """The counts of both parts (arrays summed; worst tokens re-ranked)."""
        arrays = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "worst"}
        return AgreementCounts(**arrays, worst=_top_worst(self.worst + other.worst))


def _top_worst(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-r["n_layers_disagree"], r["token_key"]))[:N_WORST]


def fixed_width(experts: pa.Array, k: int) -> np.ndarray:
    """list<int> experts -> (N, k) int64, short rows padded with -1."""
    experts = experts.combine_chunks() if isinstance(experts, pa.ChunkedArray) else experts
    lengths = experts.value_lengths().to_numpy(zero_copy_only=False)
    values = experts.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if (lengths == k).all():
        return values.reshape(-1, k)
    out = np.full((len(lengths), k), -1, np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    col = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = col < k
    out[row[keep], col[keep]] = values[keep]
    return out


def router_margins(logits: pa.Array, k: int) -> np.ndarray:
    """(N,) k-th minus (k+1)-th largest router logit per row (float32; NaN when E <= k)."""
    logits = logits.combine_chunks() if isinstance(logits, pa.ChunkedArray) else logits
    lengths = logits.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) == 0 or lengths.min() != lengths.max() or lengths[0] <= k:
        return np.full(len(lengths), np.nan, np.float32)
    vals = logits.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(lengths), -1)
    part = -np.partition(-vals, (k - 1, k), axis=1)
    return part[:, k - 1] - part[:, k]


def count_agreement(keys_a: np.ndarray, experts_a: np.ndarray, keys_b: np.ndarray, experts_b: np.ndarray, *,
                    layer_index_a: np.ndarray, layer_index_b: np.ndarray, n_layers: int, pos_a: np.ndarray,
                    phase_a: np.ndarray, margin_a: np.ndarray | None = None, margin_b: np.ndarray | None = None,
                    token_of: Any = None, miss_sink: Any = None, n_pairs: int = 0) -> AgreementCounts:
    """Counts over one part of the aligned rows.

    keys_*: (N,) int64 keys of (aligned pair, position, layer) -- equal keys are the same
    token at the same layer; experts_*: (N, k); layer_index_*: (N,) index into the MoE
    layers; pos_a / phase_a (0 prompt, 1 generated) / margin_a: per row of A, margin_b per
    row of B (used when margin_a is None; NaN or None: not recorded). miss_sink(token keys,
    mismatched) receives every compared row, for callers that count layers one call at a time
    and rank tokens across layers themselves. n_pairs: the number of aligned sequence pairs
    (key >> 32 is the pair), for per-pair counts (the clusters of the bootstrap CIs).
    token_of(token key) -> dict describing a token, for the worst list.
    """
    c = AgreementCounts.zeros(n_layers, n_pairs)
    common, ia, ib = np.intersect1d(keys_a, keys_b, return_indices=True)  # a trace's keys are unique when valid
    c.only_a += np.bincount(np.delete(layer_index_a, ia), minlength=n_layers)
    c.only_b += np.bincount(np.delete(layer_index_b, ib), minlength=n_layers)
    if len(common) == 0:
        return c
    ea, eb, layer = experts_a[ia], experts_b[ib], layer_index_a[ia]
    valid_a = ea >= 0
    overlap = ((ea[:, :, None] == eb[:, None, :]) & valid_a[:, :, None]).any(axis=2).sum(axis=1)
    k = ea.shape[1]
    same = overlap == k
    top1 = ea[:, 0] == eb[:, 0]
    add = lambda target, mask=None, idx=layer: np.add.at(target, idx if mask is None else idx[mask], 1)  # noqa: E731
    add(c.n)
    add(c.set_equal, same)
    add(c.top1_equal, top1)
    np.add.at(c.overlap, layer, overlap)
    if n_pairs:
        pair = common >> 32
        np.add.at(c.pair_n, (pair, layer), 1)
        np.add.at(c.pair_set_equal, (pair[same], layer[same]), 1)
    ph = phase_a[ia]
    for p in (0, 1):
        add(c.phase_n[p], ph == p)
        add(c.phase_set_equal[p], (ph == p) & same)
    bucket = np.searchsorted(np.asarray(POSITION_EDGES), pos_a[ia], side="right") - 1
    np.add.at(c.position_n, (bucket, layer), 1)
    np.add.at(c.position_set_equal, (bucket[same], layer[same]), 1)
    if margin_a is not None or margin_b is not None:
        m = margin_a[ia] if margin_a is not None else margin_b[ib]
        ok = np.isfinite(m)
        mb = np.clip(np.searchsorted(np.asarray(MARGIN_EDGES), m[ok], side="right") - 1, 0, len(MARGIN_EDGES) - 1)
        np.add.at(c.margin_n, (mb, layer[ok]), 1)
        np.add.at(c.margin_set_equal, (mb[same[ok]], layer[ok][same[ok]]), 1)
    token_key = common >> 12  # (pair, position): drop the layer bits
    if miss_sink is not None:
        miss_sink(token_key, ~same)
    order = np.argsort(token_key, kind="stable")
    tk, miss = token_key[order], (~same)[order]
    starts = np.flatnonzero(np.r_[True, tk[1:] != tk[:-1]])
    per_token = np.add.reduceat(miss.astype(np.int64), starts)
    top = np.argsort(-per_token, kind="stable")[:N_WORST]
    c.worst = [{"token_key": int(tk[starts[t]]), **(token_of(int(tk[starts[t]])) if token_of else {}),
                "n_layers_disagree": int(per_token[t])} for t in top if per_token[t] > 0]
    c.worst = _top_worst(c.worst)
    return c


def chance_levels(n_experts: int, k: int) -> dict[str, float]:
    """Agreement of two independent uniform top-k draws among E experts (the floor)."""
    return {"chance_set_agreement": 1.0 / math.comb(n_experts, k), "chance_mean_overlap": k / n_experts,
            "chance_top1_agreement": 1.0 / n_experts}


def _rate(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    return [None if not np.isfinite(x) else float(x) for x in np.atleast_1d(r)]


def summarise(counts: AgreementCounts, *, layers: list[int], k: int, n_experts: int,
              alignment: Alignment, margin_source: str | None) -> dict[str, Any]:
    """results.json values from merged counts."""
    n = counts.n
    pooled = lambda a, b: _rate(np.asarray([a.sum()]), np.asarray([b.sum()]))[0]  # noqa: E731
    values: dict[str, Any] = {
        "moe_layers": layers, "top_k": k, "n_experts": n_experts,
        "n_tokens_compared": alignment.n_tokens_aligned,
        "n_tokens_unaligned": alignment.n_tokens_unaligned_a + alignment.n_tokens_unaligned_b,
        "alignment": {"n_sequence_pairs": len(alignment.pairs), "n_pairs_prefix_only": alignment.n_pairs_prefix_only,
                      "n_tokens_unaligned_a": alignment.n_tokens_unaligned_a,
                      "n_tokens_unaligned_b": alignment.n_tokens_unaligned_b,
                      "n_sequences_unaligned_a": alignment.n_sequences_unaligned_a,
                      "n_sequences_unaligned_b": alignment.n_sequences_unaligned_b},
        "per_layer_n": n.tolist(),
        "per_layer_set_agreement": _rate(counts.set_equal, n),
        "per_layer_top1_agreement": _rate(counts.top1_equal, n),
        "per_layer_mean_overlap": _rate(counts.overlap, n * k),
        "per_layer_rows_only_a": counts.only_a.tolist(), "per_layer_rows_only_b": counts.only_b.tolist(),
        "set_agreement": pooled(counts.set_equal, n), "top1_agreement": pooled(counts.top1_equal, n),
        "mean_overlap": pooled(counts.overlap, n * k),
        "share_rows_flipped": None if n.sum() == 0 else float(1 - counts.set_equal.sum() / n.sum()),
        **_intervals(counts),
        **chance_levels(n_experts, k),
        "by_phase": {ph: {"per_layer_n": counts.phase_n[i].tolist(),
                          "per_layer_set_agreement": _rate(counts.phase_set_equal[i], counts.phase_n[i]),
                          "set_agreement": pooled(counts.phase_set_equal[i], counts.phase_n[i])}
                     for i, ph in enumerate(PHASES)},
        "by_position": {"edges": list(POSITION_EDGES), "n": counts.position_n.sum(axis=1).tolist(),
                        "set_agreement": _rate(counts.position_set_equal.sum(axis=1), counts.position_n.sum(axis=1)),
                        "per_layer_set_agreement": [_rate(counts.position_set_equal[b], counts.position_n[b])
                                                    for b in range(len(POSITION_EDGES))]},
        "worst_tokens": counts.worst,
    }
    if margin_source is not None and counts.margin_n.sum():
        mn, me = counts.margin_n.sum(axis=1), counts.margin_set_equal.sum(axis=1)
        mismatches = mn - me
        total_mis = mismatches.sum()
        values["margin"] = {
            "source": margin_source, "unit": "router logit (k-th minus (k+1)-th)", "edges": list(MARGIN_EDGES),
            "n": mn.tolist(), "set_agreement": _rate(me, mn), "mismatches": mismatches.tolist(),
            # cumulative through bucket i, i.e. the share below edges[i + 1]
            "cumulative_share_of_rows": (np.cumsum(mn) / max(mn.sum(), 1)).tolist(),
            "cumulative_share_of_mismatches": (np.cumsum(mismatches) / total_mis).tolist() if total_mis else None,
            "per_layer_n": counts.margin_n.T.tolist(),
            "per_layer_set_agreement": [_rate(counts.margin_set_equal[:, i], counts.margin_n[:, i])
                                        for i in range(len(layers))],
        }
    return values


def _intervals(counts: AgreementCounts, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """95% CIs of set agreement resampling whole aligned sequences (tokens of one sequence are
    not independent); empty when per-pair counts were not kept."""
    from moescope.inference import cluster_bootstrap_ratio_ci

    if counts.pair_n.shape[0] < 2:
        return {}
    per_layer = cluster_bootstrap_ratio_ci(counts.pair_set_equal, counts.pair_n, n_boot=n_boot, seed=seed)
    pooled = cluster_bootstrap_ratio_ci(counts.pair_set_equal.sum(axis=1), counts.pair_n.sum(axis=1),
                                        n_boot=n_boot, seed=seed)
    clean = lambda xs: [None if not np.isfinite(x) else x for x in xs]  # noqa: E731
    return {"per_layer_set_agreement_ci": [list(p) for p in zip(clean(per_layer["ci_low"]), clean(per_layer["ci_high"]))],
            "set_agreement_ci": [pooled["ci_low"], pooled["ci_high"]],
            "ci_method": f"percentile cluster bootstrap over aligned sequences ({n_boot} resamples, 95%)"}


def check_comparable(manifest_a: dict[str, Any], manifest_b: dict[str, Any]) -> None:
    """MoescopeError unless both traces hold logical expert ids of the same E and k."""
    for name, m in (("A", manifest_a), ("B", manifest_b)):
        if m.get("capture", {}).get("expert_ids") == "physical":
            raise MoescopeError(f"trace {name} holds physical expert slots (a dump without its physical-to-logical map); "
                                "agreement compares logical expert ids: re-dump with the map")
    ma, mb = manifest_a["model"], manifest_b["model"]
    if ma.get("n_experts") != mb.get("n_experts") or ma.get("top_k") != mb.get("top_k"):
        raise MoescopeError(f"the traces route differently (A: E={ma.get('n_experts')}, k={ma.get('top_k')}; "
                            f"B: E={mb.get('n_experts')}, k={mb.get('top_k')}); agreement needs the same model")
    if not set(ma["moe_layers"]) & set(mb["moe_layers"]):
        raise MoescopeError("the traces share no MoE layer; agreement needs two traces of the same model")
