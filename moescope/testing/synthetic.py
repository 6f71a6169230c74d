"""Synthetic traces with PLANTED routing structure, for known-answer tests and benchmarks.

Every generator writes a complete trace directory in the documented format (the same shard
writer as a capture), so analyses cannot tell it from a real one. The routing model, per MoE
layer l and token t of a sequence with label y:

    score[t, e] = token_strength * T_l[token_id(t), e]      (routing that follows the token id)
                + strength * B_l[y, e]   if l in biased_layers (routing that follows the label)
                + noise * Gumbel(0, 1)                         (independent per token and expert)

and the token's experts are the top-k scores (descending), its weights their softmax. T_l and
B_l are fixed standard-normal tables drawn from `seed`. With noise > 0 and no other term the
top-k is a uniform random k-subset ("Gumbel top-k" sampling without replacement). Further plants:

- label_vocab: the fraction of a sequence's tokens drawn from its label's own slice of the
  vocabulary (0: every label draws from the same vocabulary, so token ids carry no label);
- tied_pairs: (a, b) always chosen together (the lowest-scoring other choice makes room);
- chained_layers: layer l's experts are layer l-1's experts shifted by chain_shift (mod E),
  a deterministic layer-to-layer mapping;
- dead_experts: never chosen in any layer;
- generated / generated_bias: tokens appended with phase 'generated', whose scores get
  +generated_bias on experts 0..k-1.

:func:`stream_trace` writes arbitrarily large traces chunk by chunk (memory bounded by the
chunk), for benchmarks.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from moescope.store.tables import write_trace

__all__ = ["SyntheticSpec", "labelled_trace", "null_trace", "token_routed_trace", "stream_trace", "generate_tables"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that defines a synthetic trace (see the module docstring for the model)."""

    n_seq: int = 80
    seq_len: int = 32
    layers: int = 4
    n_experts: int = 16
    top_k: int = 2
    labels: tuple[str, ...] = ("a", "b", "c", "d")
    biased_layers: tuple[int, ...] = ()
    strength: float = 1.0
    token_strength: float = 0.0
    noise: float = 1.0
    vocab: int = 256
    label_vocab: float = 0.0
    tied_pairs: tuple[tuple[int, int], ...] = ()
    chained_layers: tuple[int, ...] = ()
    chain_shift: int = 1
    dead_experts: tuple[int, ...] = ()
    generated: int = 0
    generated_bias: float = 0.0
    weights: bool = True
    tokens: bool = True
    seed: int = 0
    layer_ids: tuple[int, ...] | None = field(default=None)  # model layer index of each MoE layer

    @property
    def moe_layers(self) -> list[int]:
        return list(self.layer_ids) if self.layer_ids is not None else list(range(self.layers))

    def model(self) -> dict[str, Any]:
        return {"name_or_path": "synthetic", "model_type": "synthetic", "n_experts": self.n_experts,
                "top_k": self.top_k, "moe_layers": self.moe_layers, "n_layers": max(self.moe_layers) + 1}


class _Tables:
    """The fixed random tables of a spec (token and label preferences per layer)."""

    def __init__(self, spec: SyntheticSpec) -> None:
        rng = np.random.default_rng([spec.seed, 1])
        shape = (spec.layers, spec.vocab, spec.n_experts)
        self.token_pref = rng.standard_normal(shape, dtype=np.float32) if spec.token_strength else None
        self.label_pref = rng.standard_normal((spec.layers, len(spec.labels), spec.n_experts), dtype=np.float32)
        # Vocabulary slices: slice 0 is shared, slice 1 + i belongs to label i.
        self.slices = np.array_split(np.arange(spec.vocab), len(spec.labels) + 1)


def _label_of(spec: SyntheticSpec, seq_ids: np.ndarray) -> np.ndarray:
    # Round-robin labels: balanced classes, and any prefix of the sequences is balanced too.
    return (seq_ids % len(spec.labels)).astype(np.int64)


def _draw_tokens(spec: SyntheticSpec, tab: _Tables, rng: np.random.Generator, label_idx: np.ndarray) -> np.ndarray:
    n_tok = spec.seq_len + spec.generated
    ids = rng.integers(0, spec.vocab, size=(len(label_idx), n_tok))
    if spec.label_vocab > 0:
        own = rng.random((len(label_idx), n_tok)) < spec.label_vocab
        for i in range(len(spec.labels)):
            slice_ = tab.slices[i + 1]
            rows = own & (label_idx[:, None] == i)
            ids[rows] = rng.choice(slice_, size=int(rows.sum()))
    return ids


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, ordered by score descending."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _tie(experts: np.ndarray, pairs: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Force each tied pair to appear together: where one is chosen and not the other, the
    partner replaces the lowest-ranked choice that is not itself in a tied pair."""
    tied = {e for pair in pairs for e in pair}
    k = experts.shape[1]
    for a, b in pairs:
        has_a, has_b = (experts == a).any(1), (experts == b).any(1)
        for present, missing in ((has_a & ~has_b, b), (has_b & ~has_a, a)):
            rows = np.flatnonzero(present)
            if len(rows) == 0:
                continue
            free = ~np.isin(experts[rows], list(tied))
            # the last free slot (lowest rank) makes room
            slot = k - 1 - np.argmax(free[:, ::-1], axis=1)
            experts[rows, slot] = missing
    return experts


def generate_tables(spec: SyntheticSpec, seq_ids: np.ndarray, tab: _Tables | None = None) -> dict[str, pa.Table]:
    """The sequences, tokens and routes tables of the sequences `seq_ids` (deterministic per id)."""
    tab = tab or _Tables(spec)
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    rng = np.random.default_rng([spec.seed, 2, int(seq_ids[0]), len(seq_ids)])
    label_idx = _label_of(spec, seq_ids)
    n_tok = spec.seq_len + spec.generated
    token_ids = _draw_tokens(spec, tab, rng, label_idx)  # (S, T)
    flat_tok = token_ids.reshape(-1)
    flat_lab = np.repeat(label_idx, n_tok)
    generated = np.tile(np.arange(n_tok) >= spec.seq_len, len(seq_ids))
    E, k = spec.n_experts, spec.top_k
    experts_by_layer, weights_by_layer = [], []
    for li in range(spec.layers):
        if li in spec.chained_layers and li > 0:
            experts = (experts_by_layer[-1].astype(np.int64) + spec.chain_shift) % E
            experts_by_layer.append(experts.astype(np.uint8))
            weights_by_layer.append(weights_by_layer[-1])
            continue
        scores = spec.noise * rng.gumbel(size=(len(flat_tok), E)).astype(np.float32) if spec.noise else \
            np.zeros((len(flat_tok), E), np.float32)
        if tab.token_pref is not None:
            scores += spec.token_strength * tab.token_pref[li][flat_tok]
        if li in spec.biased_layers:
            scores += spec.strength * tab.label_pref[li][flat_lab]
        if spec.generated_bias and generated.any():
            scores[np.ix_(generated, np.arange(k))] += spec.generated_bias
        if spec.dead_experts:
            scores[:, list(spec.dead_experts)] = -np.inf
        experts = _top_k(scores, k)
        if spec.tied_pairs:
            experts = _tie(experts, spec.tied_pairs)
        chosen = np.take_along_axis(scores, experts, axis=1)
        w = np.exp(chosen - chosen.max(axis=1, keepdims=True))
        weights_by_layer.append((w / w.sum(axis=1, keepdims=True)).astype(np.float16))
        experts_by_layer.append(experts.astype(np.uint8))
    return _assemble(spec, seq_ids, label_idx, token_ids, experts_by_layer, weights_by_layer)


def _assemble(spec, seq_ids, label_idx, token_ids, experts_by_layer, weights_by_layer) -> dict[str, pa.Table]:  # noqa: ANN001
    S, T = token_ids.shape
    k, L = spec.top_k, spec.layers
    seq_col = np.repeat(seq_ids, T).astype(np.uint32)
    pos_col = np.tile(np.arange(T), S).astype(np.uint32)
    labels = np.asarray(spec.labels, dtype=object)[label_idx]
    sequences = pa.table({"seq_id": pa.array(seq_ids.astype(np.uint32)),
                          "text": pa.array([f"synthetic {lab} #{i}" for lab, i in zip(labels, seq_ids)]),
                          "label": pa.array(labels.tolist(), pa.string())})
    phase = np.where(np.tile(np.arange(T) >= spec.seq_len, S), "generated", "prompt")
    tokens = pa.table({"seq_id": seq_col, "pos": pos_col, "token_id": token_ids.reshape(-1).astype(np.uint32),
                       "phase": pa.array(phase).dictionary_encode().cast(pa.string()),
                       "token": pa.array(np.char.add("t", token_ids.reshape(-1).astype(str)))})
    # Routes rows ordered (seq_id, pos, layer) like a capture.
    experts = np.stack(experts_by_layer, axis=1).reshape(-1, k)  # (S*T*L, k)
    n = len(experts)
    routes = {
        "seq_id": np.repeat(seq_col, L),
        "pos": np.repeat(pos_col, L),
        "layer": np.tile(np.asarray(spec.moe_layers, np.uint16), S * T),
        "experts": pa.FixedSizeListArray.from_arrays(pa.array(experts.reshape(-1)), k).cast(pa.list_(pa.uint8())),
    }
    if spec.weights:
        w = np.stack(weights_by_layer, axis=1).reshape(-1)
        routes["weights"] = pa.FixedSizeListArray.from_arrays(pa.array(w, pa.float16()), k).cast(pa.list_(pa.float16()))
    assert n == S * T * L
    return {"sequences": sequences, "tokens": tokens if spec.tokens else None, "routes": pa.table(routes)}


def _write(spec: SyntheticSpec, path: str | Path, overwrite: bool) -> Path:
    tables = generate_tables(spec, np.arange(spec.n_seq))
    write_trace(path, routes=tables["routes"], tokens=tables["tokens"], sequences=tables["sequences"],
                model=spec.model(), capture={"mode": "synthetic", "synthetic": _spec_json(spec)}, overwrite=overwrite)
    return Path(path)


def _spec_json(spec: SyntheticSpec) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}


def labelled_trace(path: str | Path, *, overwrite: bool = True, **spec: Any) -> Path:
    """Write a trace whose labels bias expert choice in `biased_layers` only (others: pure noise
    unless other plants are asked for). Keyword arguments are :class:`SyntheticSpec` fields;
    defaults: 80 sequences of 32 tokens, 4 layers, E=16, k=2, labels a-d, strength 1. Returns the path."""
    spec.setdefault("biased_layers", (2,))
    return _write(_spec(spec), path, overwrite)


def null_trace(path: str | Path, *, overwrite: bool = True, **spec: Any) -> Path:
    """Write a labelled trace with no structure at all: uniform random top-k, tokens independent of
    labels. Any structure an analysis finds here is a false positive. Returns the path."""
    spec.update(biased_layers=(), token_strength=0.0, label_vocab=0.0)
    return _write(_spec(spec), path, overwrite)


def token_routed_trace(path: str | Path, *, overwrite: bool = True, **spec: Any) -> Path:
    """Write a trace whose routing is a pure function of the token id (no noise, no label term)
    while the labels use partly different vocabularies (label_vocab, default 0.5), so
    signatures separate labels only through the tokens. Returns the path."""
    spec.setdefault("label_vocab", 0.5)
    spec.update(noise=0.0, biased_layers=(), token_strength=spec.get("token_strength") or 1.0)
    return _write(_spec(spec), path, overwrite)


def _spec(kwargs: dict[str, Any]) -> SyntheticSpec:
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
    return replace(SyntheticSpec(), **kwargs)


def _chunks(n_seq: int, per_chunk: int) -> Iterator[np.ndarray]:
    for start in range(0, n_seq, per_chunk):
        yield np.arange(start, min(start + per_chunk, n_seq))


def stream_trace(path: str | Path, *, rows: int, chunk_rows: int = 1 << 20, shard_rows: int = 1 << 21,
                 overwrite: bool = True, **spec: Any) -> dict[str, Any]:
    """Write a trace of about `rows` token-layer rows chunk by chunk through the shard writer,
    so memory stays bounded by `chunk_rows` whatever `rows` is. Keyword arguments are
    :class:`SyntheticSpec` fields (n_seq is derived from rows). Returns the manifest."""
    from moescope.store.manifest import fingerprint
    from moescope.store.writer import TraceWriter

    base = _spec(spec)
    per_seq = (base.seq_len + base.generated) * base.layers
    base = replace(base, n_seq=max(len(base.labels), math.ceil(rows / per_seq)))
    header = {"model": {"shared_experts": 0, **base.model()},
              "capture": {"mode": "synthetic", "has_weights": base.weights, "synthetic": _spec_json(base)}}
    writer = TraceWriter(path, header, fingerprint(header), shard_rows=shard_rows, overwrite=overwrite)
    tab = _Tables(base)
    for ids in _chunks(base.n_seq, max(1, chunk_rows // per_seq)):
        tables = generate_tables(base, ids, tab)
        writer.add(tables, input_end=int(ids[-1]) + 1, n_sequences=len(ids))
    return writer.finish()
