"""Reading the inputs of the geometry and compare analyses from trace directories.

This is the I/O half of those analyses (the analyses themselves are pure): each function
reads one MoE layer at a time through DuckDB, so memory is bounded by one layer's sample.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from moescope.analysis.compare import align_tokens, analyze_compare, check_comparable, pair_layers
from moescope.analysis.geometry import GeometryParams, LayerTokens, LayerVisits
from moescope.analysis.result import AnalysisResult
from moescope.analysis.routing_sets import list_matrix
from moescope.errors import MoescopeError, TraceError
from moescope.store.reader import Trace


def _arrow(trace: Trace, query: str, params: list | None = None) -> pa.Table:
    return trace.con.sql(query, params=params or []).to_arrow_table()


def _np(table: pa.Table, column: str, dtype: Any = None) -> np.ndarray:
    values = table.column(column).to_numpy(zero_copy_only=False)
    return values if dtype is None else values.astype(dtype)


def hidden_layers(trace: Trace) -> list[int]:
    """MoE layers that have sampled hidden states in the trace."""
    return [int(r[0]) for r in trace.rows("SELECT DISTINCT layer FROM hidden ORDER BY layer")]


def _sample_keys(trace: Trace, layer: int, max_tokens: int, seed: int) -> pa.Table:
    """Up to max_tokens (seq_id, pos) keys with a hidden vector at `layer`, sampled with `seed`."""
    keys = _arrow(trace, "SELECT seq_id, pos FROM hidden WHERE layer = ? ORDER BY seq_id, pos", [layer])
    if keys.num_rows > max_tokens:
        pick = np.sort(np.random.default_rng(seed).choice(keys.num_rows, max_tokens, replace=False))
        keys = keys.take(pa.array(pick))
    return keys


def layer_tokens(trace: Trace, layer: int, params: GeometryParams) -> LayerTokens:
    """The sampled tokens of one layer with hidden states, experts, probs, token ids and phase."""
    keys = _sample_keys(trace, layer, params.max_tokens, params.seed)
    name = f"_geometry_keys_{layer}"
    trace.con.register(name, keys)
    has_probs = "router_probs" in trace.columns("routes")
    has_tokens = trace.has("tokens")
    try:
        table = _arrow(trace, f"""
            SELECT h.seq_id, h.pos, h.hidden, r.experts
                   {', r.router_probs' if has_probs else ''}
                   {', t.token_id, t.phase' if has_tokens else ''}
            FROM hidden h
            JOIN {name} k ON k.seq_id = h.seq_id AND k.pos = h.pos
            JOIN routes r ON r.seq_id = h.seq_id AND r.pos = h.pos AND r.layer = h.layer
            {'LEFT JOIN tokens t ON t.seq_id = h.seq_id AND t.pos = h.pos' if has_tokens else ''}
            WHERE h.layer = ?
            ORDER BY h.seq_id, h.pos""", [layer])
    finally:
        trace.con.unregister(name)
    n = table.num_rows
    probs = None
    if has_probs and table.column("router_probs").null_count == 0 and n:
        probs = list_matrix(table.column("router_probs"), np.float32, fill=0.0)
    token_id = None
    generated = np.zeros(n, dtype=bool)
    if has_tokens:
        ids = table.column("token_id")
        token_id = None if ids.null_count else _np(table, "token_id", np.int64)
        phase = table.column("phase").to_pylist()
        generated = np.array([p == "generated" for p in phase], dtype=bool)
    return LayerTokens(layer=layer, seq_id=_np(table, "seq_id", np.int64), pos=_np(table, "pos", np.int64),
                       token_id=token_id, generated=generated, experts=list_matrix(table.column("experts")),
                       hidden=list_matrix(table.column("hidden"), np.float32, fill=0.0), probs=probs)


def layer_visits(trace: Trace, layer: int, n_experts: int) -> LayerVisits:
    """Expert selection counts of one layer per (sequence, phase, position parity), all tokens."""
    phase = ("coalesce(t.phase, 'prompt') = 'generated'" if trace.has("tokens") else "false")
    join = "LEFT JOIN tokens t ON t.seq_id = r.seq_id AND t.pos = r.pos" if trace.has("tokens") else ""
    table = _arrow(trace, f"""
        SELECT r.seq_id, {phase} AS generated, r.pos % 2 AS half, r.expert, count(*) AS n
        FROM (SELECT seq_id, pos, unnest(experts) AS expert FROM routes WHERE layer = ?) r
        {join}
        GROUP BY ALL""", [layer])
    tokens = _arrow(trace, f"""
        SELECT r.seq_id, {phase} AS generated, r.pos % 2 AS half, count(*) AS n
        FROM routes r {join} WHERE r.layer = ? GROUP BY ALL
        ORDER BY r.seq_id, generated, half""", [layer])
    seq, gen, half = _np(tokens, "seq_id", np.int64), _np(tokens, "generated", bool), _np(tokens, "half", np.int64)
    group_key = seq * 4 + gen * 2 + half  # tokens' rows are sorted by this key
    counts = np.zeros((len(seq), n_experts), dtype=np.int64)
    expert = _np(table, "expert", np.int64)
    ok = expert < n_experts  # ids >= E are a family's zero experts: not routed experts
    key = (_np(table, "seq_id", np.int64) * 4 + _np(table, "generated", bool) * 2 + _np(table, "half", np.int64))[ok]
    np.add.at(counts, (np.searchsorted(group_key, key), expert[ok]), _np(table, "n", np.int64)[ok])
    return LayerVisits(layer=layer, seq_id=seq, generated=gen, half=half, counts=counts,
                       n_tokens=_np(tokens, "n", np.int64))


def geometry_layers(trace: Trace, params: GeometryParams) -> Iterator[tuple[LayerTokens, LayerVisits]]:
    """(tokens, visits) of every MoE layer with hidden states, one layer at a time."""
    if not trace.has("hidden"):
        raise TraceError(f"{trace.path} has no hidden states; capture it again with --hidden-rate 0.25 "
                         "(and --router-scores probs for top-p Jaccard)")
    for layer in hidden_layers(trace):
        yield layer_tokens(trace, layer, params), layer_visits(trace, layer, trace.n_experts)


# -- router weights ------------------------------------------------------------------------------
def _safetensors_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors(.index.json) in a model directory."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: file for name in f.keys()})
    return out


def read_router_weights(model_dir: str | Path, layer_paths: dict[str, str], n_experts: int,
                        router_names: tuple[str, ...] = ("gate", "router")) -> dict[int, np.ndarray]:
    """layer -> (E, H) float32 router matrix, read straight from the checkpoint's safetensors.

    Looks for `<MoE block path>.<router name>.weight`; falls back to loading the model
    through moescope's loader when the checkpoint names its tensors differently.
    """
    model_dir = Path(model_dir)
    files = _safetensors_files(model_dir)
    wanted = {}
    for layer, path in layer_paths.items():
        for name in router_names:
            key = f"{path}.{name}.weight"
            if key in files:
                wanted[int(layer)] = key
                break
    if len(wanted) < len(layer_paths):
        return _router_weights_from_model(model_dir)
    from safetensors import safe_open

    out: dict[int, np.ndarray] = {}
    for layer, key in wanted.items():
        with safe_open(str(files[key]), framework="pt") as f:
            weight = f.get_tensor(key).float().numpy()
        if weight.ndim == 2 and weight.shape[0] == n_experts:
            out[layer] = weight
    return out


def _router_weights_from_model(model_dir: Path) -> dict[int, np.ndarray]:
    from moescope.capture.loading import load_model
    from moescope.adapters.registry import family_for_model

    model, _ = load_model(str(model_dir))
    family = family_for_model(model)
    out = {}
    for moe in family.find_layers(model):
        router = family.router_module(model.get_submodule(moe.path))
        weight = getattr(router, "weight", None)
        if weight is not None and weight.ndim == 2:
            out[moe.layer] = weight.detach().float().cpu().numpy()
    return out


def router_weights_for(trace: Trace, model: str | None) -> tuple[dict[int, np.ndarray], str | None]:
    """Router weights for the trace's layers from --model or the manifest's local model path.

    Returns (weights, note): no weights and a note saying why when none can be read.
    """
    source = model or trace.model.get("name_or_path")
    if not source or not Path(source).is_dir():
        if model:
            raise MoescopeError(f"--model {model} is not a local model directory; pass the directory with config.json")
        return {}, f"router alignment skipped: the trace's model {source!r} is not a local directory (pass --model)"
    paths = trace.model.get("layer_paths") or {}
    try:
        if not paths:
            return _router_weights_from_model(Path(source)), None
        return read_router_weights(source, paths, trace.n_experts), None
    except (MoescopeError, OSError) as exc:
        if model:
            raise MoescopeError(f"cannot read router weights from --model {model} ({exc}); pass the model's "
                                "directory with its safetensors weights") from exc
        return {}, f"router alignment skipped: cannot read router weights from {source} ({exc})"


# -- compare ---------------------------------------------------------------------------------------
def token_arrays(trace: Trace) -> dict[str, np.ndarray]:
    """The tokens table as numpy arrays (seq_id, pos, token_id, generated, char_start, char_end)."""
    if not trace.has("tokens"):
        raise TraceError(f"{trace.path} has no tokens table; comparing traces needs token ids and offsets")
    cols = trace.columns("tokens")
    offsets = "char_start, char_end" if {"char_start", "char_end"} <= set(cols) else "-1 AS char_start, -1 AS char_end"
    table = _arrow(trace, f"SELECT seq_id, pos, token_id, phase = 'generated' AS generated, {offsets} "
                          "FROM tokens ORDER BY seq_id, pos")
    return {"seq_id": _np(table, "seq_id", np.int64), "pos": _np(table, "pos", np.int64),
            "token_id": _np(table, "token_id", np.int64), "generated": _np(table, "generated", bool),
            "char_start": np.nan_to_num(_np(table, "char_start", np.float64), nan=-1).astype(np.int64),
            "char_end": np.nan_to_num(_np(table, "char_end", np.float64), nan=-1).astype(np.int64)}


def sequence_texts(trace: Trace) -> dict[int, str | None]:
    """seq_id -> text."""
    return {int(s): t for s, t in trace.rows("SELECT seq_id, text FROM sequences")}


def layer_experts(trace: Trace, layer: int, seq_id: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(n, k) experts of `layer` at the given (seq_id, pos) keys, in their order (-1 rows: absent)."""
    table = _arrow(trace, "SELECT seq_id, pos, experts FROM routes WHERE layer = ? ORDER BY seq_id, pos", [layer])
    have = (_np(table, "seq_id", np.int64) << 32) | _np(table, "pos", np.int64)
    experts = list_matrix(table.column("experts"))
    want = (seq_id.astype(np.int64) << 32) | pos.astype(np.int64)
    at = np.clip(np.searchsorted(have, want), 0, max(len(have) - 1, 0))
    found = (have[at] == want) if len(have) else np.zeros(len(want), bool)
    out = np.full((len(want), experts.shape[1] if len(experts) else 1), -1, dtype=np.int16)
    out[found] = experts[at[found]]
    return out


def compare_traces(trace_a: Trace, trace_b: Trace, *, seed: int = 0, params: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None, shuffles: int = 20, token_null_max: int | None = None,
                   locations: tuple[str | None, str | None] = (None, None)) -> AnalysisResult:
    """Align two traces' tokens and compare their routing layer by layer (see moescope.analysis.compare).

    Under a counting engine (``with use_engine(RayCounting(num_workers=4)): ...``), workers read
    the routes (:mod:`moescope.analysis.compare_map`; `locations`: where they read each trace's
    shards, default the traces' own paths); the result is identical."""
    from moescope.analysis.engine import current_engine

    check_comparable(trace_a.model, trace_b.model)
    alignment = align_tokens(token_arrays(trace_a), sequence_texts(trace_a),
                             token_arrays(trace_b), sequence_texts(trace_b))
    pairs, note = pair_layers(trace_a.moe_layers, trace_b.moe_layers)
    if note:
        alignment.stats["notes"].append(note)

    def layers() -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        for layer_a, layer_b in pairs:  # one layer pair in memory at a time
            yield (layer_a, layer_b, layer_experts(trace_a, layer_a, alignment.seq_id, alignment.pos_a),
                   layer_experts(trace_b, layer_b, alignment.seq_id, alignment.pos_b))

    engine = current_engine()
    if engine is not None:
        from moescope.analysis.compare_map import engine_layers

        per_layer = engine_layers(engine, alignment, trace_a, trace_b, pairs, locations)
    else:
        per_layer = layers()
    return analyze_compare(alignment, per_layer, n_experts=trace_a.n_experts, top_k=trace_a.top_k, seed=seed,
                           trace=str(trace_a.path), shuffles=shuffles, token_null_max=token_null_max,
                           n_layers=len(pairs),
                           params={"trace_a": str(trace_a.path), "trace_b": str(trace_b.path),
                                   "model_a": trace_a.model.get("name_or_path"),
                                   "model_b": trace_b.model.get("name_or_path"), **(params or {})},
                           extra={"traces": {"a": {"path": str(trace_a.path), "model": trace_a.model.get("name_or_path"),
                                                   "family": trace_a.model.get("family")},
                                             "b": {"path": str(trace_b.path), "model": trace_b.model.get("name_or_path"),
                                                   "family": trace_b.model.get("family")}},
                                  **(extra or {})})
