"""Routing statistics of any trace, each next to its chance level.

Every measure is a small pure function over counts (numpy) that the counting functions of
:mod:`moescope.analysis.routing_counts` produce with bounded memory; :func:`routing_statistics`
runs them all and returns an :class:`AnalysisResult` (analysis="stats"). Units: entropies,
KL divergences and mutual informations in BITS; shares as fractions of a layer's expert
assignments (k per token). docs/analyses/stats.md defines every number.

    from moescope import open_trace
    from moescope.analysis.stats import routing_statistics, coactivation, load_summary
    result = routing_statistics(open_trace("runs/x"), label="label")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moescope.analysis.coactivation_null import (SelectionRule, beyond_chance, dispersion_values, pair_null_under_rule,
                                                 structured_pair_null, top_ratio_chance)
from moescope.analysis.result import AnalysisResult
from moescope.analysis.routing_counts import RouteCounts, RouteScan, count_routes, expert_load, scan_routes, trace_phases
from moescope.analysis.stats_specialisation import label_specialisation, token_specialisation
from moescope.errors import MoescopeError
from moescope.inference import thread_map
from moescope.router_settings import describe_router
from moescope.store.reader import Trace

LN2 = np.log(2.0)
RARE_FRACTION = 0.1  # an expert is rare below 10% of its fair share (1/E of the assignments)


# -- load ------------------------------------------------------------------------------------------
def load_summary(load: np.ndarray, n_tokens: np.ndarray, top_k: int, *, rare_fraction: float = RARE_FRACTION) -> dict[str, Any]:
    """Per layer (rows of `load`, (L, E) assignment counts; `n_tokens` (L,) tokens):

    entropy_bits of the expert shares p_e = load_e / sum(load) (max log2 E), normalised_entropy
    (H / log2 E), kl_uniform_bits = KL(p || uniform) = log2 E - H, and its chance level
    kl_uniform_chance_bits ~ (E - k) / (2 k N ln 2): the expected plug-in KL of N tokens routed
    to uniform random k-subsets. max/min_share_over_fair: largest/smallest p_e * E.
    dead_experts: no assignment; rare_experts: p_e < rare_fraction / E (dead ones excluded).
    """
    load = np.asarray(load, np.float64)
    L, E = load.shape
    total = load.sum(axis=1, keepdims=True)
    share = np.divide(load, total, out=np.zeros_like(load), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(share > 0, share * np.log2(share), 0.0).sum(axis=1)
    n = np.maximum(np.asarray(n_tokens, np.float64), 1)
    dead = [np.flatnonzero(row == 0).tolist() for row in load]
    rare = [np.flatnonzero((s > 0) & (s < rare_fraction / E)).tolist() for s in share]
    return {
        "share": share,
        "entropy_bits": entropy,
        "entropy_max_bits": float(np.log2(E)),
        "normalised_entropy": entropy / np.log2(E),
        "kl_uniform_bits": np.log2(E) - entropy,
        "kl_uniform_chance_bits": (E - top_k) / (2 * top_k * n * LN2),
        "max_share_over_fair": share.max(axis=1) * E,
        "min_share_over_fair": share.min(axis=1) * E,
        "dead_experts": dead,
        "rare_experts": rare,
        "n_dead": [len(d) for d in dead],
        "n_rare": [len(r) for r in rare],
        "rare_fraction": rare_fraction,
    }


# -- co-activation ---------------------------------------------------------------------------------
def pair_null(rates: np.ndarray, top_k: int, *, iterations: int = 500) -> np.ndarray:
    """Expected share of tokens choosing both a and b (a != b) when pairs form at random but
    each expert keeps its number of pairs: P_ab = x_a x_b with x_a * sum_{b != a} x_b =
    r_a (k - 1), r_a the share of tokens choosing a. Exact for uniform routing
    (k (k-1) / (E (E-1))); a degree-preserving ("configuration model") null otherwise.
    Routers that restrict which experts can meet (group-limited top-k) need
    :func:`moescope.analysis.coactivation_null.structured_pair_null` instead."""
    return structured_pair_null(rates, top_k, None, iterations=iterations)


@dataclass
class Coactivation:
    """Pair co-activation of one layer: counts (E, E) tokens choosing both (diagonal: load),
    expected (E, E) under the null (:func:`pair_null`, or its generalisation to the router's
    selection rule, :mod:`moescope.analysis.coactivation_null`), ratio = counts / expected (NaN
    where expected is 0), dispersion_chance / _sd: mean and SD of the dispersion (see
    :func:`dispersion`) of simulated routers with this layer's loads, the same selection rule
    and no pair structure; rule: that selection rule."""

    counts: np.ndarray
    expected: np.ndarray
    ratio: np.ndarray
    dispersion_chance: float | None = None
    dispersion_chance_sd: float | None = None
    rule: SelectionRule | None = None


def dispersion(counts: np.ndarray, expected: np.ndarray, *, min_expected: float = 5.0) -> float | None:
    """Mean over expert pairs (expected >= min_expected) of (count - expected)^2 / expected: a
    chi-square per pair. It does not grow with the number of tokens when pairs form by chance
    (about 0.4-0.9, depending on E and k: compare with the simulated chance level), and it
    grows with the tokens when experts team up."""
    return dispersion_values(np.asarray(counts, np.float64), expected, min_expected)


def coactivation(source: Trace | RouteScan, layer_index: int | None = None, *, seed: int = 0,
                 chance_tokens: int = 20_000, replicates: int = 20,
                 rule: SelectionRule | None = None, n_jobs: int = 1) -> list[Coactivation] | Coactivation:
    """Every pair within each token's top-k, counted and divided by the null of random pairing
    under the router's selection rule (`rule`; default: read from a Trace's manifest, plain
    top-k for a RouteScan). `source` a Trace (scanned now) or a RouteScan; one layer (position
    in moe_layers) or all. The chance dispersion: mean and SD over `replicates` simulated
    routers of min(tokens, chance_tokens) tokens each (it does not depend on the number of tokens).
    n_jobs: threads over the layers (the simulation's numpy work releases the GIL)."""
    if rule is None:
        model = source.manifest.get("model") if isinstance(source, Trace) else None
        E, k = (source.n_experts, source.top_k)
        rule = SelectionRule.from_model(model, E, k)
    scan = source if isinstance(source, RouteScan) else scan_routes(source, transitions=False)
    # one random stream per layer (spawned from `seed`): a layer's chance level is the same
    # whether it is computed alone or with the others, in any order, on any number of threads
    streams = np.random.SeedSequence(seed).spawn(len(scan.moe_layers))

    def one(li: int) -> Coactivation:
        n = max(int(scan.n_rows[li]), 1)
        counts = scan.pairs[li]
        null = pair_null_under_rule(counts, n, rule, np.random.default_rng(streams[li]), chance_tokens=chance_tokens,
                                    replicates=replicates if scan.top_k > 1 else 0)
        expected = null.expected
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(expected > 0, counts / expected, np.nan)
        np.fill_diagonal(ratio, np.nan)
        return Coactivation(counts, expected, ratio, null.dispersion_chance, null.dispersion_chance_sd, rule)

    if layer_index is not None:
        return one(layer_index)
    return thread_map(one, range(len(scan.moe_layers)), n_jobs)


def coactivation_summary(co: Coactivation, *, top: int = 10, min_expected: float = 5.0, seed: int = 0,
                         draws: int = 200) -> dict[str, Any]:
    """max_ratio and top pairs (a, b, count, expected, ratio, chance ratio at this rank, its SD)
    among pairs expected >= min_expected times; max_ratio_chance (mean, SD) and
    max_ratio_p_value (see :func:`top_ratio_chance`); dispersion (see :func:`dispersion`) with
    its simulated chance level and SD."""
    E = len(co.counts)
    iu = np.triu_indices(E, 1)
    c, e = co.counts[iu].astype(np.float64), co.expected[iu]
    keep = e >= min_expected
    ratio = np.where(keep, c / np.where(e > 0, e, 1), np.nan)
    order = [i for i in np.argsort(-np.nan_to_num(ratio, nan=-np.inf))[:top] if keep[i]]
    chance = top_ratio_chance(co.expected, [float(ratio[i]) for i in order], np.random.default_rng(seed),
                              draws=draws, min_expected=min_expected)
    rc, rsd = chance["ratio_chance"], chance["ratio_chance_sd"]
    pairs = [[int(iu[0][i]), int(iu[1][i]), int(c[i]), float(e[i]), float(ratio[i]),
              rc[j] if j < len(rc) else None, rsd[j] if j < len(rsd) else None] for j, i in enumerate(order)]
    return {"max_ratio": float(np.nanmax(ratio)) if keep.any() else None,
            "max_ratio_chance": rc[0] if rc else None, "max_ratio_chance_sd": rsd[0] if rsd else None,
            "max_ratio_p_value": chance["max_ratio_p_value"], "ratio_chance_draws": draws,
            "dispersion": (d := dispersion(co.counts, co.expected, min_expected=min_expected)),
            "dispersion_chance": co.dispersion_chance, "dispersion_chance_sd": co.dispersion_chance_sd,
            "beyond_chance": beyond_chance(d, co.dispersion_chance, co.dispersion_chance_sd),
            "top_pairs": pairs}


# -- transitions -----------------------------------------------------------------------------------
@dataclass
class Transition:
    """Experts at one MoE layer against the next, over the tokens seen at both.

    counts (E, E): tokens with a at the first layer and b at the second; conditional:
    P(b chosen at the second | a chosen at the first); lift: counts / expected under
    independence (row share x column share); mi_bits: mutual information of the (a, b)
    pairs (k^2 per token), chance ~ (E-k)^2 / (2 k^2 N ln 2) for N tokens (the plug-in
    bias when the two layers choose independently)."""

    from_layer: int
    to_layer: int
    counts: np.ndarray
    conditional: np.ndarray
    lift: np.ndarray
    mi_bits: float
    mi_chance_bits: float
    n_tokens: int


def transitions(source: Trace | RouteScan) -> list[Transition]:
    """Transition matrices between each MoE layer and the next (layers in moe_layers order)."""
    scan = source if isinstance(source, RouteScan) else scan_routes(source)
    out = []
    for i, (n_tok, counts) in enumerate(zip(scan.transition_tokens, scan.transitions)):
        c = counts.astype(np.float64)
        k, E, N = scan.top_k, scan.n_experts, max(int(n_tok), 1)
        total = max(c.sum(), 1.0)
        row, col = c.sum(axis=1), c.sum(axis=0)
        expected = np.outer(row, col) / total
        n_from = row / k  # tokens choosing a at the first layer
        with np.errstate(divide="ignore", invalid="ignore"):
            conditional = np.where(n_from[:, None] > 0, c / n_from[:, None], np.nan)
            lift = np.where(expected > 0, c / expected, np.nan)
            mi = float(np.where(c > 0, (c / total) * np.log2(c / expected), 0.0).sum())
        out.append(Transition(scan.moe_layers[i], scan.moe_layers[i + 1], counts, conditional, lift, mi,
                              (E - k) ** 2 / (2 * k * k * N * LN2), int(n_tok)))
    return out


def transition_summary(t: Transition, *, top: int = 10, min_expected: float = 5.0) -> dict[str, Any]:
    """mi_bits vs mi_chance_bits, max_lift and the top transitions (a, b, count, P(b|a), lift)."""
    E = len(t.counts)
    total = max(t.counts.sum(), 1)
    expected = np.outer(t.counts.sum(1), t.counts.sum(0)) / total
    lift = np.where(expected >= min_expected, np.nan_to_num(t.lift, nan=-np.inf), -np.inf).ravel()
    order = np.argsort(-lift)[:top]
    top_list = [[int(i // E), int(i % E), int(t.counts.flat[i]), float(t.conditional.flat[i]), float(lift[i])]
                for i in order if np.isfinite(lift[i])]
    return {"from_layer": t.from_layer, "to_layer": t.to_layer, "n_tokens": t.n_tokens, "mi_bits": t.mi_bits,
            "mi_chance_bits": t.mi_chance_bits, "max_lift": top_list[0][4] if top_list else None,
            "top_transitions": top_list}


# -- weights and phases ----------------------------------------------------------------------------
def weight_summary(scan: RouteScan) -> dict[str, Any] | None:
    """Per layer and rank: mean weight and histogram on [0, weight_max] (bins of
    weight_max / weight_bins; weight_max is 1 unless the router scales its weights, see
    :func:`moescope.analysis.routing_counts.weight_range`); mean of the per-token weight sum.
    Baseline: equal weights, weight_max / k when the sums are weight_max (1/k unscaled).
    None when the trace has no weights."""
    if scan.weight_hist is None:
        return None
    sums = scan.weight_sum_hist
    w_max = getattr(scan, "weight_max", 1.0)
    return {"bins": scan.weight_bins, "weight_max": w_max, "mean_by_rank": scan.weight_mean,
            "uniform_weight": w_max / scan.top_k,
            "hist_by_rank": scan.weight_hist,
            "sum_mean": (scan.weight_mean * scan.weight_hist.sum(axis=2)).sum(axis=1) / np.maximum(sums.sum(axis=1), 1),
            "sum_hist": sums}


def phase_comparison(phase_loads: dict[str, tuple[np.ndarray, np.ndarray]] | None, top_k: int, *,
                     rare_fraction: float = RARE_FRACTION) -> dict[str, Any] | None:
    """Prompt vs generated tokens side by side, from {phase: (load (L, E), tokens (L,))}: the load
    summary per phase and, per layer, the Jensen-Shannon divergence (bits) between the two
    phases' expert shares, with its chance level ~ (E-k)/k * (1/N_prompt + 1/N_generated) / (8 ln 2)
    (the same router in both phases). None unless both phases are given."""
    if not phase_loads or set(phase_loads) != {"prompt", "generated"}:
        return None
    out: dict[str, Any] = {}
    shares, tokens = {}, {}
    for phase, (load, n) in phase_loads.items():
        summary = load_summary(load, n, top_k, rare_fraction=rare_fraction)
        shares[phase], tokens[phase] = summary.pop("share"), n
        out[phase] = {**summary, "n_tokens": n}
    E = shares["prompt"].shape[1]
    p, q = shares["prompt"], shares["generated"]
    m = (p + q) / 2
    kl = lambda a: np.where(a > 0, a * np.log2(a / m), 0.0).sum(axis=1)  # noqa: E731
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 * log 0 terms, dropped by the where
        out["js_bits"] = (kl(p) + kl(q)) / 2
    out["js_chance_bits"] = ((E - top_k) / top_k * (1 / np.maximum(tokens["prompt"], 1) + 1 / np.maximum(tokens["generated"], 1))
                             / (8 * LN2))
    return out


# -- everything ------------------------------------------------------------------------------------
@dataclass
class StatsInputs:
    """Everything the statistics read from a trace (the rest is pure computation): the route
    scan, per-(layer, token id, expert) counts and token texts (None without tokens), expert
    counts (S, L, E) of the labelled sequences and their labels (None without --label), and
    {phase: (load, tokens)} when the trace has prompt and generated tokens."""

    scan: RouteScan
    token_counts: dict[str, np.ndarray] | None = None
    token_text: dict[int, str] | None = None
    seq_counts: np.ndarray | None = None
    seq_labels: np.ndarray | None = None
    phase_loads: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    model: dict[str, Any] | None = None  # the manifest's model description (router settings)


def gather_statistics_inputs(trace: Trace, *, label: str | None = None, phase: str = "all",
                             counts: RouteCounts | None = None) -> StatsInputs:
    """Read every count the statistics need, with bounded memory (one numpy pass over the routes
    and DuckDB aggregations). `counts`: a :func:`count_routes` result of the same phase with
    scan (and sequences when `label` is given) already made, e.g. shared with the signatures."""
    from moescope.analysis.signatures import read_labels

    seq_labels = read_labels(trace, label) if label is not None else None  # fail early on a bad label
    if counts is None:
        counts = count_routes(trace, phase=phase, sequences=label is not None, token_experts=trace.has("tokens"))
    inputs = StatsInputs(counts.scan, counts.token_experts, model=trace.manifest.get("model"))
    if trace.has("tokens"):
        inputs.token_text = _token_text(trace)
    if seq_labels is not None:
        seqc = counts.sequences
        keep = np.isin(seqc.seq_ids, list(seq_labels))
        inputs.seq_counts = seqc.total()[0][keep]
        inputs.seq_labels = np.array([seq_labels[int(s)] for s in seqc.seq_ids[keep]], dtype=object).astype(str)
    if trace_phases(trace) == {"prompt", "generated"}:
        inputs.phase_loads = {p: expert_load(trace, phase=p) for p in ("prompt", "generated")}
    return inputs


def routing_statistics(
    trace: Trace,
    *,
    label: str | None = None,
    top_tokens: int = 10,
    min_token_count: int = 20,
    phase: str = "all",
    focus_layer: int | None = None,
    rare_fraction: float = RARE_FRACTION,
    permutations: int | None = None,
    seed: int = 0,
    figures: bool = True,
    chance_replicates: int = 20,
    n_jobs: int = 1,
) -> AnalysisResult:
    """All routing statistics of a trace (analysis="stats").

    Args:
        label: a metadata column of the sequences table; adds label specialisation.
        top_tokens / min_token_count: token specialisation lists per expert.
        phase: 'all' (default), 'prompt' or 'generated' tokens for every measure but the
            phase comparison (made whenever the trace has both phases).
        focus_layer: the model layer shown in the co-activation, transition and weight
            figures (default: the middle MoE layer).
        permutations: label shuffles for the label-specialisation baseline (None: enough for a
            Holm-adjusted p of 0.01 across the layers, at least 100).
        chance_replicates: simulated routers per layer for the co-activation chance (mean, SD).
        n_jobs: threads over the layers of the co-activation chance (results do not depend on it).
    """
    _focus(trace.moe_layers, focus_layer)  # fail before the expensive part
    inputs = gather_statistics_inputs(trace, label=label, phase=phase)
    values, figs = summarise_statistics(inputs, label=label, top_tokens=top_tokens, min_token_count=min_token_count,
                                        phase=phase, focus_layer=focus_layer, rare_fraction=rare_fraction,
                                        permutations=permutations, seed=seed, figures=figures,
                                        chance_replicates=chance_replicates, n_jobs=n_jobs)
    params = {"label": label, "top_tokens": top_tokens, "min_token_count": min_token_count, "phase": phase,
              "focus_layer": values["focus_layer"], "rare_fraction": rare_fraction, "permutations": permutations,
              "seed": seed, "chance_replicates": chance_replicates}
    return AnalysisResult("stats", values, params=params, figures=figs, trace=str(trace.path))


def _focus(layers: list[int], focus_layer: int | None) -> int:
    focus = focus_layer if focus_layer is not None else layers[len(layers) // 2]
    if focus not in layers:
        raise MoescopeError(f"--focus-layer {focus} is not an MoE layer of this trace; choose one of {layers}")
    return focus


def summarise_statistics(inputs: StatsInputs, *, label: str | None = None, top_tokens: int = 10,
                         min_token_count: int = 20, phase: str = "all", focus_layer: int | None = None,
                         rare_fraction: float = RARE_FRACTION, permutations: int | None = None, seed: int = 0,
                         figures: bool = True, chance_replicates: int = 20,
                         n_jobs: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pure half of :func:`routing_statistics`: (values, figures) from the gathered counts."""
    notes: list[str] = []
    scan = inputs.scan
    layers = scan.moe_layers
    focus = _focus(layers, focus_layer)
    fi = layers.index(focus)
    load = load_summary(scan.load, scan.n_rows, scan.top_k, rare_fraction=rare_fraction)
    load.pop("share")
    values: dict[str, Any] = {"n_experts": scan.n_experts, "top_k": scan.top_k, "moe_layers": layers, "phase": phase,
                              "n_tokens": scan.n_rows, "focus_layer": focus, "load": {**load, "counts": scan.load}}
    rule = SelectionRule.from_model(inputs.model, scan.n_experts, scan.top_k)
    co_all = (coactivation(scan, seed=seed, rule=rule, replicates=chance_replicates, n_jobs=n_jobs)
              if scan.top_k > 1 else [])
    if not (inputs.model or {}).get("router_settings"):
        notes.append("the trace does not record the router's settings: co-activation chance assumes any pair of "
                     "experts can be chosen together (plain top-k)")
    values["router"] = describe_router(inputs.model)
    values["coactivation"] = None if not co_all else {
        "null": "random pairing that keeps each expert's load, under the router's selection rule: " + rule.describe(),
        "selection_rule": {"n_group": rule.n_group, "topk_group": rule.topk_group, "grouped": rule.grouped,
                           "group_score": rule.group_score if rule.grouped else None},
        "per_layer": [coactivation_summary(c, seed=seed) for c in co_all],
        "focus_ratio": co_all[fi].ratio}
    if scan.top_k == 1:
        notes.append("top-1 routing: no pairs within a token, co-activation skipped")
    trans = transitions(scan)
    tf = trans[min(fi, len(trans) - 1)] if trans else None
    values["transitions"] = None if not trans else {
        "per_pair": [transition_summary(t) for t in trans],
        "focus": {"from_layer": tf.from_layer, "to_layer": tf.to_layer, "lift": tf.lift, "conditional": tf.conditional}}
    if not trans:
        notes.append("one MoE layer: no layer-to-layer transitions")
    values["token_specialisation"] = None
    if inputs.token_counts is not None:
        values["token_specialisation"] = token_specialisation(
            inputs.token_counts, scan.top_k, len(layers), top_tokens=top_tokens, min_count=min_token_count,
            token_text=inputs.token_text, seed=seed)
    else:
        notes.append("no tokens table: token specialisation skipped")
    values["label_specialisation"] = None
    if inputs.seq_counts is not None:
        values["label_specialisation"] = {"label": label, **label_specialisation(
            inputs.seq_counts, inputs.seq_labels, permutations=permutations, seed=seed)}
    values["weights"] = weight_summary(scan)
    if values["weights"] is None:
        notes.append("the trace records no routing weights: weight distributions skipped")
    values["phases"] = phase_comparison(inputs.phase_loads, scan.top_k, rare_fraction=rare_fraction)
    values["notes"] = notes
    figs = {}
    if figures:
        from moescope.analysis import stats_plots

        figs = stats_plots.stats_figures(values, co_all[fi] if co_all else None, tf, scan, fi)
    return values, figs


def _token_text(trace: Trace) -> dict[int, str] | None:
    if "token" not in trace.columns("tokens"):
        return None
    rows = trace.rows("SELECT token_id, any_value(token) FROM tokens GROUP BY token_id")
    return {int(t): s for t, s in rows}
