"""`analyze compare` on a counting engine (``--engine ray``): the routes of the aligned tokens
read by workers, one range of sequences per task, instead of one DuckDB query per MoE layer
and trace in the driver.

The evaluation is the single-process one, unchanged (:func:`compare.analyze_compare`): its
cross-fitted matching and its two shuffle nulls (matched chance, token-identity null) pair
B's expert sets with A's token by token, which no fixed set of count arrays reproduces
exactly. So each task returns, per MoE layer pair, the (n, k) expert sets of A and B at its
aligned tokens; on Ray these stay in the object store (spilled to disk when large) and the
driver fetches one layer pair at a time. Results are identical to the single-process run by
construction (the same arrays, in the same row order, go into the same code).

Driver memory: the token alignment (a few int64 per aligned token, as in the
single-process run) and one layer pair's expert sets (2 · n · k int16), as in the
single-process run; never the routes of every layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from moescope.analysis.compare import Alignment
from moescope.analysis.routing_sets import list_matrix
from moescope.analysis.trace_pairs import RoutesFile, pair_units, read_routes, routes_files
from moescope.store.reader import Trace


@dataclass(frozen=True)
class CompareUnit:
    """Aligned tokens of one range of sequences: their rows in the alignment, their keys, and
    the routes files of A and B holding them."""

    rows: np.ndarray  # indices into the alignment (the driver scatters results back there)
    seq_id: np.ndarray
    pos_a: np.ndarray
    pos_b: np.ndarray
    files_a: tuple[RoutesFile, ...]
    files_b: tuple[RoutesFile, ...]


@dataclass(frozen=True)
class CompareSpec:
    """The MoE layer pairs to read (A's layer, B's layer)."""

    pairs: tuple[tuple[int, int], ...]


def compare_units(alignment: Alignment, trace_a: Trace, trace_b: Trace, locations: tuple[str | None, str | None] = (None, None)
                  ) -> list[CompareUnit]:
    """The units of :func:`trace_pairs.pair_units` over the aligned sequences (the same seq_id
    in both traces), with their aligned tokens."""
    seqs, seq_index = np.unique(alignment.seq_id, return_inverse=True)
    found = pair_units(routes_files(trace_a, locations[0]), routes_files(trace_b, locations[1]), seqs, seqs)
    unit_of_seq = np.full(len(seqs), -1, np.int64)
    for u, (members, _, _) in enumerate(found):
        unit_of_seq[members] = u
    row_unit = unit_of_seq[seq_index.reshape(-1)]
    by_unit = np.argsort(row_unit, kind="stable")
    bounds = np.searchsorted(row_unit[by_unit], np.arange(len(found) + 1))
    units = []
    for u, (_, files_a, files_b) in enumerate(found):
        rows = by_unit[bounds[u]:bounds[u + 1]]
        units.append(CompareUnit(rows, alignment.seq_id[rows], alignment.pos_a[rows], alignment.pos_b[rows],
                                 files_a, files_b))
    return units


def _experts_at(files: tuple[RoutesFile, ...], seq_id: np.ndarray, pos: np.ndarray, layers: list[int]
                ) -> list[np.ndarray]:
    """Per layer: (n, width) experts (int16) at the (seq_id, pos) keys, -1 rows where absent.
    What routing_inputs.layer_experts returns for these keys, from the unit's files."""
    table = read_routes(files, ["seq_id", "pos", "layer", "experts"], np.unique(seq_id))
    key = (table.column("seq_id").to_numpy().astype(np.int64) << 32) | table.column("pos").to_numpy().astype(np.int64)
    layer = table.column("layer").to_numpy().astype(np.int64)
    experts = list_matrix(table.column("experts"))
    want = (seq_id.astype(np.int64) << 32) | pos.astype(np.int64)
    out = []
    for target in layers:
        mine = np.flatnonzero(layer == target)
        order = mine[np.argsort(key[mine], kind="stable")]
        have = key[order]
        at = np.clip(np.searchsorted(have, want), 0, max(len(have) - 1, 0))
        found = (have[at] == want) if len(have) else np.zeros(len(want), bool)
        width = experts.shape[1] if len(order) else 1
        part = np.full((len(want), width), -1, dtype=np.int16)
        part[found] = experts[order[at[found]]]
        out.append(part)
    return out


def compare_unit_experts(unit: CompareUnit, spec: CompareSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    """The map: per layer pair of `spec`, (experts of A, experts of B) at the unit's aligned
    tokens, rows in the unit's order. Pure: reads, never writes."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        ea = _experts_at(unit.files_a, unit.seq_id, unit.pos_a, [a for a, _ in spec.pairs])
        eb = _experts_at(unit.files_b, unit.seq_id, unit.pos_b, [b for _, b in spec.pairs])
    return list(zip(ea, eb))


def _place(n: int, units: list[CompareUnit], parts: list[np.ndarray]) -> np.ndarray:
    """The units' rows scattered back into alignment order (padded with -1 to the widest)."""
    width = max((p.shape[1] for p in parts), default=1)
    out = np.full((n, width), -1, dtype=np.int16)
    for unit, part in zip(units, parts):
        out[unit.rows, :part.shape[1]] = part
    return out


def engine_layers(engine: Any, alignment: Alignment, trace_a: Trace, trace_b: Trace,
                  pairs: list[tuple[int, int]], locations: tuple[str | None, str | None] = (None, None)
                  ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(layer_a, layer_b, experts_a, experts_b) of every layer pair, as routing_inputs.compare_traces
    yields them, with the routes read by `engine`'s workers (one layer pair in the driver at a time)."""
    units = compare_units(alignment, trace_a, trace_b, locations)
    n = len(alignment)
    for (layer_a, layer_b), parts in zip(pairs, engine.map_gather(units, compare_unit_experts, CompareSpec(tuple(pairs)),
                                                                  len(pairs))):
        yield (layer_a, layer_b, _place(n, units, [p[0] for p in parts]), _place(n, units, [p[1] for p in parts]))
