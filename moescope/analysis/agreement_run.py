"""`agreement(A, B)`: read two traces, align them, count, summarise, plot.

The counting itself is :mod:`moescope.analysis.agreement` (pure, mergeable); this module
reads the tokens tables once (for the alignment, in the driver), then maps over units of
aligned sequence pairs (:func:`moescope.analysis.trace_pairs.pair_units`: a range of the
sequences of the trace with fewer routes files and the other trace's files holding their
twins), reading all MoE layers from one read of each file (a file of the other trace is read
again only by a second unit whose sequences it also holds). Each unit returns its count arrays (per-pair arrays for its own
pairs only) and its tokens with the most disagreeing layers; the driver adds them up. In
process the units run one after the other (memory: one unit's routes); under a counting engine
(``--engine ray``) they run as Ray tasks. Counts are the same either way, so results are
identical.

Driver memory: both tokens tables (for the alignment) and the count arrays, of which the
per-pair arrays are (aligned pairs × MoE layers).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from moescope.analysis.agreement import (
    MARGIN_EDGES,
    N_WORST,
    AgreementCounts,
    _top_worst,
    align_sequences,
    check_comparable,
    count_agreement,
    fixed_width,
    router_margins,
    summarise,
)
from moescope.analysis.result import AnalysisResult
from moescope.analysis.trace_pairs import RoutesFile, pair_units, read_routes, routes_files
from moescope.errors import MoescopeError

_POS_BITS, _LAYER_BITS = 20, 12  # key = pair << 32 | pos << 12 | layer index


@dataclass(frozen=True)
class AgreementUnit:
    """Some aligned pairs (global indices, ascending; the unit numbers them 0.. in this order)
    and what a worker needs to count them."""

    pair_ids: np.ndarray
    seq_a: np.ndarray  # per pair
    seq_b: np.ndarray
    limit_a: np.ndarray  # first position past the aligned part, per pair
    limit_b: np.ndarray
    token_key: np.ndarray  # sorted (local pair << 20 | pos) of A's aligned tokens
    phase: np.ndarray  # their phase (0 prompt, 1 generated)
    files_a: tuple[RoutesFile, ...]
    files_b: tuple[RoutesFile, ...]


@dataclass(frozen=True)
class AgreementSpec:
    layers: tuple[int, ...]  # the MoE layers both traces have, ascending
    k: int
    logits_a: bool  # margins from A's router logits
    logits_b: bool  # else from B's


@dataclass
class AgreementPart:
    """One unit's counts: pair arrays of its own pairs (in pair_ids order), worst tokens with
    global token keys (pair << 20 | pos)."""

    counts: AgreementCounts
    pair_ids: np.ndarray


def agreement(trace_a: Any, trace_b: Any, *, figures: bool = True,
              locations: tuple[str | None, str | None] = (None, None)) -> AnalysisResult:
    """Routing agreement of two traces of the same model over the same tokens (see the module
    docstring of :mod:`moescope.analysis.agreement`). A's phases and positions label rows.
    `locations`: where a counting engine's workers read each trace's shards (default: the
    traces' own paths; a shared mount or a URI such as ``s3://bucket/trace``)."""
    from moescope.analysis.engine import current_engine
    from moescope.analysis.ray_counts import ShardCounting

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
    for name, t, limit in (("A", trace_a, limit_a), ("B", trace_b, limit_b)):
        if len(limit) and limit.max() > 1 << _POS_BITS:
            raise MoescopeError(f"{t.path}: positions of {1 << _POS_BITS} tokens or more are not supported by agreement")
    pair_a = _pair_lookup([a for a, _ in align.pairs], limit_a)
    tkeys, phase_codes, describe = _token_index(tokens_a, pair_a, align)
    del tokens_a, tokens_b
    logit_a = "router_logits" in trace_a.columns("routes")
    logit_b = "router_logits" in trace_b.columns("routes")
    margin_source = "a" if logit_a else ("b" if logit_b else None)
    spec = AgreementSpec(tuple(layers), k, logit_a, logit_b and not logit_a)
    units = _units(align, limit_a, limit_b, tkeys, phase_codes, trace_a, trace_b, locations)
    engine = current_engine() or ShardCounting()
    counts = engine.map_shards(units, agreement_unit_counts, spec, _add, AgreementCounts.zeros(len(layers), len(align.pairs)))
    counts.worst = [{**describe(w["token_key"]), "n_layers_disagree": w["n_layers_disagree"]} for w in counts.worst]
    values = summarise(counts, layers=layers, k=k, n_experts=n_experts, alignment=align, margin_source=margin_source)
    values["notes"] = _notes(trace_a, trace_b, values)
    figs = _figures(values) if figures else {}
    return AnalysisResult("agreement", values, params={"trace_a": str(trace_a.path), "trace_b": str(trace_b.path)},
                          figures=figs, trace=str(trace_a.path))


def _units(align: Any, limit_a: np.ndarray, limit_b: np.ndarray, tkeys: np.ndarray, phase: np.ndarray,
           trace_a: Any, trace_b: Any, locations: tuple[str | None, str | None]) -> list[AgreementUnit]:
    """The units of :func:`trace_pairs.pair_units` with their pairs' aligned tokens of A."""
    seq_a = np.asarray([a for a, _ in align.pairs], np.int64)
    seq_b = np.asarray([b for _, b in align.pairs], np.int64)
    found = pair_units(routes_files(trace_a, locations[0]), routes_files(trace_b, locations[1]), seq_a, seq_b)
    unit_of_pair = np.full(len(seq_a), -1, np.int64)
    for u, (pairs, _, _) in enumerate(found):
        unit_of_pair[pairs] = u
    token_unit = unit_of_pair[tkeys >> _POS_BITS]
    by_unit = np.argsort(token_unit, kind="stable")  # within a unit: global key order, hence local key order
    bounds = np.searchsorted(token_unit[by_unit], np.arange(len(found) + 1))
    units = []
    for u, (pairs, files_a, files_b) in enumerate(found):
        mine = by_unit[bounds[u]:bounds[u + 1]]
        local = np.searchsorted(pairs, tkeys[mine] >> _POS_BITS)
        key = (local << _POS_BITS) | (tkeys[mine] & ((1 << _POS_BITS) - 1))
        units.append(AgreementUnit(pairs, seq_a[pairs], seq_b[pairs], limit_a[pairs], limit_b[pairs], key,
                                   phase[mine], files_a, files_b))
    return units


def agreement_unit_counts(unit: AgreementUnit, spec: AgreementSpec) -> AgreementPart:
    """The map: the agreement counts of one unit's pairs over every MoE layer, from one read of
    each of its routes files. Pure: reads, never writes."""
    from threadpoolctl import threadpool_limits

    n_pairs, n_layers = len(unit.seq_a), len(spec.layers)
    with threadpool_limits(limits=1):
        ra = _unit_rows(unit.files_a, unit.seq_a, unit.limit_a, spec, with_logits=spec.logits_a)
        rb = _unit_rows(unit.files_b, unit.seq_b, unit.limit_b, spec, with_logits=spec.logits_b)
        tkeys = unit.token_key
        at = np.minimum(np.searchsorted(tkeys, ra["token_key"]), max(len(tkeys) - 1, 0))
        phase = (np.where(tkeys[at] == ra["token_key"], unit.phase[at], 0) if len(tkeys)
                 else np.zeros(len(ra["token_key"]), np.int8))
        misses = np.zeros(len(tkeys), np.int64)  # per aligned token of A: layers that disagree

        def sink(token_keys: np.ndarray, mismatched: np.ndarray) -> None:
            if not len(tkeys):
                return
            j = np.searchsorted(tkeys, token_keys[mismatched])
            ok = (j < len(tkeys)) & (tkeys[np.minimum(j, len(tkeys) - 1)] == token_keys[mismatched])
            np.add.at(misses, j[ok], 1)

        counts = count_agreement(ra["key"], ra["experts"], rb["key"], rb["experts"],
                                 layer_index_a=ra["layer_index"], layer_index_b=rb["layer_index"], n_layers=n_layers,
                                 pos_a=ra["pos"], phase_a=phase, margin_a=ra.get("margin"), margin_b=rb.get("margin"),
                                 miss_sink=sink, n_pairs=n_pairs)
    top = [int(i) for i in np.argsort(-misses, kind="stable")[:N_WORST] if misses[i] > 0]
    mask = (1 << _POS_BITS) - 1  # local pair -> global pair
    counts.worst = [{"token_key": (int(unit.pair_ids[tkeys[i] >> _POS_BITS]) << _POS_BITS) | int(tkeys[i] & mask),
                     "n_layers_disagree": int(misses[i])} for i in top]
    return AgreementPart(counts, unit.pair_ids)


def _add(total: AgreementCounts, part: AgreementPart) -> AgreementCounts:
    """Add one unit's counts into the total in place (its pair arrays into its pairs' rows)."""
    c = part.counts
    for f in fields(total):
        if f.name == "worst":
            continue
        value = getattr(c, f.name)
        if f.name.startswith("pair_"):
            getattr(total, f.name)[part.pair_ids] += value
        else:
            getattr(total, f.name)[...] += value
    total.worst = _top_worst(total.worst + c.worst)
    return total


def _token_columns(trace: Any) -> list[str]:
    return [c for c in ("seq_id", "pos", "token_id", "phase", "token") if c in trace.columns("tokens")]


def _pair_lookup(seq_ids: list[int] | np.ndarray, limits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _unit_rows(files: tuple[RoutesFile, ...], seq_ids: np.ndarray, limits: np.ndarray, spec: AgreementSpec, *,
               with_logits: bool) -> dict[str, np.ndarray]:
    """The routes rows of the unit's pairs (aligned part, MoE layers of `spec`) with their keys
    (local pair << 32 | pos << 12 | layer index)."""
    cols = ["seq_id", "pos", "layer", "experts"] + (["router_logits"] if with_logits else [])
    table = read_routes(files, cols, np.unique(seq_ids))
    seq = table.column("seq_id").to_numpy().astype(np.int64)
    pos = table.column("pos").to_numpy().astype(np.int64)
    layer = table.column("layer").to_numpy().astype(np.int64)
    layers = np.asarray(spec.layers, np.int64)
    li = np.minimum(np.searchsorted(layers, layer), max(len(layers) - 1, 0))
    in_layers = layers[li] == layer if len(layers) else np.zeros(len(layer), bool)
    pair, ok = _map_pairs(seq, pos, _pair_lookup(seq_ids, limits)) if len(seq) else (seq, np.zeros(0, bool))
    ok &= in_layers
    token_key = (pair[ok] << _POS_BITS) | pos[ok]
    rows = {"token_key": token_key, "key": (token_key << _LAYER_BITS) | li[ok], "pos": pos[ok],
            "layer_index": li[ok], "experts": fixed_width(table.column("experts"), spec.k)[ok]}
    if with_logits:
        rows["margin"] = router_margins(table.column("router_logits"), spec.k)[ok]
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
