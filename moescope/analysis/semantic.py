"""Semantic routing (Olson et al. 2025): do routers send a word to the same experts when it
means the same thing? A pure function of trace tables; no model, no file I/O.

Overlap of two contexts' target tokens at one MoE layer, chance-corrected like Cohen's kappa
(STUDIES.md §1, ours):  o = |S_a ∩ S_b| / k,  e = k / E,  kappa = (o − e) / (1 − e).
kappa is 0 for two independent uniform top-k draws, 1 for identical sets, and its floor is
−e/(1−e) (disjoint sets).

Several subwords (``subword="mean"``): each context is summarised by the mean one-hot expert
indicator m (length E, sums to k) over its target tokens, and o = <m_a, m_b> / k: the
average of |S_ai ∩ S_bj| / k over every pair of subwords (i of a, j of b). So the mean mode
averages the per-subword-pair kappas and keeps chance at exactly 0; for one token it is the
formula above.

Tests (per layer), from the shared inference module: sense pairs are **paired by lemma** (per
lemma, mean same-sense minus mean different-sense kappa; lemmas lacking either label are left
out): Wilcoxon signed-rank on the per-lemma gaps (two-sided), CIs by a bootstrap resampling
lemmas, Holm across layers; the unpaired Mann–Whitney test over pairs is kept as
``unpaired_*`` for comparison (a lemma-level confound fools it). Substitution items are paired
per item (mean over its substitutes vs mean over its controls): Wilcoxon signed-rank, Holm,
bootstrap over items. Effect sizes: matched-pairs rank-biserial (+ Cohen's d_z). Baselines:
chance (kappa 0) and "unrelated" pairs (a context of one pair against one of another pair
with a different lemma: the overlap that load imbalance alone produces). Token-identity
control: pairs split by whether the two targets' token ids are identical, the paired gap
reported within each subset, because identical tokens route alike whatever they mean. The
random-init control is :mod:`moescope.analysis.semantic_control`. Substitution compares
sentences that share everything before the target, so a replacement whose first target
token is the original's gets identical routing there by construction (in a causal model):
such replacements are left out and counted (n_replacements_sharing_first_token).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import stats

from moescope.analysis.result import AnalysisResult
from moescope.inference import cluster_bootstrap_ci, holm, wilcoxon_signed_rank

__all__ = ["SemanticParams", "analyze_semantic", "target_profiles", "pair_kappa", "semantic_figures"]


TESTS = {
    "kappa": "(o - e) / (1 - e), o = |S_a ∩ S_b| / k, e = k / E (0 = chance)",
    "sense_pairs": "paired by lemma: Wilcoxon signed-rank on per-lemma mean same - different kappa, two-sided; "
                   "effect size matched rank-biserial (Cohen's d_z also given); the unpaired Mann-Whitney U over "
                   "pairs kept as unpaired_* for comparison only",
    "substitution": "Wilcoxon signed-rank on per-item differences, two-sided; effect size matched rank-biserial",
    "confidence_intervals": "percentile cluster bootstrap resampling lemmas (sense pairs), items (substitution) or "
                            "unrelated pairs (moescope.inference.cluster_bootstrap_ci)",
    "multiple_layers": "p_value as computed; p_value_holm adjusted across layers (Holm)",
}


@dataclass(frozen=True)
class SemanticParams:
    """Options of the analysis: subword mode (recorded only), bootstrap size, CI level, seed."""

    subword: str = "first"
    n_boot: int = 2000
    confidence: float = 0.95
    seed: int = 0


def _lookup(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index of each query value in `keys` (unique values, any order), -1 where absent."""
    if len(keys) == 0:
        return np.full(len(query), -1, np.int64)
    order = np.argsort(keys, kind="stable")
    i = np.minimum(np.searchsorted(keys[order], query), len(keys) - 1)
    return np.where(keys[order][i] == query, order[i], -1)


def target_profiles(
    targets: pa.Table, routes: pa.Table, seq_ids: np.ndarray, layers: list[int], n_experts: int
) -> tuple[np.ndarray, np.ndarray]:
    """Expert profiles of the contexts' target tokens.

    Args:
        targets: (seq_id, pos, weight) rows from ``align_targets``.
        routes: (seq_id, pos, layer, experts) rows covering (at least) those tokens.
        seq_ids: the contexts, one seq_id each, in the order wanted.

    Returns:
        (profiles, complete): profiles is float32 (C, L, E), the weighted one-hot expert
        indicator of each context's target tokens (each row sums to k); complete is bool
        (C,), True where the context has target tokens and each has a route at every layer.
    """
    C, L = len(seq_ids), len(layers)
    col = lambda t, name: t.column(name).to_numpy().astype(np.int64)  # noqa: E731
    t_seq, t_w = col(targets, "seq_id"), targets.column("weight").to_numpy().astype(np.float32)
    r_seq = col(routes, "seq_id")
    t_row = _lookup(t_seq * (1 << 32) + col(targets, "pos"), r_seq * (1 << 32) + col(routes, "pos"))
    l_row = _lookup(np.asarray(layers, np.int64), col(routes, "layer"))
    c_row = _lookup(np.asarray(seq_ids, np.int64), r_seq)
    hit = (t_row >= 0) & (l_row >= 0) & (c_row >= 0)
    experts = routes.column("experts").combine_chunks()
    lengths = experts.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    flat = experts.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    entry = np.repeat(hit, lengths)  # one flag per (row, chosen expert)
    row = np.repeat(np.arange(len(lengths)), lengths)[entry]
    profiles = np.zeros((C, L, n_experts), np.float32)
    np.add.at(profiles, (c_row[row], l_row[row], flat[entry]), t_w[t_row[row]])
    # complete: every target token of the context was routed at each of the L layers
    t_ctx = _lookup(np.asarray(seq_ids, np.int64), t_seq)
    token_ok = np.bincount(t_row[hit], minlength=len(t_seq)) == L
    bad = np.bincount(t_ctx[(t_ctx >= 0) & ~token_ok], minlength=C) > 0
    has = np.bincount(t_ctx[t_ctx >= 0], minlength=C) > 0
    return profiles, has & ~bad


def pair_kappa(pa_: np.ndarray, pb: np.ndarray, top_k: int, n_experts: int) -> np.ndarray:
    """Chance-corrected overlap (P, L) of profile pairs pa_[i], pb[i] (each (P, L, E))."""
    e = top_k / n_experts
    o = np.einsum("ple,ple->pl", pa_, pb, dtype=np.float64) / top_k
    return (o - e) / (1 - e)


# -- statistics -------------------------------------------------------------------------------
def _nan(L: int) -> np.ndarray:
    return np.full(L, np.nan)


def _bootstrap_rows(x: np.ndarray, seed: int, n_boot: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-column percentile CI (lo (L,), hi (L,)) of the mean of the rows of x (n, L), each row a
    resampling unit (:func:`moescope.inference.cluster_bootstrap_ci`, the same resamples for every column)."""
    ci = [cluster_bootstrap_ci(x[:, j], None, n_boot=n_boot, seed=seed, level=confidence) for j in range(x.shape[1])]
    return np.array([c["ci_low"] for c in ci]), np.array([c["ci_high"] for c in ci])


def compare_groups(x: np.ndarray, y: np.ndarray) -> dict:
    """Two independent groups of per-pair kappas, x (n1, L) vs y (n2, L): means, difference, Mann-Whitney
    p (Holm across layers) and effect sizes. The naive comparison over pairs, kept only to show what the
    paired-by-lemma test protects against, so it carries no confidence intervals."""
    L = x.shape[1]
    out = {"x": x.mean(0) if len(x) else _nan(L), "y": y.mean(0) if len(y) else _nan(L), "n_x": len(x), "n_y": len(y)}
    if len(x) < 2 or len(y) < 2:
        return {**out, **{k: _nan(L) for k in ("diff", "p", "p_holm", "effect", "d")}}
    out["diff"] = out["x"] - out["y"]
    u, p = stats.mannwhitneyu(x, y, axis=0, alternative="two-sided", method="asymptotic")
    out["p"], out["p_holm"] = p, holm(p)
    out["effect"] = 2 * u / (len(x) * len(y)) - 1  # rank-biserial: P(x > y) - P(x < y)
    pooled = np.sqrt(((len(x) - 1) * x.var(0, ddof=1) + (len(y) - 1) * y.var(0, ddof=1)) / (len(x) + len(y) - 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        out["d"] = np.where(pooled > 0, out["diff"] / pooled, np.where(out["diff"] == 0, 0.0, np.nan))
    return out


def compare_paired(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, n_boot: int, confidence: float) -> dict:
    """Paired units (lemmas or items), x vs y (n, L): means, CIs resampling the units (a cluster
    bootstrap: a unit's value is the mean over its pairs), Wilcoxon signed-rank per layer, Holm."""
    n, L = x.shape
    out = {"x": x.mean(0) if n else _nan(L), "y": y.mean(0) if n else _nan(L), "n": n}
    if n < 2:
        return {**out, **{k: _nan(L) for k in ("x_lo", "x_hi", "y_lo", "y_hi", "diff", "diff_lo", "diff_hi",
                                                  "p", "p_holm", "effect", "d")}}
    d = x - y
    seed = int(rng.integers(2**31))  # one resampling of units for x, y and their difference
    for v, stem in ((x, "x"), (y, "y"), (d, "diff")):
        out[f"{stem}_lo"], out[f"{stem}_hi"] = _bootstrap_rows(v, seed, n_boot, confidence)
    out["diff"] = d.mean(0)
    tests = [wilcoxon_signed_rank(d[:, layer]) for layer in range(L)]
    out["p"] = np.array([t["p_value"] for t in tests])
    out["effect"] = np.array([t["rank_biserial"] for t in tests])
    out["p_holm"] = holm(out["p"])
    sd = d.std(0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["d"] = np.where(sd > 0, out["diff"] / sd, np.where(out["diff"] == 0, 0.0, np.nan))
    return out


# -- the analysis -------------------------------------------------------------------------------
def _column(table: pa.Table, name: str, default: str = "") -> list:
    if name not in table.column_names:
        return [default] * table.num_rows
    return [default if v is None else v for v in table.column(name).to_pylist()]


def _token_keys(targets: pa.Table) -> dict[int, tuple[int, ...]]:
    keys: dict[int, list[int]] = defaultdict(list)
    for s, t in zip(targets.column("seq_id").to_pylist(), targets.column("token_id").to_pylist()):
        keys[s].append(t)  # targets are sorted by (seq_id, pos)
    return {s: tuple(v) for s, v in keys.items()}


def _lemma_key(lemma: str, pos: str) -> str:
    return f"{lemma}.{pos}" if pos else lemma


def lemma_means(kappa: np.ndarray, same: np.ndarray, lemmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lemmas, mean same-sense kappa (n, L), mean different-sense kappa (n, L)) of the lemmas that have
    pairs of both labels; kappa (P, L) per pair, same (P,) bool, lemmas (P,) the pair's lemma key."""
    names, inv = np.unique(np.asarray(lemmas, dtype=str), return_inverse=True)
    inv = inv.ravel()
    L = kappa.shape[1] if kappa.ndim == 2 else 0
    means = []
    for mask in (same, ~same):
        sums = np.zeros((len(names), L))
        np.add.at(sums, inv[mask], kappa[mask])
        means.append((sums, np.bincount(inv[mask], minlength=len(names))))
    both = (means[0][1] > 0) & (means[1][1] > 0)
    x, y = (sums[both] / n[both, None] for sums, n in means)
    return names[both], x, y


def _group_values(g: dict, x: str, y: str, prefix: str) -> dict[str, Any]:
    """Result keys of a compare_* output: <x>_kappa, <y>_kappa with CIs; <prefix>difference, test, effect."""
    return {
        f"{x}_kappa": g["x"], f"{x}_ci_low": g["x_lo"], f"{x}_ci_high": g["x_hi"],
        f"{y}_kappa": g["y"], f"{y}_ci_low": g["y_lo"], f"{y}_ci_high": g["y_hi"],
        f"{prefix}difference": g["diff"], f"{prefix}difference_ci_low": g["diff_lo"],
        f"{prefix}difference_ci_high": g["diff_hi"], f"{prefix}p_value": g["p"], f"{prefix}p_value_holm": g["p_holm"],
        f"{prefix}effect_size": g["effect"], f"{prefix}cohens_d": g["d"],
    }


def analyze_semantic(
    contexts: pa.Table,
    targets: pa.Table,
    routes: pa.Table,
    *,
    n_experts: int,
    top_k: int,
    layers: list[int],
    params: SemanticParams = SemanticParams(),
    trace: str | None = None,
) -> AnalysisResult:
    """Per-layer chance-corrected overlap for sense pairs and substitution items.

    Args:
        contexts: one row per context sentence: seq_id, probe ("wic" | "sub"), item, role
            ("a"/"b" for pairs; "original"/"substitute"/"control" for items), label
            ("same"/"different" for pairs), optional lemma.
        targets: the aligned target tokens (``moescope.semantic.align.align_targets``).
        routes: routes rows (seq_id, pos, layer, experts) of at least the target tokens.
        n_experts, top_k, layers: the trace's E, k and MoE layer indices.

    Returns:
        AnalysisResult "semantic" whose values hold per-layer arrays (one entry per layer in
        ``layers``; kappa is unitless, 0 = chance): same_sense_kappa, different_sense_kappa,
        difference(_ci_low/_ci_high), p_value(_holm), effect_size, unrelated_kappa, the
        substitute_/control_/substitution_ counterparts and identical_tokens_/distinct_tokens_
        token-identity control, plus counts.
    """
    rng = np.random.default_rng(params.seed)
    L = len(layers)
    seq_ids = contexts.column("seq_id").to_numpy().astype(np.int64)
    profiles, complete = target_profiles(targets, routes, seq_ids, layers, n_experts)
    probe, item, role = _column(contexts, "probe"), _column(contexts, "item"), _column(contexts, "role")
    label, lemma = _column(contexts, "label"), _column(contexts, "lemma")
    target_pos = _column(contexts, "target_pos")
    keys = _token_keys(targets)
    by_item: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for c in range(len(seq_ids)):
        by_item[(probe[c], item[c])][role[c]].append(c)
    values: dict[str, Any] = {
        "layers": layers, "n_experts": n_experts, "top_k": top_k, "chance_overlap": top_k / n_experts,
        "subword": params.subword, "n_contexts": len(seq_ids), "n_unaligned_contexts": int((~complete).sum()),
    }
    # sense pairs
    pairs = [(r["a"][0], r["b"][0]) for (p, _), r in sorted(by_item.items()) if p == "wic" and r["a"] and r["b"]]
    pairs = [(a, b) for a, b in pairs if complete[a] and complete[b] and label[a] in ("same", "different")]
    ia, ib = np.array([a for a, _ in pairs], np.int64), np.array([b for _, b in pairs], np.int64)
    if len(pairs):
        kappa = pair_kappa(profiles[ia], profiles[ib], top_k, n_experts)
        same = np.array([label[a] == "same" for a in ia])
        ident = np.array([keys.get(int(seq_ids[a])) == keys.get(int(seq_ids[b])) for a, b in pairs])
        lemma_of = np.array([_lemma_key(lemma[a], target_pos[a]) for a in ia], dtype=object)
        # The test is paired by lemma: per lemma, mean same-sense minus mean different-sense kappa.
        names, x, y = lemma_means(kappa, same, lemma_of)
        g = compare_paired(x, y, rng, params.n_boot, params.confidence)
        values.update(_group_values(g, "same_sense", "different_sense", ""))
        values.update(n_pairs_same=int(same.sum()), n_pairs_different=int((~same).sum()), n_lemmas=g["n"],
                      lemma_gaps={"lemmas": names.tolist(), "gap": x - y})
        # The naive test over pairs (unpaired, Mann-Whitney), kept for comparison: lemmas that differ in
        # baseline overlap and in their share of same-sense pairs make it see a gap that is not there.
        naive = compare_groups(kappa[same], kappa[~same])
        values.update(unpaired_difference=naive["diff"], unpaired_p_value=naive["p"],
                      unpaired_p_value_holm=naive["p_holm"])
        for name, subset in (("identical_tokens_", ident), ("distinct_tokens_", ~ident)):
            _, xs, ys = lemma_means(kappa[subset], same[subset], lemma_of[subset])
            g = compare_paired(xs, ys, rng, params.n_boot, params.confidence)
            values.update(_group_values(g, f"{name}same_sense", f"{name}different_sense", name))
            values.update({f"{name}n_pairs_same": int((same & subset).sum()),
                           f"{name}n_pairs_different": int((~same & subset).sum()), f"{name}n_lemmas": g["n"]})
        # unrelated baseline: a of one pair against b of another pair, different lemma
        perm = rng.permutation(len(pairs))
        ua, ub = ia[perm], ib[np.roll(perm, 1)]
        ok = np.array([lemma[a] != lemma[b] or not lemma[a] for a, b in zip(ua, ub)]) & (ua != ub)
        uk = pair_kappa(profiles[ua[ok]], profiles[ub[ok]], top_k, n_experts)
        values["unrelated_kappa"] = uk.mean(0) if len(uk) else _nan(L)
        lo, hi = (_bootstrap_rows(uk, int(rng.integers(2**31)), params.n_boot, params.confidence) if len(uk) > 1
                  else (_nan(L), _nan(L)))
        values.update(unrelated_ci_low=lo, unrelated_ci_high=hi, n_pairs_unrelated=int(ok.sum()))
    # substitution items: per item, mean kappa(original, substitute) vs mean kappa(original, control)
    # A replacement whose first target token is the original's sees the same prefix and the same
    # token, so a causal model routes it identically by construction: such links are left out.
    rows, shared = [], 0
    first = lambda c: keys.get(int(seq_ids[c]), (None,))[0]  # noqa: E731
    for (p, _), r in sorted(by_item.items()):
        if p != "sub" or not r["original"] or not complete[r["original"][0]]:
            continue
        o = r["original"][0]
        subs = [c for c in r["substitute"] if complete[c] and first(c) != first(o)]
        ctrl = [c for c in r["control"] if complete[c] and first(c) != first(o)]
        shared += sum(complete[c] and first(c) == first(o) for c in r["substitute"] + r["control"])
        if subs and ctrl:
            rows.append((o, subs, ctrl))
    values["n_replacements_sharing_first_token"] = int(shared)
    if rows:
        means = []
        for slot in (1, 2):  # substitutes, then controls
            links = [(i, row[0], c) for i, row in enumerate(rows) for c in row[slot]]
            owner, orig, other = (np.array(v, np.int64) for v in zip(*links))
            kappa = pair_kappa(profiles[orig], profiles[other], top_k, n_experts)
            sums = np.zeros((len(rows), L))
            np.add.at(sums, owner, kappa)
            means.append(sums / np.bincount(owner, minlength=len(rows))[:, None])
        g = compare_paired(means[0], means[1], rng, params.n_boot, params.confidence)
        values.update(_group_values(g, "substitute", "control", "substitution_"))
        values["n_items"] = g["n"]
        values["item_gaps"] = {"items": [item[row[0]] for row in rows], "gap": means[0] - means[1]}
    return AnalysisResult("semantic", values, params={**asdict(params), "tests": TESTS}, trace=trace,
                          figures=semantic_figures(values))


# -- figures -----------------------------------------------------------------------------------
def _band(ax: Any, values: dict, name: str, label: str, **style: Any) -> None:
    """A per-layer curve with its CI band; `name` is the key stem (<name>_kappa or <name>difference)."""
    from matplotlib.ticker import MaxNLocator

    x = np.asarray(values["layers"])
    stem = name if name.endswith("difference") else f"{name}_kappa"
    mean = np.asarray(values[stem], float)
    lo, hi = np.asarray(values[f"{name}_ci_low"], float), np.asarray(values[f"{name}_ci_high"], float)
    line = ax.plot(x, mean, marker="o", ms=3.5, label=label, **style)[0]
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layer indices


def semantic_figures(values: dict[str, Any]) -> dict[str, Any]:
    """Figures (matplotlib Figures, no pyplot state): per-layer kappa curves with 95% CI bands."""
    from matplotlib.figure import Figure

    figs: dict[str, Any] = {}
    chance = dict(color="0.45", lw=0.8, ls=":")
    if "same_sense_kappa" in values:
        fig = Figure(figsize=(10.5, 3.8), layout="constrained")
        left, right = fig.subplots(1, 2)
        _band(left, values, "same_sense", "same sense")
        _band(left, values, "different_sense", "different sense")
        if "unrelated_kappa" in values:
            _band(left, values, "unrelated", "unrelated words (load baseline)", ls="--", color="0.5")
        left.axhline(0, label="chance (uniform top-k)", **chance)
        left.set(xlabel="MoE layer", ylabel="kappa (0 = chance)", title="Sense pairs: expert overlap at the target")
        _band(right, values, "difference", "all pairs")
        _band(right, values, "identical_tokens_difference", "identical target token ids")
        _band(right, values, "distinct_tokens_difference", "different target token ids")
        right.axhline(0, **chance)
        sig = np.asarray(values["p_value_holm"], float) < 0.05
        if sig.any():
            x, d = np.asarray(values["layers"])[sig], np.asarray(values["difference"], float)[sig]
            right.plot(x, d, ls="none", marker="*", ms=10, color="k", label="Holm p < 0.05")
        right.set(xlabel="MoE layer", ylabel="kappa(same) - kappa(different)",
                  title="Same - different sense (token-identity control)")
        for ax in (left, right):
            ax.legend(fontsize=7.5, frameon=False)
        figs["semantic_sense_pairs"] = fig
    if "substitute_kappa" in values:
        fig = Figure(figsize=(5.6, 3.8), layout="constrained")
        ax = fig.subplots()
        _band(ax, values, "substitute", "good substitute")
        _band(ax, values, "control", "control word")
        ax.axhline(0, label="chance (uniform top-k)", **chance)
        ax.set(xlabel="MoE layer", ylabel="kappa with the original (0 = chance)",
               title="Substitution: overlap with the original word")
        ax.legend(fontsize=7.5, frameon=False)
        figs["semantic_substitution"] = fig
    return figs
