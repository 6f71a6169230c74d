"""The weight read-back proof: the routing moescope records is what the model computed.

For every MoE layer of a model, on real inputs:

1. one ordinary forward (no cache) keeps the input of every MoE block;
2. the block is run again on that input three times with its routed experts made to output
   known vectors (:mod:`moescope.adapters.probes`): ``y_e`` (the adapter's hooks record this
   call), zero, and ``2 y_e``;
3. ``D = out(y) - out(0)`` is, per token, the routed part of the block's output (shared
   experts, dense branches and biases cancel); the ``2 y`` call checks that the block is
   linear in its experts' outputs (else the experts module's own output is decoded);
4. least squares over the y_e recovers, per token, the coefficient of every expert: the
   weight with which its output reached the block's output (post-hoc scales included);
5. these are compared with the ids and weights the family's adapter recorded for that call
   (the very hooks ``moescope capture`` uses), per token and expert.

The proof never re-implements routing: the block's own code routes and combines; the probe
only fixes what each expert outputs. Weights recorded with a zero value (or dropped over
capacity) contribute nothing and are expected to read back as 0. The model is restored on
exit (patched forwards and hooks removed; no parameter is written).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from moescope.adapters.base import Family, MoELayer
from moescope.adapters.probes import ExpertsProbe, first_tensor, probe_for, watched_module
from moescope.adapters.registry import family_for_model
from moescope.errors import UnsupportedModelError

# Largest allowed |decoded - recorded| weight, by the dtype the model computes in. bf16 keeps
# 8 bits of mantissa and the shared/dense outputs it subtracts can be larger than the routed part.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass
class LayerProof:
    """The read-back proof of one MoE layer.

    Attributes:
        layer: trace layer index; path: module path of the MoE block.
        passed: ids and weights read back equal the recorded ones (within `tolerance`).
        experts_match: share of token-expert assignments (non-zero weight, recorded or read
            back) present in both.
        max_weight_error: largest |read-back weight - recorded weight| over tokens and experts.
        tolerance: the allowed error for the model's dtype.
        residual: largest relative part of the routed output the experts' vectors do not explain.
        decoded_at: "block" (the MoE block's output: post-hoc scales included) or "experts"
            (the experts module's output, when the block is not linear in it).
        rows: token positions compared (padding included: the block computes it too); reason: why
            the layer failed ("" when it passed).
        experts_reached: distinct experts (of the `n_experts` routed ones; identity experts not
            counted) read back with a non-zero weight: how much of the layer the inputs exercised.
            The proof checks only experts some token reached; the others could be mislabelled.
        n_experts: routed experts of the layer (E).
        decoded: (rows, E + 1) the weights read back per row and expert (last column: identity
            experts; NaN rows: unobservable), for tests that compare them with a trace; not in JSON.
    """

    layer: int
    path: str
    passed: bool
    experts_match: float
    max_weight_error: float
    tolerance: float
    residual: float
    decoded_at: str
    rows: int
    reason: str = ""
    experts_reached: int = 0
    n_experts: int = 0
    decoded: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class ModelProof:
    """The proof over every MoE layer of a model; `passed` only when every layer passed."""

    model_type: str
    family: str
    dtype: str
    layers: list[LayerProof] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.layers) and all(layer.passed for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "model_type": self.model_type, "family": self.family, "dtype": self.dtype,
                "layers": [{k: v for k, v in dataclasses.asdict(layer).items() if k != "decoded"}
                           for layer in self.layers]}


class _Sink:
    """Collects what the adapter's hooks report, only while `on`."""

    def __init__(self) -> None:
        self.on = False
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []

    def routes(self, layer: MoELayer, ids: torch.Tensor, weights: torch.Tensor | None,
               dropped: torch.Tensor | None = None) -> None:
        if self.on:
            k = ids.shape[-1]
            self.calls.append((ids.detach().reshape(-1, k).clone(),
                               None if weights is None else weights.detach().float().reshape(-1, k).clone(),
                               None if dropped is None else dropped.detach().reshape(-1, k).clone()))

    def router_input(self, layer: MoELayer, hidden: torch.Tensor) -> None:  # not needed by the proof
        pass

    def router_logits(self, layer: MoELayer, logits: torch.Tensor) -> None:
        pass


def _clone(value: Any) -> Any:
    """A copy of a block input that a call cannot change: tensors cloned, KV caches deep-copied
    (a block that writes its keys into a cache would otherwise see them again when re-run)."""
    from transformers.cache_utils import Cache

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Cache):
        return copy.deepcopy(value)
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _model_dtype(model: nn.Module) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _keep_block_inputs(model: nn.Module, paths: list[str]) -> tuple[list[Any], dict[str, tuple]]:
    """Pre-hooks that keep a copy of the first input of each watched module."""
    kept: dict[str, tuple] = {}

    def make(path: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if path not in kept:
                kept[path] = (_clone(args), _clone(kwargs))
        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(make(p), with_kwargs=True) for p in sorted(set(paths))]
    return handles, kept


def forward_without_cache(model: nn.Module, inputs: dict[str, Any]) -> Any:
    """model(**inputs) without a KV cache (so re-running a block cannot grow one)."""
    kwargs = dict(inputs)
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs.setdefault("use_cache", False)
    with torch.no_grad():
        return model(**kwargs)


def prove(model: nn.Module, inputs: dict[str, Any], *, family: Family | None = None,
          layers: list[int] | None = None) -> ModelProof:
    """Run the read-back proof on every MoE layer of `model` for one batch `inputs`.

    Args:
        model: a loaded transformers MoE model (any dtype or device); restored on return.
        inputs: keyword arguments of one forward (input_ids, attention_mask, ...).
        family: the adapter to check (default: the registered one for the model's type).
        layers: trace layer indices to check (default: all).

    Returns:
        A :class:`ModelProof` with one :class:`LayerProof` per MoE layer.

    Raises:
        UnsupportedModelError: the family finds no MoE layer (among `layers`) in the model.
    """
    family = family or family_for_model(model)
    found = [lay for lay in family.find_layers(model) if layers is None or lay.layer in layers]
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE layers moescope can find"
            + (f" among layers {layers}" if layers is not None else "") + "; there is nothing to verify"
        )
    dtype = _model_dtype(model)
    result = ModelProof(getattr(model.config, "model_type", "?"), family.name, str(dtype).replace("torch.", ""))
    watched = {lay.layer: watched_module(model, lay.path) for lay in found}
    handles, kept = _keep_block_inputs(model, [w[0] for w in watched.values()])
    try:
        forward_without_cache(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    identity = family.zero_experts and not family.skip_weightless
    for layer in found:
        path, module = watched[layer.layer]
        if path not in kept:
            result.layers.append(_failed(layer, dtype, "the MoE block did not run in the forward pass"))
            continue
        try:
            probe = probe_for(model.get_submodule(layer.path), layer.n_experts, identity_experts=identity)
        except NotImplementedError as exc:  # a kind of MoE block the proof cannot probe yet: not verified
            result.layers.append(_failed(layer, dtype, str(exc)))
            continue
        result.layers.append(_prove_layer(model, family, layer, module, kept[path], probe, dtype))
    return result


def _failed(layer: MoELayer, dtype: torch.dtype, reason: str) -> LayerProof:
    return LayerProof(layer.layer, layer.path, False, 0.0, float("inf"), TOLERANCE.get(dtype, 6e-2),
                      float("inf"), "block", 0, reason, 0, layer.n_experts)


@torch.no_grad()
def _prove_layer(model: nn.Module, family: Family, layer: MoELayer, module: nn.Module, kept: tuple,
                 probe: ExpertsProbe, dtype: torch.dtype) -> LayerProof:
    args, kwargs = kept
    sink = _Sink()
    tol = TOLERANCE.get(dtype, 6e-2)

    def run(scale: float, only: torch.Tensor | None = None, record: bool = False) -> torch.Tensor:
        with probe.known_outputs(scale, only):
            sink.on = record
            out = first_tensor(module(*_clone(args), **_clone(kwargs))).double()
            sink.on = False
        return out

    handles = family.attach(model, layer, sink, logits=False, hidden=False)
    try:
        run(1.0)
        probe.balance()
        groups = probe.groups()
        zero = run(0.0)
        d1 = run(1.0, groups[0], record=True) - zero
        d2 = run(2.0, groups[0]) - zero
        basis = probe.basis()
        width = basis.shape[1]
        # Decode the block's output when it is linear in the experts' outputs and in their space;
        # else (a norm after the experts, a projection out of the experts' space) the experts module's.
        linear = float((d2 - 2 * d1).abs().max()) <= tol * 2 * max(float(d1.abs().max()), 1e-30)
        decoded_at = "block"
        if not linear or d1.shape[-1] != width:
            if probe.experts_output is None or len(groups) > 1:
                return _failed(layer, dtype, "the block's output is not linear in its experts' outputs")
            d1, decoded_at = probe.experts_output.double(), "experts"
        # More experts than the output has dimensions: one pass per group of experts, the others silent.
        parts = [(groups[0], d1.reshape(-1, width))]
        parts += [(g, (run(1.0, g) - zero).reshape(-1, width)) for g in groups[1:]]
    finally:
        for handle in handles:
            handle.remove()
    if len(sink.calls) != 1:
        return _failed(layer, dtype, f"the adapter reported {len(sink.calls)} routing records for one block call")
    n = parts[0][1].shape[0]
    decoded = np.zeros((n, layer.n_experts + 1))
    residual = 0.0
    for group, routed in parts:
        columns = group.cpu().numpy()
        y = basis[group].cpu().numpy().T  # (H, |group|)
        rank = np.linalg.matrix_rank(y)
        if rank < y.shape[1]:
            return _failed(layer, dtype, f"the experts' outputs are not linearly independent (rank {rank} < {y.shape[1]})")
        target = routed.cpu().numpy().T  # (H, N)
        coef, *_ = np.linalg.lstsq(y, target, rcond=None)
        decoded[:, columns] = coef.T
        norm = np.maximum(np.abs(target).max(axis=0), 1e-30)
        residual = np.maximum(residual, np.abs(target - y @ coef).max(axis=0) / norm)
    observable = None
    if probe.unobservable is not None and probe.unobservable.numel() == n:
        observable = ~probe.unobservable.cpu().numpy()
    return _compare(layer, decoded, np.broadcast_to(residual, (n,)), sink.calls[0], tol, decoded_at, observable)


def _compare(layer: MoELayer, decoded: np.ndarray, residual: np.ndarray, call: tuple, tol: float,
             decoded_at: str, observable: np.ndarray | None = None) -> LayerProof:
    """Compare the weights read back, `decoded` (N, E + 1), with the adapter's record `call`."""
    ids, weights, dropped = call
    n, k = ids.shape
    if weights is None:
        return LayerProof(layer.layer, layer.path, False, 0.0, float("inf"), tol, float("inf"), decoded_at, n,
                          "the adapter records no weights", 0, layer.n_experts)
    if decoded.shape[0] != n:
        return LayerProof(layer.layer, layer.path, False, 0.0, float("inf"), tol, float("inf"), decoded_at, n,
                          f"the adapter recorded {n} tokens but the block computed {decoded.shape[0]}", 0, layer.n_experts)
    recorded = np.zeros((n, layer.n_experts + 1))
    w = weights.double().cpu().numpy()
    keep = np.ones_like(w, dtype=bool) if dropped is None else ~dropped.cpu().numpy().astype(bool)
    col = np.minimum(ids.long().cpu().numpy(), layer.n_experts)  # identity/zero experts share the last column
    rows = np.repeat(np.arange(n), k).reshape(n, k)
    np.add.at(recorded, (rows[keep], col[keep]), w[keep])

    full = decoded.copy()
    if observable is not None:  # rows whose weights cannot show in the output are left out
        full[~observable] = np.nan
        decoded, recorded, residual = decoded[observable], recorded[observable], residual[observable]
        n = int(observable.sum())
    error = float(np.abs(decoded - recorded).max()) if n else 0.0
    worst_residual = float(residual.max()) if n else 0.0
    big = max(1.0, float(np.abs(recorded).max()) if n else 1.0)
    seen_rec, seen_dec = np.abs(recorded) > tol * big, np.abs(decoded) > tol * big
    union = int((seen_rec | seen_dec).sum())
    match = float((seen_rec & seen_dec).sum() / union) if union else 1.0
    reasons = []
    if match < 1.0:
        reasons.append(f"{(1 - match):.1%} of token-expert assignments differ")
    if error > tol * big:
        reasons.append(f"weights differ by up to {error:.3g} (tolerance {tol * big:.3g})")
    if worst_residual > max(tol, 1e-6) * 10:
        reasons.append(f"{worst_residual:.3g} of the routed output is not explained by the experts")
    seen = int((np.abs(decoded[:, : layer.n_experts]) > tol * big).any(axis=0).sum())
    return LayerProof(layer.layer, layer.path, not reasons, match, error, tol * big, worst_residual, decoded_at, n,
                      "; ".join(reasons), seen, layer.n_experts, full)


def text_inputs(model: nn.Module, tokenizer: Any, n_tokens: int = 256, *, rows: int = 4) -> dict[str, torch.Tensor]:
    """One padded batch of about `n_tokens` real tokens of the built-in prompts, for `prove`.

    The texts are the built-in task prompts (moescope/data/prompts/tasks.jsonl), cut into
    `rows` sequences of unequal length so that padding is exercised too. Encoder-decoder models
    get the first tokens of each row (after their decoder start token) as decoder input.
    """
    import json
    from importlib import resources

    from moescope.errors import MoescopeError

    if n_tokens < rows * 2:
        raise MoescopeError(f"--tokens must be at least {rows * 2}, not {n_tokens}")
    lines = resources.files("moescope.data").joinpath("prompts/tasks.jsonl").read_text(encoding="utf-8").splitlines()
    ids: list[int] = []
    for line in lines:
        ids += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    # Unequal rows: lengths in proportion 4:3:2:1 ... so padding shows at several widths.
    shares = np.arange(rows, 0, -1, dtype=float)
    cuts = np.concatenate([[0], np.round(np.cumsum(shares / shares.sum()) * len(ids)).astype(int)])
    seqs = [ids[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[i, span] = torch.tensor(seq)
        mask[i, span] = 1
    device = getattr(model, "device", None) or next(model.parameters()).device  # the embeddings' device
    inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    if getattr(model.config, "is_encoder_decoder", False):
        start = model.config.decoder_start_token_id if model.config.decoder_start_token_id is not None else pad
        dec = input_ids[:, : min(16, width)].clone()
        dec[:, 0] = start
        inputs["decoder_input_ids"] = dec.to(device)
    return inputs
