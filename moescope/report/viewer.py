"""The per-token viewer's data: a bounded sample of a trace, as compact JSON, and expert colours.

The HTML report embeds `viewer_sample(trace).data` through `json_for_script(...)` in a
``<script type="application/json">`` element; ``assets/viewer.js`` renders it with textContent.

Layout of the data (short keys keep the file small; one entry per token, per MoE layer):

    {"E": 64, "k": 8, "layers": [0, 1, ...],
     "colors": ["#rrggbb", ...], "ink": [...],      # background and text colour per expert id
     "none": "#rrggbb", "hasWeights": true,          # colour of tokens without a route
     "seqs": [{"id": 7, "meta": "label: code", "n": 312,
               "text": ["def", " add", ...],          # token texts (null: not recorded)
               "tid": [123, 98, ...],                  # token ids (-1: unknown)
               "phase": "ppppgg",                      # p prompt, g generated, ? unknown
               "e": [[...], ...],                      # per layer: n*k expert ids, -1 = none
               "w": [[...], ...] | null}]}             # per layer: n*k weights in thousandths
"""
from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moescope.store.reader import Trace

# Kelly's 22 colours of maximum contrast, without white and black: distinct at a glance,
# which matters more than beauty when telling experts apart. Used when E <= 20.
KELLY = (
    "#f3c300", "#875692", "#f38400", "#a1caf1", "#be0032", "#c2b280", "#848482", "#008856",
    "#e68fac", "#0067a5", "#f99379", "#604e97", "#f6a600", "#b3446c", "#dcd300", "#882d17",
    "#8db600", "#654522", "#e25822", "#2b3d26",
)
GOLDEN_ANGLE = 137.50776405
NO_EXPERT = "#e5e7eb"  # tokens without a route at the layer


def _luminance(hex_colour: str) -> float:
    """WCAG relative luminance of '#rrggbb'."""
    channels = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def ink_for(background: str) -> str:
    """Black or white text, whichever contrasts more with `background` (WCAG ratio)."""
    lum = _luminance(background)
    return "#000000" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "#ffffff"


def expert_colors(n_experts: int) -> list[str]:
    """One '#rrggbb' background per expert id 0..n_experts-1.

    Up to 20 experts: Kelly's categorical palette. More: a hue wheel stepped by the golden
    angle (neighbouring ids get far-apart hues) with three lightness levels, so that even
    256 experts give colours that differ from their neighbours in the legend.
    """
    if n_experts <= len(KELLY):
        return list(KELLY[:n_experts])
    colours = []
    for i in range(n_experts):
        # Consecutive ids cycle through three lightness levels; within a level, hues step by the
        # golden angle, which keeps every level's hues spread evenly (and all colours distinct).
        hue = ((i // 3) * GOLDEN_ANGLE + (i % 3) * 40) % 360 / 360
        lightness = (0.74, 0.60, 0.86)[i % 3]
        r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.62)
        colours.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return colours


def json_for_script(value: Any) -> str:
    """JSON that is safe inside a <script> element: no '<', '>', '&' or line separators.

    Those characters only occur inside JSON strings, where the \\uXXXX escapes mean the
    same thing, so the parsed value is unchanged while '</script>' or '<!--' cannot appear.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


# At most this many (token, layer, expert) entries go into one viewer: about 6 bytes each in
# the HTML, so ~12 MB. OLMoE (16 layers, top-8) at the defaults (50 x 256 tokens) stays under it;
# models with many layers get fewer sequences rather than a file a browser struggles with.
MAX_ENTRIES = 2_000_000


@dataclass
class ViewerSample:
    """What the viewer shows of a trace and how much was left out.

    Attributes:
        data: the JSON-ready dict described in the module docstring.
        n_sequences: sequences in the trace; `data["seqs"]` holds the first `shown` of them.
        shown: sequences in the sample.
        cut_sequences: sampled sequences cut short (longer than `max_tokens`, or than the budget).
        max_tokens: the per-sequence token limit.
        budget_hit: True when MAX_ENTRIES, not `sequences`, limited the sample.
    """

    data: dict[str, Any]
    n_sequences: int
    shown: int
    cut_sequences: int
    max_tokens: int
    budget_hit: bool = False


def _fixed_lists(column: pa.ChunkedArray, k: int, fill: float) -> np.ndarray:
    """A list column as an (rows, k) array; short or null lists padded with `fill`."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.float64)
    out = np.full((len(arr), k), fill, dtype=np.float64)
    if len(arr) and (lengths == k).all():
        return values.reshape(len(arr), k)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for row in np.flatnonzero(lengths):  # ragged lists are rare (mixed top-k): a plain loop
        n = min(int(lengths[row]), k)
        out[row, :n] = values[starts[row]:starts[row] + n]
    return out


def _meta(row: dict[str, Any]) -> str:
    """'key: value · key: value' of a sequence's metadata columns (values cut to 80 chars)."""
    parts = []
    for key, value in row.items():
        if key in ("seq_id", "text", "generated_text") or value is None:
            continue
        text = str(value)
        parts.append(f"{key}: {text[:80] + '…' if len(text) > 80 else text}")
    return " · ".join(parts)


def _token_rows(trace: Trace, seq_ids: list[int]) -> dict[int, list[tuple]]:
    """seq_id -> [(seq_id, pos, token_id, phase, text), ...] in position order.

    Traces without a tokens table (some imports) get their positions from the routes,
    with unknown ids (-1), phases and texts (None).
    """
    id_list = ",".join(str(s) for s in seq_ids) or "NULL"
    if trace.has("tokens"):
        text = "token" if "token" in trace.columns("tokens") else "NULL::VARCHAR"
        query = (f"SELECT seq_id, pos, token_id::BIGINT, phase, {text} FROM tokens "
                 f"WHERE seq_id IN ({id_list}) ORDER BY seq_id, pos")
    else:
        query = (f"SELECT DISTINCT seq_id, pos, -1::BIGINT, NULL::VARCHAR, NULL::VARCHAR FROM routes "
                 f"WHERE seq_id IN ({id_list}) ORDER BY seq_id, pos")
    rows: dict[int, list[tuple]] = {s: [] for s in seq_ids}
    for row in trace.rows(query):
        rows[int(row[0])].append(row)
    return rows


def _routes(trace: Trace, lengths: dict[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """(experts, weights) of the kept tokens, each (layers, tokens laid end to end, k), -1 where absent.

    Weights are in thousandths (3 decimals as integers: shorter JSON); None when not recorded.
    """
    layers, k = trace.moe_layers, trace.top_k
    seq_ids = sorted(lengths)
    starts = np.cumsum([0] + [lengths[s] for s in seq_ids])
    experts = np.full((len(layers), int(starts[-1]), k), -1, dtype=np.int64)
    has_weights = trace.has_weights and "weights" in trace.columns("routes")
    weights = np.full_like(experts, -1) if has_weights else None
    if not seq_ids:
        return experts, weights
    id_list = ",".join(str(s) for s in seq_ids)
    table = trace.sql(f"SELECT seq_id, pos, layer, experts{', weights' if has_weights else ''} FROM routes "
                      f"WHERE seq_id IN ({id_list}) AND pos < {max(lengths.values())}").to_arrow_table()
    if not table.num_rows:
        return experts, weights
    which = np.searchsorted(seq_ids, table.column("seq_id").to_numpy())
    pos = table.column("pos").to_numpy().astype(np.int64)
    layer = table.column("layer").to_numpy().astype(np.int64)
    # Rows at layers the manifest does not list as MoE layers are ignored (index -1).
    lookup = np.full(max(max(layers), int(layer.max())) + 1, -1)
    lookup[layers] = np.arange(len(layers))
    layer_idx = lookup[layer]
    # Positions count a sequence's tokens from 0 (schema), so pos is the token's index in the sample.
    rows = np.flatnonzero((pos < np.array([lengths[s] for s in seq_ids])[which]) & (layer_idx >= 0))
    at = (layer_idx[rows], starts[which[rows]] + pos[rows])
    experts[at] = _fixed_lists(table.column("experts"), k, -1)[rows]
    if weights is not None:
        w = _fixed_lists(table.column("weights"), k, np.nan)[rows]
        weights[at] = np.where(np.isnan(w), -1, np.rint(w * 1000))
    return experts, weights


def viewer_sample(trace: Trace, *, sequences: int = 50, max_tokens: int = 256,
                  max_entries: int = MAX_ENTRIES) -> ViewerSample:
    """The first `sequences` sequences (by seq_id), each cut to `max_tokens` tokens, with their routes.

    Fewer sequences when their routes would exceed `max_entries` (token, layer, expert) entries;
    the first sequence is always shown, cut to fit if need be.
    """
    layers, k = trace.moe_layers, trace.top_k
    src = "sequences" if trace.has("sequences") else "(SELECT DISTINCT seq_id FROM routes)"
    n_total = int(trace.scalar(f"SELECT count(*) FROM {src}") or 0)
    seq_ids = [int(r[0]) for r in trace.rows(f"SELECT seq_id FROM {src} ORDER BY seq_id LIMIT ?", [sequences])]
    tokens = _token_rows(trace, seq_ids)

    budget = max(1, max_entries // max(1, len(layers) * k))  # tokens the viewer may hold
    kept: dict[int, list[tuple]] = {}
    cut, used, budget_hit = 0, 0, False
    for s in seq_ids:
        want = tokens[s][:max_tokens]
        if len(want) > budget - used:
            budget_hit = True
            if kept:
                break
            want = want[:budget]  # the first sequence is shown, cut to fit
        cut += len(tokens[s]) > len(want)
        kept[s] = want
        used += len(want)

    meta: dict[int, str] = {}
    if trace.has("sequences") and kept:
        listing = ",".join(str(s) for s in kept)
        rows = trace.sql(f"SELECT * FROM sequences WHERE seq_id IN ({listing})").to_arrow_table().to_pylist()
        meta = {int(r["seq_id"]): _meta(r) for r in rows}
    experts, weights = _routes(trace, {s: len(rows) for s, rows in kept.items()})

    seqs, start = [], 0
    for s, rows in kept.items():
        n = len(rows)
        span = slice(start, start + n)
        start += n
        seqs.append({
            "id": s,
            "meta": meta.get(s, ""),
            "n": n,
            "text": [r[4] for r in rows],
            "tid": [int(r[2]) if r[2] is not None else -1 for r in rows],
            "phase": "".join({"prompt": "p", "generated": "g"}.get(r[3], "?") for r in rows),
            "e": experts[:, span].reshape(len(layers), -1).tolist(),
            "w": None if weights is None else weights[:, span].reshape(len(layers), -1).tolist(),
        })
    colours = expert_colors(max(trace.n_experts, int(experts.max(initial=-1)) + 1))
    data = {
        "E": trace.n_experts,
        "k": k,
        "layers": layers,
        "colors": colours,
        "ink": [ink_for(c) for c in colours],
        "none": NO_EXPERT,
        "hasWeights": weights is not None,
        "seqs": seqs,
    }
    return ViewerSample(data=data, n_sequences=n_total, shown=len(kept), cut_sequences=cut,
                        max_tokens=max_tokens, budget_hit=budget_hit)
