"""What an adapter is: how to find a family's MoE layers and hook what its experts receive.

An adapter never re-implements routing. It hooks the tensors the model itself hands to its
experts computation, so the record is, by construction, what the model used. Most families
in transformers 5 share one contract (``experts(hidden (N,H), top_k_index (N,k),
top_k_weights (N,k))``); :class:`ExpertsContract` captures all of them, and families that
route differently subclass :class:`Family` and override :meth:`Family.attach`.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")


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


def first_attr(obj: Any, names: tuple[str, ...], default: Any = None) -> Any:
    """The first attribute of `obj` among `names` that is set (not None)."""
    for name in names:
        value = getattr(obj, name, None)
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
    """Path of the nearest ancestor of `path` whose forward takes input_ids (the stack)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        candidate = ".".join(parts[:cut])
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
    top_k_attrs: tuple[str, ...] = ("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "num_experts_per_token")
    shared_attrs: tuple[str, ...] = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
    zero_experts: bool = False
    capacity: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # -- discovery -----------------------------------------------------------------------
    def is_experts(self, name: str, module: nn.Module) -> bool:
        """Whether `module` (at dotted path `name`) is a routed-experts module of this family."""
        return name.rsplit(".", 1)[-1] in self.experts_names and is_contract_experts(module)

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        """The model's MoE layers, in model order."""
        cfg = text_config(model.config)
        layers = []
        for name, module in model.named_modules():
            if not self.is_experts(name, module):
                continue
            block = name.rsplit(".", 1)[0]
            n_experts = int(first_attr(module, ("num_experts",), None) or first_attr(cfg, self.n_experts_attrs))
            layers.append(
                MoELayer(
                    layer=layer_index(block),
                    path=block,
                    stack=stack_of(model, block),
                    n_experts=n_experts,
                    top_k=self.top_k(model.get_submodule(block), cfg),
                    n_shared=int(first_attr(cfg, self.shared_attrs, 0) or 0),
                )
            )
        return layers

    def top_k(self, block: nn.Module, cfg: Any) -> int:
        router = self.router_module(block)
        k = first_attr(router, ("top_k",), None) if router is not None else None
        return int(k or first_attr(block, ("top_k",), None) or first_attr(cfg, self.top_k_attrs))

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

        def on_experts(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            _, ids, weights = _hook_args(args, kwargs, ("hidden_states", "top_k_index", "top_k_weights"))
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
        return torch.softmax(logits.float(), dim=-1)


def is_contract_experts(module: nn.Module) -> bool:
    """Whether `module` is an experts module of the transformers 5 contract.

    Classes decorated with ``transformers.integrations.moe.use_experts_implementation``
    carry these marker attributes; their forward receives (hidden, top_k_index, top_k_weights).
    """
    return hasattr(module, "_is_expert_parallel") and hasattr(module, "has_gate")


ExpertsContract = Family  # the default capture strategy is the contract's
HookFactory = Callable[..., list[Any]]
