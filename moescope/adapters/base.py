"""What an adapter is: how to find a family's MoE layers and hook what its experts receive.

An adapter never re-implements routing. It hooks the tensors the model itself hands to its
experts computation, so the record is, by construction, what the model used. Most families
in transformers 5 share one contract (``experts(hidden (N,H), top_k_index (N,k),
top_k_weights (N,k))``); the base :class:`Family` captures all of them, and families that
route differently subclass it and override :meth:`Family.find_layers` / :meth:`Family.attach`.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")
_ENDS_WITH_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.\d+$")


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer of a loaded model.

    Attributes:
        layer: index recorded in the trace (decoder layer index; for encoder-decoder models,
            encoder layers first, then decoder layers offset by the encoder's depth).
        path: module path of the MoE block (e.g. ``model.layers.3.mlp``).
        stack: module path of the stack (the module receiving input_ids) that runs this layer.
        n_experts: routed experts E (ids 0..E-1; ids >= E are the family's zero experts).
        top_k: experts chosen per token k.
        n_shared: always-on shared experts (not recorded per token).
    """

    layer: int
    path: str
    stack: str
    n_experts: int
    top_k: int
    n_shared: int = 0


class RoutingSink(Protocol):
    """What hooks report to (the recorder). Tensors are on the model's device, unmodified."""

    def routes(self, layer: MoELayer, ids: torch.Tensor, weights: torch.Tensor | None,
               dropped: torch.Tensor | None = None) -> None: ...

    def router_input(self, layer: MoELayer, hidden: torch.Tensor) -> None: ...

    def router_logits(self, layer: MoELayer, logits: torch.Tensor) -> None: ...


def _per_layer(value: Any, index: int) -> int:
    """An int setting that some configs give per layer (a list indexed by layer)."""
    if isinstance(value, (list, tuple)):
        return int(value[index] if index < len(value) else value[-1])
    return int(value)


def first_attr(obj: Any, names: tuple[str, ...], default: Any = None) -> Any:
    """The first attribute of `obj` among `names` that is set (not None); a dotted name
    (``ffn_config.moe_num_experts``) reads a nested config."""
    for name in names:
        value = obj
        for part in name.split("."):
            value = getattr(value, part, None)
        if value is not None:
            return value
    return default


def layer_index(path: str) -> int:
    """The decoder layer index in a module path like ``model.layers.3.mlp.experts``."""
    m = _LAYER_INDEX.search(path)
    if not m:
        raise ValueError(f"cannot find a layer index in module path {path!r}")
    return int(m.group(1))


def takes_token_input(module: nn.Module) -> bool:
    """Whether a module's forward receives token ids or embeddings (i.e. it is a stack)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "input_ids" in params or "inputs_embeds" in params


def stack_of(model: nn.Module, path: str) -> str:
    """Path of the nearest ancestor of `path` whose forward takes input_ids (the stack).

    Decoder layers are never stacks, even when they take input_ids (DeepSeek-V4 passes them
    down for hash routing): a stack is what runs the layer list.
    """
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        candidate = ".".join(parts[:cut])
        if _ENDS_WITH_LAYER_INDEX.search(candidate):
            continue
        module = model.get_submodule(candidate) if candidate else model
        if takes_token_input(module):
            return candidate
    return ""


def text_config(config: Any) -> Any:
    """The config that describes the language model (multimodal configs nest it)."""
    for name in ("text_config", "language_config", "llm_config"):
        sub = getattr(config, name, None)
        if sub is not None and not isinstance(sub, dict):
            return sub
    return config


def _hook_args(args: tuple, kwargs: dict, names: tuple[str, ...]) -> list[Any]:
    """Positional-or-keyword arguments of a hooked call, by position then by name."""
    out = list(args[: len(names)])
    for name in names[len(out):]:
        out.append(kwargs.get(name))
    return out


@dataclass(frozen=True)
class Family:
    """An architecture family: the model types it covers and how to capture its routing.

    Attributes:
        name: human name (e.g. "DeepSeek-V3").
        model_types: the ``config.model_type`` values this adapter handles.
        router: how the family routes, in words (softmax/sigmoid, renormalised, grouped ...).
        score_function: maps router logits to probabilities: "softmax" or "sigmoid".
        router_names: child names of the MoE block that hold the router.
        experts_names: child names of the MoE block that hold the routed experts.
        notes: anything a user should know (zero experts, capacity drops, ...).
        experts_classes: class names that follow the experts contract without the transformers
            decorator (e.g. DbrxExperts).
        weight_scale: for families whose MoE block rescales the routed output after the experts
            call, config -> the factor; recorded weights are the contract's times it, so they
            are what multiplies each expert's output.
        skip_weightless: a slot with weight exactly 0 means "no expert" (zaya's skip class);
            it is recorded as id E.
        exclude_paths: module path prefixes whose experts are not recorded (with the reason in notes).
        unverified_reason: why the read-back proof fails for this family, when the cause is known
            (whether it passes is computed, see moescope/adapters/verified.json).
    """

    name: str
    model_types: tuple[str, ...]
    router: str
    score_function: str = "softmax"
    router_names: tuple[str, ...] = ("gate", "router")
    experts_names: tuple[str, ...] = ("experts",)
    n_experts_attrs: tuple[str, ...] = (
        "num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "num_routed_experts",
    )
    top_k_attrs: tuple[str, ...] = (
        "num_experts_per_tok", "moe_topk", "top_k", "moe_k", "num_experts_per_token", "top_k_experts",
    )
    shared_attrs: tuple[str, ...] = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
    zero_experts: bool = False
    capacity: bool = False
    notes: str = ""
    experts_classes: tuple[str, ...] = ()
    weight_scale: Callable[[Any], float] | None = None
    skip_weightless: bool = False
    fixed_top_k: int | None = None
    exclude_paths: tuple[str, ...] = ()
    unverified_reason: str = ""

    # -- discovery -----------------------------------------------------------------------
    def is_experts(self, name: str, module: nn.Module) -> bool:
        """Whether `module` (at dotted path `name`) is a routed-experts module of this family.

        Experts of vision or audio towers are left out: they never see text tokens.
        """
        if name.rsplit(".", 1)[-1] not in self.experts_names or _NON_TEXT.search(name):
            return False
        if any(name.startswith(prefix) for prefix in self.exclude_paths):
            return False
        return is_contract_experts(module) or type(module).__name__ in self.experts_classes

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        """The model's MoE layers, in model order."""
        cfg = text_config(model.config)
        layers = []
        for name, module in model.named_modules():
            if not self.is_experts(name, module):
                continue
            block = name.rsplit(".", 1)[0]
            index = layer_index(block)
            n_experts = first_attr(module, ("num_experts",), None) or first_attr(cfg, self.n_experts_attrs)
            layers.append(
                MoELayer(
                    layer=index,
                    path=block,
                    stack=stack_of(model, block),
                    n_experts=_per_layer(n_experts, index),
                    top_k=self.top_k(model.get_submodule(block), cfg, index),
                    n_shared=self.n_shared(model, block, cfg),
                )
            )
        return number_across_stacks(model, layers)

    def top_k(self, block: nn.Module, cfg: Any, index: int = 0) -> int:
        """Experts per token at this block: the router's own setting first, then the config's."""
        if self.fixed_top_k:
            return self.fixed_top_k
        router = self.router_module(block)
        k = first_attr(router, ("top_k",), None) if router is not None else None
        return _per_layer(k or first_attr(block, ("top_k",), None) or first_attr(cfg, self.top_k_attrs), index)

    def n_shared(self, model: nn.Module, block: str, cfg: Any) -> int:
        """Always-on shared experts of a block (from the config, else from its modules)."""
        declared = first_attr(cfg, self.shared_attrs, None)
        if declared is not None:
            return int(declared)
        parent = model.get_submodule(block.rsplit(".", 1)[0]) if "." in block else model
        for owner in (model.get_submodule(block), parent):
            for name in ("shared_experts", "shared_expert", "shared_mlp"):
                if isinstance(getattr(owner, name, None), nn.Module):
                    return 1
        return 0

    def router_module(self, block: nn.Module) -> nn.Module | None:
        for name in self.router_names:
            sub = getattr(block, name, None)
            if isinstance(sub, nn.Module):
                return sub
        return None

    # -- hooks ---------------------------------------------------------------------------
    def attach(self, model: nn.Module, layer: MoELayer, sink: RoutingSink, *, logits: bool, hidden: bool) -> list[Any]:
        """Register this layer's hooks; returns the handles (call ``.remove()`` on each)."""
        block = model.get_submodule(layer.path)
        experts = next(getattr(block, n) for n in self.experts_names if isinstance(getattr(block, n, None), nn.Module))

        scale = float(self.weight_scale(text_config(model.config))) if self.weight_scale else 1.0
        skip_id = layer.n_experts

        def on_experts(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            _, ids, weights = _hook_args(args, kwargs, ("hidden_states", "top_k_index", "top_k_weights"))
            if self.skip_weightless:
                ids = torch.where(weights == 0, torch.full_like(ids, skip_id), ids)
            if scale != 1.0:
                weights = weights * scale
            sink.routes(layer, ids, weights)

        handles = [experts.register_forward_pre_hook(on_experts, with_kwargs=True)]
        handles += self.attach_router(block, layer, sink, logits=logits, hidden=hidden)
        return handles

    def attach_router(self, block: nn.Module, layer: MoELayer, sink: RoutingSink, *, logits: bool, hidden: bool) -> list[Any]:
        """Hooks on the router for its input (hidden states) and output (logits)."""
        router = self.router_module(block)
        if router is None:
            return []
        handles = []
        if hidden:
            handles.append(router.register_forward_pre_hook(lambda _m, args: sink.router_input(layer, args[0])))
        if logits:
            handles.append(router.register_forward_hook(lambda _m, _a, out: sink.router_logits(layer, self.logits_of(out))))
        return handles

    def logits_of(self, router_output: Any) -> torch.Tensor:
        """The (N, E) router logits in a router's output (first tensor by default)."""
        return router_output[0] if isinstance(router_output, (tuple, list)) else router_output

    def probs_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Router probabilities over all E experts, by the family's score function."""
        if self.score_function == "sigmoid":
            return torch.sigmoid(logits.float())
        if self.score_function == "sqrtsoftplus":
            return torch.sqrt(torch.nn.functional.softplus(logits.float()))
        return torch.softmax(logits.float(), dim=-1)


_NON_TEXT = re.compile(r"(?:^|\.)(?:vision\w*|visual\w*|audio\w*|vision_moe)(?:\.|$)")


def number_across_stacks(model: nn.Module, layers: list[MoELayer]) -> list[MoELayer]:
    """Give every layer a trace-wide index: with several stacks (encoder-decoder), the encoder's
    layers keep their index and each later stack's are offset by the depth of those before it."""
    stacks = sorted({layer.stack for layer in layers}, key=lambda s: (0 if "encoder" in s.split(".") else 1, s))
    if len(stacks) < 2:
        return layers
    offsets, total = {}, 0
    for stack in stacks:
        offsets[stack] = total
        total += _stack_depth(model, [layer for layer in layers if layer.stack == stack])
    return [dataclasses.replace(layer, layer=layer.layer + offsets[layer.stack]) for layer in layers]


def _stack_depth(model: nn.Module, layers: list[MoELayer]) -> int:
    """Length of the layer list (ModuleList) that holds these layers."""
    m = _LAYER_INDEX.search(layers[0].path)
    container = layers[0].path[: m.start(1)].rstrip(".")
    try:
        return len(model.get_submodule(container))
    except (AttributeError, TypeError):
        return max(layer.layer for layer in layers) + 1


def is_contract_experts(module: nn.Module) -> bool:
    """Whether `module` is an experts module of the transformers 5 contract.

    Classes decorated with ``transformers.integrations.moe.use_experts_implementation``
    carry these marker attributes; their forward receives (hidden, top_k_index, top_k_weights).
    """
    return hasattr(module, "_is_expert_parallel") and hasattr(module, "has_gate")


