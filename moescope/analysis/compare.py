"""Routing overlap of two traces of the same text: two models, two checkpoints, or a text with
and without a chat template.

Token alignment (:func:`align_tokens`):
- *token* mode: every shared sequence has the same text and the same prompt token ids in
  both traces (same tokenizer): tokens are joined on (seq_id, pos);
- *char* mode otherwise: prompt tokens are joined on identical character spans
  (char_start, char_end) of the same text. When one trace's text contains the other's (a
  chat template around the user text), spans are shifted into the shorter text and only
  tokens inside it are matched. Zero-width spans (special tokens) and spans that occur more
  than once in a sequence (a character split into several byte tokens) are never matched.
  Texts that differ otherwise are refused, as are traces without character offsets.
- Generated tokens are joined on (seq_id, index among the sequence's generated tokens)
  when both traces share a vocabulary (identical token ids at ≥ 95% of matched prompt
  tokens); otherwise they are left out, with a note.

Per MoE layer, on aligned tokens: overlap |S_A ∩ S_B|/k next to its chance levels (k/E;
1 − C(E−k,k)/C(E,k) for sharing at least one expert; the load-aware chance given each
side's expert usage), and the overlap after relabelling B's experts by the one-to-one
matching that maximises co-occurrence (Hungarian algorithm), since expert ids are
arbitrary across independently trained models. Fitting the matching on the tokens it is
scored on is optimistic, so it is also cross-fitted (fit on one half of the sequences,
score on the other, both ways) and run on shuffled token pairs (the matched overlap that
chance alone reaches given the loads). Within each trace, the mean overlap of random pairs
of the aligned tokens and the entropy of expert usage show routing collapse (a deep layer
sending every token to the same experts), e.g. with vs without a chat template.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from moescope.analysis import routing_sets as rs
from moescope.analysis.result import AnalysisResult
from moescope.errors import MoescopeError

SAME_VOCAB_AGREEMENT = 0.95
PAIRS = 20_000  # random token pairs per layer for the within-trace collapse measure
NULL_BATCH = 20  # token-null shuffles per extra batch of the sequential p


@dataclass
class Alignment:
    """Aligned token pairs of traces A and B (rows aligned across arrays).

    mode: "token" or "char"; generated: (n,) bool (phase of the pair); same_token: (n,)
    whether the two tokens have the same id (None when the vocabularies differ);
    stats: shares matched and notes, for results.json.
    """

    mode: str
    seq_id: np.ndarray
    pos_a: np.ndarray
    pos_b: np.ndarray
    generated: np.ndarray
    same_token: np.ndarray | None
    stats: dict[str, Any] = field(default_factory=dict)
    token_id: np.ndarray | None = None  # A's token id of each pair (the token-identity null's groups)

    def __len__(self) -> int:
        return len(self.seq_id)


def _text_shifts(texts_a: dict[int, str | None], texts_b: dict[int, str | None]) -> tuple[list[int], dict[int, tuple[int, int, int]], str]:
    """Shared seq ids, per sequence (shift_a, shift_b, length of the shared text), and the relation.

    A char offset o in A maps to o − shift_a in the shared text (same for B).
    """
    shared = sorted(set(texts_a) & set(texts_b))
    if not shared:
        raise MoescopeError("the two traces share no sequence ids; capture both from the same data file")
    shifts, relations = {}, set()
    for s in shared:
        a, b = texts_a[s], texts_b[s]
        if a is None or b is None:
            raise MoescopeError(f"sequence {s} has no text in one of the traces; comparing needs the texts")
        if a == b:
            shifts[s], rel = (0, 0, len(a)), "identical"
        elif a and a in b:
            shifts[s], rel = (0, b.find(a), len(a)), "A inside B"
        elif b and b in a:
            shifts[s], rel = (a.find(b), 0, len(b)), "B inside A"
        else:
            raise MoescopeError(f"sequence {s} has different texts in the two traces and neither contains the other; "
                                "capture both from the same data file")
        relations.add(rel)
    return shared, shifts, ", ".join(sorted(relations))


def _join(cols_a: list[np.ndarray], cols_b: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (ia, ib) whose key columns are equal, keys occurring exactly once on each side.

    Rows come back in key order, so ia[i] and ib[i] are a matched pair.
    """
    na = len(cols_a[0])
    rows = np.concatenate([np.stack(cols_a, axis=1), np.stack(cols_b, axis=1)]).astype(np.int64)
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, code = np.unique(rows, axis=0, return_inverse=True)  # one dense code per distinct key
    code = code.reshape(-1)
    key_a, key_b = code[:na], code[na:]
    ua, ca = np.unique(key_a, return_counts=True)
    ub, cb = np.unique(key_b, return_counts=True)
    common = np.intersect1d(ua[ca == 1], ub[cb == 1])
    ia = np.flatnonzero(np.isin(key_a, common))
    ib = np.flatnonzero(np.isin(key_b, common))
    return ia[np.argsort(key_a[ia], kind="stable")], ib[np.argsort(key_b[ib], kind="stable")]


def align_tokens(tokens_a: dict[str, np.ndarray], texts_a: dict[int, str | None],
                 tokens_b: dict[str, np.ndarray], texts_b: dict[int, str | None]) -> Alignment:
    """Align the tokens of two traces of the same texts (see the module docstring for the rules).

    `tokens_*` hold numpy arrays seq_id, pos, token_id, generated, char_start, char_end.
    """
    shared, shifts, relation = _text_shifts(texts_a, texts_b)
    notes: list[str] = []
    in_a = np.isin(tokens_a["seq_id"], shared)
    in_b = np.isin(tokens_b["seq_id"], shared)
    pa_ = in_a & ~tokens_a["generated"]
    pb_ = in_b & ~tokens_b["generated"]
    identical = relation == "identical"
    ia, ib = _join([tokens_a["seq_id"][pa_], tokens_a["pos"][pa_]], [tokens_b["seq_id"][pb_], tokens_b["pos"][pb_]])
    ia, ib = np.flatnonzero(pa_)[ia], np.flatnonzero(pb_)[ib]
    if identical and len(ia) and np.array_equal(tokens_a["token_id"][ia], tokens_b["token_id"][ib]):
        mode = "token"
    else:
        mode = "char"
        ia, ib = _char_join(tokens_a, tokens_b, pa_, pb_, shifts)
        if len(ia) == 0:
            raise MoescopeError("no prompt token of the two traces covers the same characters of the same text; "
                                "nothing to compare")
    agree = float(np.mean(tokens_a["token_id"][ia] == tokens_b["token_id"][ib]))
    same_vocab = mode == "token" or agree >= SAME_VOCAB_AGREEMENT
    ga, gb = _generated_join(tokens_a, tokens_b, in_a, in_b) if same_vocab else (np.zeros(0, int), np.zeros(0, int))
    if not same_vocab and (tokens_a["generated"].any() or tokens_b["generated"].any()):
        notes.append("the tokenizers differ: generated tokens cannot be aligned and are left out")
    ra, rb = np.r_[ia, ga], np.r_[ib, gb]
    stats = {
        "mode": mode, "texts": relation, "n_sequences": len(shared),
        "n_prompt_aligned": int(len(ia)), "n_generated_aligned": int(len(ga)),
        "share_prompt_matched_a": float(len(ia) / max(int(pa_.sum()), 1)),
        "share_prompt_matched_b": float(len(ib) / max(int(pb_.sum()), 1)),
        "prompt_token_id_agreement": agree, "same_vocabulary": same_vocab,
        "generated_same_token_share": (float(np.mean(tokens_a["token_id"][ga] == tokens_b["token_id"][gb]))
                                       if len(ga) else None),
        "notes": notes,
    }
    return Alignment(mode=mode, seq_id=tokens_a["seq_id"][ra], pos_a=tokens_a["pos"][ra], pos_b=tokens_b["pos"][rb],
                     generated=np.r_[np.zeros(len(ia), bool), np.ones(len(ga), bool)],
                     same_token=(tokens_a["token_id"][ra] == tokens_b["token_id"][rb]) if same_vocab else None,
                     stats=stats, token_id=tokens_a["token_id"][ra])


def _char_join(tokens_a: dict[str, np.ndarray], tokens_b: dict[str, np.ndarray], rows_a: np.ndarray,
               rows_b: np.ndarray, shifts: dict[int, tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Prompt tokens of A and B with identical character spans within the shared text."""
    shared = np.array(sorted(shifts), dtype=np.int64)
    table = np.array([shifts[int(s)] for s in shared], dtype=np.int64).reshape(-1, 3)
    keyed = []
    for side, (tok, rows) in enumerate(((tokens_a, rows_a), (tokens_b, rows_b))):
        if rows.any() and (tok["char_start"][rows] < 0).all():
            raise MoescopeError("the traces were tokenized differently and one has no character offsets; "
                                "capture it again with a fast tokenizer so tokens can be matched by characters")
        idx = np.flatnonzero(rows)  # rows only holds shared sequences
        shift = table[np.searchsorted(shared, tok["seq_id"][idx])]
        start = tok["char_start"][idx] - shift[:, side]
        end = tok["char_end"][idx] - shift[:, side]
        ok = (tok["char_start"][idx] >= 0) & (start >= 0) & (end > start) & (end <= shift[:, 2])
        keyed.append((idx[ok], [tok["seq_id"][idx[ok]], start[ok], end[ok]]))
    (idx_a, cols_a), (idx_b, cols_b) = keyed
    ja, jb = _join(cols_a, cols_b)
    return idx_a[ja], idx_b[jb]


def _generated_join(tokens_a: dict[str, np.ndarray], tokens_b: dict[str, np.ndarray], in_a: np.ndarray,
                    in_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Generated tokens of A and B joined on (seq_id, index among the sequence's generated tokens)."""
    keyed = []
    for tok, rows in ((tokens_a, in_a), (tokens_b, in_b)):
        idx = np.flatnonzero(rows & tok["generated"])
        seq, pos = tok["seq_id"][idx], tok["pos"][idx]
        _, first, inverse = np.unique(seq, return_index=True, return_inverse=True)
        start = pos[first][inverse.reshape(-1)] if len(seq) else pos  # rows are sorted by (seq_id, pos)
        keyed.append((idx, [seq, pos - start]))
    (idx_a, cols_a), (idx_b, cols_b) = keyed
    ja, jb = _join(cols_a, cols_b)
    return idx_a[ja], idx_b[jb]


# -- per layer ---------------------------------------------------------------------------------
def _folds(seq_id: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """0/1 per row: half of the sequences each (by token parity when there is one sequence)."""
    seqs = np.unique(seq_id)
    if len(seqs) < 2:
        return np.arange(len(seq_id)) % 2
    half = dict(zip(seqs.tolist(), (rng.permutation(len(seqs)) % 2).tolist()))
    return np.array([half[int(s)] for s in seq_id], dtype=np.int64)


def _crossfit(ea: np.ndarray, eb: np.ndarray, folds: np.ndarray, n_experts: int, top_k: int) -> tuple[float, list]:
    """Overlap after a matching fitted on the other fold, pooled over both folds; and both matchings."""
    inter, matchings = 0.0, []
    for f in (0, 1):
        fit, score = folds == f, folds != f
        matching = rs.match_experts(rs.cooccurrence(ea[fit], eb[fit], n_experts))
        matchings.append(matching)
        inter += float(rs.intersections(ea[score], rs.relabel(eb[score], matching)).sum())
    return inter / (len(ea) * top_k), matchings


def shuffle_within(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the rows that only exchanges rows of the same group (rows of a group
    receive the rows of that group in random order)."""
    groups = np.asarray(groups)
    by_group = np.argsort(groups, kind="stable")
    shuffled = np.lexsort((rng.random(len(groups)), groups))
    perm = np.empty(len(groups), np.int64)
    perm[by_group] = shuffled
    return perm


def _null_crossfit(ea: np.ndarray, eb: np.ndarray, folds: np.ndarray, n_experts: int, top_k: int, shuffles: int,
                   draw: Callable[[], np.ndarray]) -> np.ndarray:
    """Cross-fitted matched overlap with B's rows permuted by `draw()`, `shuffles` times."""
    return np.array([_crossfit(ea, eb[draw()], folds, n_experts, top_k)[0] for _ in range(shuffles)])


def compare_layer(ea: np.ndarray, eb: np.ndarray, seq_id: np.ndarray, n_experts: int, top_k: int,
                  rng: np.random.Generator, token_id: np.ndarray | None = None, *, shuffles: int = 20,
                  token_null_max: int | None = None) -> dict[str, Any]:
    """Overlap of aligned expert sets (n, k) of one layer: raw, matched, cross-fitted, chance levels.

    Chance of the cross-fitted matched overlap: B's expert sets shuffled across all aligned
    tokens (`matched_chance`, mean and SD of `shuffles` shuffles) and, with `token_id` (A's
    token id per pair), shuffled only among occurrences of the same token id
    (`matched_token_null`): what token identity alone gives when both models route each token
    id alike. `matched_token_null_p`: a small p means the two traces agree beyond what the
    token ids explain; Besag & Clifford's sequential permutation p over the `shuffles` token-null
    shuffles and, while fewer than 10 of them reach the real value, further ones up to
    `token_null_max` (default `shuffles`), drawn from their own random stream
    (`token_null_shuffles`: how many were drawn)."""
    from moescope.inference import sequential_permutation_p

    ok = (ea >= 0).any(axis=1) & (eb >= 0).any(axis=1)
    ea, eb, seq_id = ea[ok], eb[ok], seq_id[ok]
    token_id = token_id[ok] if token_id is not None else None
    n = len(ea)
    if n < 2:
        return {"n_tokens": int(n)}
    inter = rs.intersections(ea, eb)
    matching = rs.match_experts(rs.cooccurrence(ea, eb, n_experts))
    folds = _folds(seq_id, rng)
    crossfit, fold_matchings = _crossfit(ea, eb, folds, n_experts, top_k)
    shuffled = _null_crossfit(ea, eb, folds, n_experts, top_k, shuffles, lambda: rng.permutation(n))
    token_null = (_null_crossfit(ea, eb, folds, n_experts, top_k, shuffles, lambda: shuffle_within(token_id, rng))
                  if token_id is not None and shuffles else None)
    more_rng = np.random.default_rng(int(rng.integers(2 ** 63)))  # the extra shuffles' own stream

    def token_null_batches() -> Iterator[np.ndarray]:
        yield token_null
        while True:
            yield _null_crossfit(ea, eb, folds, n_experts, top_k, NULL_BATCH, lambda: shuffle_within(token_id, more_rng))

    token_p, token_draws = (sequential_permutation_p(crossfit, token_null_batches(),
                                                     max_draws=max(token_null_max or shuffles, shuffles))
                            if token_null is not None else (None, 0))
    sd = lambda x: float(np.std(x, ddof=1)) if x is not None and len(x) > 1 else None  # noqa: E731
    return {
        "n_tokens": int(n),
        "overlap": float(inter.mean() / top_k),
        "share_at_least_one": float((inter > 0).mean()),
        "load_chance": rs.load_aware_overlap_chance(rs.usage(ea, n_experts), rs.usage(eb, n_experts), top_k),
        "overlap_matched": float(rs.intersections(ea, rs.relabel(eb, matching)).mean() / top_k),
        "overlap_matched_crossfit": crossfit,
        "matched_chance": float(shuffled.mean()) if shuffles else None,
        "matched_chance_sd": sd(shuffled),
        "matched_token_null": float(token_null.mean()) if token_null is not None else None,
        "matched_token_null_sd": sd(token_null),
        "matched_token_null_p": token_p,
        "token_null_shuffles": int(token_draws),
        "shuffles": int(shuffles),
        "matching": matching.tolist(),
        "matching_fold_agreement": float(np.mean(fold_matchings[0] == fold_matchings[1])),
        "identity_matching": bool(np.array_equal(matching, np.arange(n_experts))),
        # within each trace: how alike random pairs of these tokens route (k/E spread out, 1 collapsed)
        "a_pair_overlap": rs.pair_overlap_collapse(ea, top_k, PAIRS, rng),
        "b_pair_overlap": rs.pair_overlap_collapse(eb, top_k, PAIRS, rng),
        "a_usage_entropy": rs.usage_entropy(ea, n_experts),
        "b_usage_entropy": rs.usage_entropy(eb, n_experts),
    }


def analyze_compare(
    alignment: Alignment,
    layers: Iterable[tuple[int, int, np.ndarray, np.ndarray]],
    *,
    n_experts: int,
    top_k: int,
    seed: int = 0,
    trace: str | None = None,
    params: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    shuffles: int = 20,
    token_null_max: int | None = None,
    n_layers: int | None = None,
) -> AnalysisResult:
    """Compare two traces layer by layer (`shuffles`: shuffles of each chance level;
    `token_null_max`: most token-null shuffles a layer's sequential p may draw, default enough
    for a Holm-adjusted p of 0.05 over `n_layers` layers, at least `shuffles`).

    `layers` yields (layer_a, layer_b, experts_a, experts_b): (n, k) expert arrays of the
    aligned tokens of one MoE layer pair (rows as in `alignment`). Returns an
    AnalysisResult with one value per MoE layer (in the order given) under per_layer_*,
    expert_matching, the chance levels, by_phase (prompt / generated) and deep vs shallow
    layer means.
    """
    from moescope.inference import holm_ready_draws

    rng = np.random.default_rng(seed)
    if token_null_max is None:
        token_null_max = holm_ready_draws(n_layers, 0.05, minimum=shuffles) if n_layers else shuffles
    subsets: dict[str, np.ndarray] = {"all": np.ones(len(alignment), bool), "prompt": ~alignment.generated}
    if alignment.generated.any():
        subsets["generated"] = alignment.generated
        if alignment.same_token is not None:
            subsets["generated_same_token"] = alignment.generated & alignment.same_token
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in subsets}
    pairs = []
    for layer_a, layer_b, ea, eb in layers:
        pairs.append((layer_a, layer_b))
        for name, mask in subsets.items():
            tok = alignment.token_id[mask] if alignment.token_id is not None else None
            results[name].append({"layer": layer_a, **compare_layer(ea[mask], eb[mask], alignment.seq_id[mask],
                                                                    n_experts, top_k, rng, tok, shuffles=shuffles,
                                                                    token_null_max=token_null_max)})
    from moescope.inference import holm

    for rows in results.values():  # Holm across layers, per token subset
        ps = [e.get("matched_token_null_p") for e in rows]
        for e, q in zip(rows, holm([np.nan if p is None else p for p in ps])):
            e["matched_token_null_p_holm"] = None if np.isnan(q) else float(q)
    values: dict[str, Any] = {
        "n_experts": n_experts, "top_k": top_k,
        "layers": [a for a, _ in pairs], "layers_b": [b for _, b in pairs],
        "alignment": alignment.stats,
        "expected_overlap_chance": rs.expected_overlap_chance(n_experts, top_k),
        "share_at_least_one_chance": rs.share_at_least_one_chance(n_experts, top_k),
        **_series(results["all"]),
        "expert_matching": [e.get("matching") for e in results["all"]],
        "by_phase": {name: {**_series(rows), "n_tokens": [e["n_tokens"] for e in rows]}
                     for name, rows in results.items() if name != "all"},
        "deep_vs_shallow": {name: _deep_vs_shallow(rows) for name, rows in results.items()},
        "per_layer": results["all"],
        **(extra or {}),
    }
    from moescope.analysis.geometry_plots import compare_figures

    return AnalysisResult("compare", values, params={"seed": seed, "shuffles": shuffles, "token_null_max": token_null_max,
                                                     **(params or {})},
                          figures=compare_figures(values), trace=trace)


def _series(rows: list[dict[str, Any]]) -> dict[str, list]:
    keys = {"per_layer_overlap": "overlap", "per_layer_overlap_matched": "overlap_matched",
            "per_layer_overlap_matched_crossfit": "overlap_matched_crossfit",
            "per_layer_matched_chance": "matched_chance", "per_layer_matched_chance_sd": "matched_chance_sd",
            "per_layer_overlap_matched_token_null": "matched_token_null",
            "per_layer_overlap_matched_token_null_sd": "matched_token_null_sd",
            "per_layer_overlap_matched_token_null_p": "matched_token_null_p",
            "per_layer_overlap_matched_token_null_p_holm": "matched_token_null_p_holm",
            "per_layer_token_null_shuffles": "token_null_shuffles",
            "per_layer_load_chance": "load_chance",
            "per_layer_share_at_least_one": "share_at_least_one"}
    return {out: [e.get(key) for e in rows] for out, key in keys.items()}


def _deep_vs_shallow(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean overlap over the first and the last third of the MoE layers (deep-layer consistency)."""
    vals = [e.get("overlap") for e in rows]
    third = max(1, len(vals) // 3)
    mean: Callable[[list], float | None] = lambda xs: (float(np.mean([x for x in xs if x is not None]))  # noqa: E731
                                                       if any(x is not None for x in xs) else None)
    return {"shallow_layers": [e["layer"] for e in rows[:third]], "shallow_overlap": mean(vals[:third]),
            "deep_layers": [e["layer"] for e in rows[-third:]], "deep_overlap": mean(vals[-third:])}


def pair_layers(layers_a: list[int], layers_b: list[int]) -> tuple[list[tuple[int, int]], str | None]:
    """Which MoE layer of B to compare with each of A: same index, else same rank; and a note."""
    common = [layer for layer in layers_a if layer in set(layers_b)]
    if len(common) == len(layers_a) == len(layers_b):
        return [(layer, layer) for layer in common], None
    if len(layers_a) == len(layers_b):
        return list(zip(layers_a, layers_b)), "the MoE layer indices differ: layers are paired by their rank"
    if common:
        return [(layer, layer) for layer in common], f"only the {len(common)} MoE layers both models have are compared"
    raise MoescopeError("the two models have no MoE layer in common and different numbers of MoE layers; "
                        "compare models of the same depth")


def check_comparable(model_a: dict[str, Any], model_b: dict[str, Any]) -> None:
    """MoescopeError unless both traces route among the same number of experts with the same k."""
    ea, eb = int(model_a["n_experts"]), int(model_b["n_experts"])
    ka, kb = int(model_a["top_k"]), int(model_b["top_k"])
    if (ea, ka) != (eb, kb):
        raise MoescopeError(f"the traces route differently (A: top-{ka} of {ea} experts, B: top-{kb} of {eb}); "
                            "routing overlap needs the same E and k")
