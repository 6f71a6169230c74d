"""Every analysis of a trace, importable from one place.

    from moescope.analysis import routing_statistics, routing_signatures
    trace = moescope.open_trace("runs/olmoe", where="label != 'chat'")   # optional selection
    stats = routing_statistics(trace, label="label")
    stats.df()            # pandas: one row per MoE layer
    stats                 # in a notebook: an HTML summary
    stats.save("runs/olmoe-stats")   # results.json + figures/, what `moescope report` reads

Each function takes an opened :class:`~moescope.store.reader.Trace` (or a trace directory)
and returns an :class:`~moescope.analysis.result.AnalysisResult` with ``.values`` (the
numbers of results.json, each next to its baseline), ``.df()`` / ``.to_pandas()``,
``.save(dir)`` and an HTML view for notebooks. The `moescope analyze` commands call exactly
these functions (or the module functions they wrap). The selection a trace was opened
with (``where``) is recorded in the result.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from moescope.analysis.result import AnalysisResult, load_results

if TYPE_CHECKING:
    from moescope.store.reader import Trace

__all__ = ["AnalysisResult", "load_results", "routing_statistics", "routing_signatures", "compare", "geometry",
           "semantic", "pos"]


def _trace(trace: "Trace | str | os.PathLike") -> "Trace":
    from moescope.store.reader import Trace, open_trace

    return trace if isinstance(trace, Trace) else open_trace(trace)


def _selected(result: AnalysisResult, *traces: "Trace") -> AnalysisResult:
    if result.where is None:
        result.where = next((t.where for t in traces if t.where), None)
    return result


def routing_statistics(trace: "Trace | str | os.PathLike", *, label: str | None = None, phase: str = "all",
                       focus_layer: int | None = None, top_tokens: int = 10, min_token_count: int = 20,
                       permutations: int = 100, seed: int = 0, figures: bool = True) -> AnalysisResult:
    """Expert load (entropy, KL from uniform, dead/rare experts), co-activation of every pair,
    layer-to-layer transitions, token and label specialisation, weights, prompt vs generated;
    each next to its chance level (analysis "stats", see docs/analyses/stats.md).

    `label`: a sequences column for label specialisation; `phase`: "all", "prompt" or
    "generated" tokens; `permutations`: label shuffles of the label baseline.
    """
    from moescope.analysis.stats import routing_statistics as run

    t = _trace(trace)
    return _selected(run(t, label=label, phase=phase, focus_layer=focus_layer, top_tokens=top_tokens,
                         min_token_count=min_token_count, permutations=permutations, seed=seed, figures=figures), t)


def routing_signatures(trace: "Trace | str | os.PathLike", *, label: str, folds: int = 5, permutations: int = 200,
                       seed: int = 0, phase: str = "prompt", control_draws: int = 3,
                       first_n: Sequence[int] | None = None, figures: bool = True) -> AnalysisResult:
    """Per-sequence routing signatures (expert visit frequencies): do they separate the values
    of the sequences column `label`, beyond chance, label permutation, load balance and token
    identity? Cross-validated accuracy with its baselines (analysis "signatures", see
    docs/analyses/signatures.md)."""
    from moescope.analysis.signatures import routing_signatures as run

    t = _trace(trace)
    return _selected(run(t, label=label, folds=folds, permutations=permutations, seed=seed, phase=phase,
                         control_draws=control_draws, first_n=first_n, figures=figures), t)


def compare(trace_a: "Trace | str | os.PathLike", trace_b: "Trace | str | os.PathLike", *, seed: int = 0) -> AnalysisResult:
    """Per-layer routing overlap of two traces of the same text (two models, checkpoints or
    templates) on aligned tokens, next to chance, with the best one-to-one expert matching
    (analysis "compare", see docs/analyses/compare.md)."""
    from moescope.analysis.routing_inputs import compare_traces

    a, b = _trace(trace_a), _trace(trace_b)
    return _selected(compare_traces(a, b, seed=seed), a, b)


def geometry(trace: "Trace | str | os.PathLike", *, model: str | None = None, pairs: int = 20_000, top_p: float = 0.8,
             seed: int = 0, max_tokens: int = 20_000, nn_queries: int = 2_000, permutations: int = 99) -> AnalysisResult:
    """Hidden-state geometry next to routing: cosine vs expert overlap, nearest-neighbour
    prediction of expert sets, the mean hidden direction vs the router, visit frequencies
    (analysis "geometry", see docs/analyses/geometry.md). Needs a trace captured with
    hidden states (``hidden_rate``); `model` is where router weights are read (default: the
    trace's model directory)."""
    from moescope.analysis.geometry import GeometryParams, analyze_geometry
    from moescope.analysis.routing_inputs import geometry_layers, router_weights_for

    t = _trace(trace)
    params = GeometryParams(pairs=pairs, top_p=top_p, seed=seed, max_tokens=max_tokens, nn_queries=nn_queries,
                            permutations=permutations)
    weights, note = router_weights_for(t, model)
    result = analyze_geometry(geometry_layers(t, params), n_experts=t.n_experts, top_k=t.top_k, router_weights=weights,
                              params=params, trace=str(t.path), notes=[note] if note else None)
    return _selected(result, t)


def semantic(trace: "Trace | str | os.PathLike", probes: str | os.PathLike | None = None, *, n_boot: int = 2000,
             confidence: float = 0.95, seed: int = 0) -> AnalysisResult:
    """Do the same word's senses route differently? Paired sense and substitution contrasts
    on a trace of probe contexts, with bootstrap CIs and Holm across layers (analysis
    "semantic", see docs/analyses/semantic.md)."""
    from moescope.analysis.semantic import SemanticParams
    from moescope.semantic.pipeline import analyse_trace

    t = _trace(trace)
    from moescope.store.selection import selecting

    with selecting(t.where):  # the pipeline opens the directory itself: keep the selection
        result = analyse_trace(t.path, probes, params=SemanticParams(n_boot=n_boot, confidence=confidence, seed=seed))
    return _selected(result, t)


def pos(trace: "Trace | str | os.PathLike", *, folds: int = 5, seed: int = 0, first_subword_only: bool = False,
        **params: Any) -> AnalysisResult:
    """Part-of-speech sensitivity of routing on a tagged trace (tokens with a ``upos``
    column, as `moescope analyze pos` writes): probe accuracy vs token-identity baselines,
    expert specialisation vs shuffled tags (analysis "pos", see docs/analyses/pos.md).
    Other keywords are :class:`moescope.analysis.pos.PosParams` fields."""
    from moescope.analysis.pos import PosParams, pos_analysis
    from moescope.pos.pipeline import load_tagged
    from moescope.store.selection import selecting

    t = _trace(trace)
    with selecting(t.where):
        tokens, routes, opened = load_tagged(t.path, first_subword_only=first_subword_only)
    tag_source = opened.manifest.get("capture", {}).get("tags") or f"upos column of {t.path}"
    result = pos_analysis(tokens, routes, n_experts=opened.n_experts, top_k=opened.top_k, moe_layers=opened.moe_layers,
                          params=PosParams(folds=folds, seed=seed, **params), tag_source=tag_source, trace=str(t.path))
    return _selected(result, t)
