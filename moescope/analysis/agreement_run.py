"""`agreement(A, B)`: read two traces, align them, count layer by layer, summarise, plot.

The counting itself is :mod:`moescope.analysis.agreement` (pure, mergeable); this module
only reads: the tokens tables once (for the alignment), then the routes of one MoE layer
at a time from each trace, so memory holds one layer of each.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from moescope.analysis.agreement import (
    MARGIN_EDGES,
    N_WORST,
    AgreementCounts,
    fixed_width,
    align_sequences,
    check_comparable,
    count_agreement,
    router_margins,
    summarise,
)
from moescope.analysis.result import AnalysisResult
from moescope.errors import MoescopeError

_POS_BITS, _LAYER_BITS = 20, 12  # key = pair << 32 | pos << 12 | layer index


def agreement(trace_a: Any, trace_b: Any, *, figures: bool = True) -> AnalysisResult:
    """Routing agreement of two traces of the same model over the same tokens (see the module
    docstring of :mod:`moescope.analysis.agreement`). A's phases and positions label rows."""
    check_comparable(trace_a.manifest, trace_b.manifest)
    for name, t in (("A", trace_a), ("B", trace_b)):
        if not t.has("tokens"):
            raise MoescopeError(f"trace {name} ({t.path}) has no tokens table; agreement aligns sequences by token ids")
    tokens_a = trace_a.table("tokens", _token_columns(trace_a))
    tokens_b = trace_b.table("tokens", _token_columns(trace_b))
    align = align_sequences(tokens_a, tokens_b)
    if not align.pairs:
        raise MoescopeError("no sequence of A has the same token ids as a sequence of B; agreement needs two runs "
                            "over the same tokens (replay one trace's tokens with `moescope capture --replay`)")
    layers = sorted(set(trace_a.moe_layers) & set(trace_b.moe_layers))
    k, n_experts = int(trace_a.top_k), int(trace_a.n_experts)
    limit_a = np.asarray(align.first_pos_a, np.int64) + np.asarray(align.lengths, np.int64)
    limit_b = np.asarray(align.first_pos_b, np.int64) + np.asarray(align.lengths, np.int64)
    pair_a = _pair_lookup([a for a, _ in align.pairs], limit_a)
    pair_b = _pair_lookup([b for _, b in align.pairs], limit_b)
    tkeys, phase_codes, describe = _token_index(tokens_a, pair_a, align)
    logit_a = "router_logits" in trace_a.columns("routes")
    logit_b = "router_logits" in trace_b.columns("routes")
    margin_source = "a" if logit_a else ("b" if logit_b else None)

    counts = AgreementCounts.zeros(len(layers), len(align.pairs))
    misses = np.zeros(len(tkeys), np.int64)  # per aligned token of A: layers that disagree

    def sink(token_keys: np.ndarray, mismatched: np.ndarray) -> None:
        at = np.searchsorted(tkeys, token_keys[mismatched])
        ok = (at < len(tkeys)) & (tkeys[np.minimum(at, len(tkeys) - 1)] == token_keys[mismatched])
        np.add.at(misses, at[ok], 1)

    for li, layer in enumerate(layers):
        ra = _layer_rows(trace_a, layer, pair_a, li, k, with_logits=logit_a)
        rb = _layer_rows(trace_b, layer, pair_b, li, k, with_logits=logit_b and not logit_a)
        at = np.searchsorted(tkeys, ra["token_key"])
        at = np.minimum(at, len(tkeys) - 1)
        phase = np.where(tkeys[at] == ra["token_key"], phase_codes[at], 0)
        part = count_agreement(ra["key"], ra["experts"], rb["key"], rb["experts"],
                               layer_index_a=np.full(len(ra["key"]), li), layer_index_b=np.full(len(rb["key"]), li),
                               n_layers=len(layers), pos_a=ra["pos"], phase_a=phase,
                               margin_a=ra.get("margin"), margin_b=rb.get("margin"), miss_sink=sink,
                               n_pairs=len(align.pairs))
        counts = counts.merge(part)
    top = [int(i) for i in np.argsort(-misses, kind="stable")[:N_WORST] if misses[i] > 0]
    counts.worst = [{**describe(int(tkeys[i])), "n_layers_disagree": int(misses[i])} for i in top]
    values = summarise(counts, layers=layers, k=k, n_experts=n_experts, alignment=align, margin_source=margin_source)
    values["notes"] = _notes(trace_a, trace_b, values)
    figs = _figures(values) if figures else {}
    return AnalysisResult("agreement", values, params={"trace_a": str(trace_a.path), "trace_b": str(trace_b.path)},
                          figures=figs, trace=str(trace_a.path))


def _token_columns(trace: Any) -> list[str]:
    return [c for c in ("seq_id", "pos", "token_id", "phase", "token") if c in trace.columns("tokens")]


def _pair_lookup(seq_ids: list[int], limits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted seq ids, their pair index, their first position past the aligned prefix), for a
    vectorised seq_id -> pair lookup."""
    ids = np.asarray(seq_ids, np.int64)
    order = np.argsort(ids)
    return ids[order], order.astype(np.int64), limits[order]


def _map_pairs(seq: np.ndarray, pos: np.ndarray, lookup: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(pair index, row is in the aligned part of a paired sequence) for (seq id, pos) rows."""
    ids, pairs, limits = lookup
    at = np.minimum(np.searchsorted(ids, seq), len(ids) - 1)
    ok = (ids[at] == seq) & (pos < limits[at])
    return pairs[at], ok


def _token_index(tokens_a: Any, pair_a: tuple, align: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    seq = tokens_a.column("seq_id").to_numpy().astype(np.int64)
    pos = tokens_a.column("pos").to_numpy().astype(np.int64)
    pair, ok = _map_pairs(seq, pos, pair_a)
    key = (pair[ok] << _POS_BITS) | pos[ok]
    phase = (np.asarray(tokens_a.column("phase").to_pylist(), dtype=object)[ok] == "generated").astype(np.int8)
    ids = tokens_a.column("token_id").to_numpy()[ok]
    text = tokens_a.column("token").to_pylist() if "token" in tokens_a.column_names else None
    text = [text[i] for i in np.flatnonzero(ok)] if text is not None else None
    order = np.argsort(key)
    key, phase, ids = key[order], phase[order], ids[order]
    text = [text[i] for i in order] if text is not None else None

    def describe(token_key: int) -> dict[str, Any]:
        p, position = token_key >> _POS_BITS, token_key & ((1 << _POS_BITS) - 1)
        at = int(np.searchsorted(key, token_key))
        found = at < len(key) and key[at] == token_key
        a, b = align.pairs[p]
        return {"seq_id_a": a, "seq_id_b": b, "pos": int(position),
                "token_id": int(ids[at]) if found else None,
                "token": text[at] if found and text is not None else None,
                "phase": ("generated" if phase[at] else "prompt") if found else None}

    return key, phase, describe


def _layer_rows(trace: Any, layer: int, lookup: tuple, li: int, k: int, *,
                with_logits: bool) -> dict[str, np.ndarray]:
    cols = ["seq_id", "pos", "experts"] + (["router_logits"] if with_logits else [])
    table = trace.table("routes", cols, filter=pc.field("layer") == layer)
    seq = table.column("seq_id").to_numpy().astype(np.int64)
    pos = table.column("pos").to_numpy().astype(np.int64)
    if len(pos) and pos.max() >= 1 << _POS_BITS:
        raise MoescopeError(f"{trace.path}: positions of {1 << _POS_BITS} tokens or more are not supported by agreement")
    pair, ok = _map_pairs(seq, pos, lookup) if len(seq) else (seq, np.zeros(0, bool))
    token_key = (pair[ok] << _POS_BITS) | pos[ok]
    rows = {"token_key": token_key, "key": (token_key << _LAYER_BITS) | li, "pos": pos[ok],
            "experts": fixed_width(table.column("experts"), k)[ok]}
    if with_logits:
        rows["margin"] = router_margins(table.column("router_logits"), k)[ok]
    return rows


def _notes(trace_a: Any, trace_b: Any, values: dict[str, Any]) -> list[str]:
    notes = []
    for name, t in (("A", trace_a), ("B", trace_b)):
        if not t.has_weights:
            notes.append(f"trace {name} records no weights: its 'top-1' is the first id as its source returned it "
                         "(the engine's order), not the highest-weight expert")
    if values["n_tokens_unaligned"]:
        notes.append(f"{values['n_tokens_unaligned']:,} tokens are in sequences without a twin in the other trace, "
                     "or after the point where a pair's tokens diverge, and were not compared")
    if "margin" not in values:
        notes.append("neither trace recorded router logits: no margin analysis (capture with --router-scores logits)")
    return notes


def _figures(values: dict[str, Any]) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    layers = values["moe_layers"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(layers) + 2), 3.2))
    x = np.arange(len(layers))
    for off, key, label in ((-0.2, "per_layer_set_agreement", "top-k set"), (0.2, "per_layer_top1_agreement", "top-1")):
        ax.bar(x + off, [v if v is not None else np.nan for v in values[key]], width=0.4, label=label)
    ax.axhline(values["chance_set_agreement"], color="grey", ls=":", lw=1, label="chance (set)")
    ax.set_xticks(x, [str(layer) for layer in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("agreement")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    figs["agreement_per_layer"] = fig
    margin = values.get("margin")
    if margin:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        labels = [f"≥{e:g}" for e in MARGIN_EDGES]
        rates = [v if v is not None else np.nan for v in margin["set_agreement"]]
        ax.plot(range(len(labels)), rates, marker="o")
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
        ax.set_xlabel(f"router margin, k-th − (k+1)-th logit (trace {margin['source'].upper()})")
        ax.set_ylabel("top-k set agreement")
        ax.set_ylim(0, 1.02)
        figs["agreement_by_margin"] = fig
    return figs
