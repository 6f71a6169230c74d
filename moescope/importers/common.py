"""What every importer shares: requests in, a streaming trace directory out.

A reader (vllm.py, sglang.py) yields :class:`Request` objects, the routing of one request
(or one part of a request) as a serving engine recorded it: expert ids only, no weights.
:func:`import_requests` checks them all first (:func:`scan`: shapes, ids, metadata types),
then writes sequences / tokens / routes in chunks through the same atomic shard writer as a
capture, with ``capture.mode = "import"`` and ``capture.has_weights = false`` and a null
``weights`` column, so every analysis that needs no weights runs on the result.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import pyarrow as pa

import moescope
from moescope.errors import DataError
from moescope.schema import expert_id_type
from moescope.store.manifest import fingerprint, sha256_file
from moescope.store.writer import DEFAULT_SHARD_ROWS, TraceWriter

_SCALARS = {str: "str", bool: "bool", int: "int", float: "float"}
_ARROW = {"str": pa.string(), "bool": pa.bool_(), "int": pa.int64(), "float": pa.float64()}


@dataclass
class Request:
    """The routing of one request (or one part of one) as an engine recorded it.

    Attributes:
        experts: (T, L, k) integer expert ids; row t is the token at positions[t], slot l
            the l-th layer of the source's layer axis. A row of -1 (or any id < 0): the
            engine did not route that token there (prefix-cache hits, padding).
        token_ids: (N,) token ids, N >= T (the last generated token is never fed to the model).
        n_prompt: tokens before this index are the prompt, the rest 'generated'.
        phase: one phase for every token, when the source says so but n_prompt is unknown.
        positions: (N,) position of each token in its request (default 0..N-1).
        metadata: scalar fields for the sequences table (text, request_id, label, ...).
        where: where the request came from, for error messages.
    """

    experts: np.ndarray
    token_ids: np.ndarray | None = None
    n_prompt: int | None = None
    phase: str | None = None
    positions: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    where: str = ""


class Source(Protocol):
    """A readable input: its files, a name for its format, and its requests in order."""

    name: str  # "vllm" | "sglang"
    format: str
    paths: list[Path]

    def requests(self) -> Iterator[Request]: ...


@dataclass
class Summary:
    """What a full pass over a source found (the input is checked whole before writing)."""

    n_requests: int = 0
    n_slots: int = 0  # size of the layer axis of the arrays
    top_k: int = 0  # widest row of valid ids
    max_id: int = -1
    used_slots: set[int] = field(default_factory=set)
    fields: dict[str, str] = field(default_factory=dict)  # metadata field -> str/int/float/bool
    has_tokens: bool = False


def scan(source: Source) -> Summary:
    """Check every request of `source` (shapes, token counts, metadata types); DataError
    naming the request on the first problem."""
    s = Summary()
    tokens_seen: set[bool] = set()
    for req in source.requests():
        ex = req.experts
        if ex.ndim != 3:
            raise DataError(f"{req.where}: routed experts have shape {ex.shape}; expected [tokens, layers, k]")
        if s.n_requests and ex.shape[1] != s.n_slots:
            raise DataError(f"{req.where}: {ex.shape[1]} layers, earlier requests had {s.n_slots}; "
                            "import traces of one model at a time")
        s.n_slots = ex.shape[1]
        valid = ex >= 0
        if valid.any():
            s.top_k = max(s.top_k, int(valid.sum(axis=2).max()))
            s.max_id = max(s.max_id, int(ex.max()))
            s.used_slots.update(np.flatnonzero(valid.any(axis=(0, 2))).tolist())
        tokens_seen.add(req.token_ids is not None)
        if req.token_ids is not None and len(req.token_ids) < len(ex):
            raise DataError(f"{req.where}: {len(ex)} rows of routed experts but only {len(req.token_ids)} tokens; "
                            "the routing must cover the prompt and generated tokens in order")
        for key, value in req.metadata.items():
            if value is None:
                continue
            kind = _SCALARS.get(type(value), "json")
            previous = s.fields.setdefault(key, kind)
            if previous != kind:
                s.fields[key] = "float" if {previous, kind} == {"int", "float"} else "str"
        s.n_requests += 1
    if s.n_requests == 0:
        raise DataError(f"{', '.join(map(str, source.paths))} holds no requests")
    if len(tokens_seen) > 1:
        raise DataError("some requests have token ids and some do not; give token ids for all or none")
    if s.top_k == 0:
        raise DataError("no request has any routed expert (every id is -1)")
    s.has_tokens = tokens_seen == {True}
    return s


def parse_layers(text: str | None) -> list[int] | None:
    """'3-26', '0,2,4' or '3-26,28' -> the layer ids (None for None)."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise DataError(f"--moe-layers {text!r}: give layer ids like 3-26 or 0,2,4") from None
    if len(set(out)) != len(out) or out != sorted(out):
        raise DataError(f"--moe-layers {text!r}: layer ids must be increasing and distinct")
    return out


def import_requests(
    source: Source,
    out: str | Path,
    *,
    slots: list[int] | None = None,
    layers: list[int] | None = None,
    used_slots_only: bool = False,
    model_name: str | None = None,
    n_experts: int | None = None,
    n_layers: int | None = None,
    overwrite: bool = False,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    extra_capture: dict[str, Any] | None = None,
    model: Any = None,
) -> dict[str, Any]:
    """Import every request of `source` into the trace directory `out`; returns the manifest.

    slots: which positions of the source's layer axis to keep (None: all of them, or with
    `used_slots_only` those where some token was routed: sources whose axis covers dense
    layers too). layers: the model layer id of each kept slot (None: the slot's index).
    n_experts: E (None: largest id + 1, with a warning that unused top experts are unseen).
    model: an :class:`~moescope.importers.engine_model.EngineModel` (``--model``): the source's
    layer axis is already its MoE layers; it gives their ids, E, the manifest's model section
    and the tokenizer that writes each token's text.
    """
    summary = scan(source)
    if model is not None:
        layers, n_experts, n_layers = list(model.moe_layers), model.n_experts, model.n_layers
        model_name = model_name or model.name
        if slots is None and summary.n_slots != len(layers):
            raise DataError(f"the routing has {summary.n_slots} layers but {model.name} has {len(layers)} MoE layers")
    if slots is None:
        slots = sorted(summary.used_slots) if used_slots_only else list(range(summary.n_slots))
    elif max(slots) >= summary.n_slots:
        raise DataError(f"--moe-layers names layer {max(slots)} but the routing has {summary.n_slots} layers")
    if layers is None:
        layers = list(slots)
    elif len(layers) != len(slots):
        raise DataError(f"--moe-layers names {len(layers)} layers but the routing has {len(slots)} MoE layers")
    given = n_experts is not None
    if n_experts is None:
        n_experts = summary.max_id + 1
        warnings.warn(f"--n-experts not given: taking E = {n_experts} (largest expert id + 1); "
                      "pass --n-experts so experts never chosen count as dead experts")
    elif summary.max_id >= n_experts:
        raise DataError(f"expert id {summary.max_id} found but --n-experts is {n_experts}; pass the model's E")
    described = {**model.description, "top_k": summary.top_k} if model is not None else {}
    header = {
        "moescope_version": moescope.__version__,
        "model": {"name_or_path": model_name or "unknown", "model_type": None, "family": None, "router": None,
                  "n_layers": n_layers if n_layers is not None else max(layers) + 1, "moe_layers": layers,
                  "n_experts": n_experts, "top_k": summary.top_k, "shared_experts": 0, "zero_experts": False,
                  "capacity_drops": False, **described},
        "capture": {"mode": "import", "source": source.name, "has_weights": False,
                    "expert_order": "as the engine returned them (no weights to order them by)",
                    # Engines return the router's logical expert ids; a dump without its physical-to-logical
                    # map holds physical slots, which `analyze agreement` refuses to compare.
                    "expert_ids": getattr(source, "expert_ids", "logical"),
                    "n_experts_given": given, **(extra_capture or {})},
        "input": {"paths": [str(p) for p in source.paths], "format": source.format, "n_records": summary.n_requests,
                  "sha256": _combined_sha(source.paths), "fields": summary.fields},
    }
    fp = fingerprint({"header": {k: v for k, v in header.items() if k != "moescope_version"}})
    texts = None
    if model is not None and model.tokenizer is not None:
        from moescope.capture.assemble import TokenTexts

        texts = TokenTexts(model.tokenizer)
    builder = _TableBuilder(np.asarray(slots), np.asarray(layers), summary, n_experts, texts)
    with TraceWriter(out, header, fp, shard_rows=shard_rows, overwrite=overwrite) as writer:  # releases its lock
        if writer.complete:
            return writer.manifest
        pending = writer.pending(summary.n_requests)
        for start, reqs in _chunks(source.requests(), pending, rows=max(1, shard_rows // 4)):
            writer.add(builder.tables(start, reqs), input_end=start + len(reqs), n_sequences=len(reqs),
                       input_start=start)
        return writer.finish()


def _combined_sha(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _chunks(requests: Iterator[Request], pending: list[tuple[int, int]], rows: int) -> Iterator[tuple[int, list[Request]]]:
    """(first request index, requests) of about `rows` routes rows each, within the pending
    ranges (a chunk never spans requests already imported)."""
    ranges = iter(pending)
    current = next(ranges, None)
    start, chunk, size = 0, [], 0
    for i, req in enumerate(requests):
        while current is not None and i >= current[1]:
            if chunk:
                yield start, chunk
            chunk, size = [], 0
            current = next(ranges, None)
        if current is None:
            break
        if i < current[0]:
            continue
        if not chunk:
            start = i
        chunk.append(req)
        size += req.experts.shape[0] * req.experts.shape[1]
        if size >= rows:
            yield start, chunk
            chunk, size = [], 0
    if chunk:
        yield start, chunk


class _TableBuilder:
    """sequences / tokens / routes tables of a list of requests, vectorised over all of them."""

    def __init__(self, slots: np.ndarray, layers: np.ndarray, summary: Summary, n_experts: int,
                 token_texts: Any = None) -> None:
        self.slots, self.layers, self.summary = slots, layers.astype(np.uint16), summary
        self.token_texts = token_texts  # token id array -> each token's text, or None
        self.k, self.id_type = summary.top_k, expert_id_type(n_experts)

    def tables(self, first: int, reqs: list[Request]) -> dict[str, pa.Table]:
        seq_ids = np.arange(first, first + len(reqs), dtype=np.uint32)
        out = {"sequences": self._sequences(seq_ids, reqs), "routes": self._routes(seq_ids, reqs)}
        if self.summary.has_tokens:
            out["tokens"] = self._tokens(seq_ids, reqs)
        return out

    def _positions(self, req: Request, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.uint32) if req.positions is None else np.asarray(req.positions[:n], np.uint32)

    def _routes(self, seq_ids: np.ndarray, reqs: list[Request]) -> pa.Table:
        L = len(self.slots)
        ex = np.concatenate([r.experts[:, self.slots, :self.k] for r in reqs]).astype(np.int64)  # (T, L, k)
        n_rows = np.array([len(r.experts) for r in reqs])
        seq = np.repeat(np.repeat(seq_ids, n_rows), L)
        pos = np.repeat(np.concatenate([self._positions(r, len(r.experts)) for r in reqs]), L)
        layer = np.tile(self.layers, len(ex))
        ex = ex.reshape(-1, self.k)
        valid = ex >= 0
        keep = valid.any(axis=1)  # rows the engine did not route (all -1) have no routes row
        ex, valid, seq, pos, layer = ex[keep], valid[keep], seq[keep], pos[keep], layer[keep]
        values = pa.array(ex[valid].astype(np.uint16)).cast(self.id_type)
        offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
        experts = pa.ListArray.from_arrays(offsets, values)
        return pa.table({"seq_id": pa.array(seq, pa.uint32()), "pos": pa.array(pos, pa.uint32()),
                         "layer": pa.array(layer, pa.uint16()), "experts": experts,
                         "weights": pa.nulls(len(ex), pa.list_(pa.float16()))})  # the source recorded none

    def _tokens(self, seq_ids: np.ndarray, reqs: list[Request]) -> pa.Table:
        n_tok = np.array([len(r.token_ids) for r in reqs])
        pos = np.concatenate([self._positions(r, len(r.token_ids)) for r in reqs])
        phase = np.concatenate([_phases(r) for r in reqs])
        ids = np.concatenate([r.token_ids for r in reqs]).astype(np.uint32)
        cols = {"seq_id": pa.array(np.repeat(seq_ids, n_tok), pa.uint32()), "pos": pa.array(pos, pa.uint32()),
                "token_id": pa.array(ids), "phase": pa.array(phase, pa.string())}
        if self.token_texts is not None:
            cols["token"] = pa.array(self.token_texts(ids), pa.string())
        return pa.table(cols)

    def _text(self, req: Request) -> str | None:
        """The request's text: as given, else its prompt decoded by the model's tokenizer."""
        text = _as_str(req.metadata.get("text"))
        tokenizer = getattr(self.token_texts, "tokenizer", None)
        if text is None and tokenizer is not None and req.token_ids is not None and req.n_prompt:
            text = tokenizer.decode([int(t) for t in req.token_ids[:req.n_prompt]], skip_special_tokens=True)
        return text

    def _sequences(self, seq_ids: np.ndarray, reqs: list[Request]) -> pa.Table:
        cols: dict[str, pa.Array] = {"seq_id": pa.array(seq_ids, pa.uint32()),
                                     "text": pa.array([self._text(r) for r in reqs], pa.string())}
        for key, kind in self.summary.fields.items():
            if key == "text":
                continue
            values = [r.metadata.get(key) for r in reqs]
            if kind == "json":
                cols[key] = pa.array([None if v is None else json.dumps(v, sort_keys=True) for v in values], pa.string())
            elif kind == "str":
                cols[key] = pa.array([_as_str(v) for v in values], pa.string())
            else:
                cols[key] = pa.array([None if v is None else (float(v) if kind == "float" else v) for v in values],
                                     _ARROW[kind])
        return pa.table(cols)


def _phases(req: Request) -> np.ndarray:
    n = len(req.token_ids)
    if req.n_prompt is not None:
        return np.where(np.arange(n) < req.n_prompt, "prompt", "generated")
    return np.full(n, req.phase or "prompt")


def _as_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
