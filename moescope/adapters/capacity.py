"""Capacity-limited routers of encoder-decoder models: Switch Transformers and NLLB-MoE.

Their routers return dispatch masks after capacity: a token over its expert's capacity is
dropped (an all-zero row; the residual passes it through). Dropped tokens are recorded with
the expert they were sent to and ``dropped = True``, so no routing decision is lost.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moescope.adapters.base import Family, MoELayer, RoutingSink


class SwitchFamily(Family):
    """Top-1. Router output: (one-hot dispatch after capacity (B,S,E), top-1 prob (B,S,1), logits)."""

    def attach(self, model: nn.Module, layer: MoELayer, sink: RoutingSink, *, logits: bool, hidden: bool) -> list[Any]:
        block = model.get_submodule(layer.path)
        e = layer.n_experts

        def on_router(_m: nn.Module, _args: tuple, out: tuple) -> None:
            dispatch, prob, router_logits = out
            dispatch = dispatch.reshape(-1, e)
            kept = dispatch.sum(dim=-1) > 0
            ids = torch.where(kept, dispatch.argmax(dim=-1), router_logits.reshape(-1, e).argmax(dim=-1))
            sink.routes(layer, ids[:, None], prob.reshape(-1, 1), dropped=~kept[:, None])

        handles = [block.router.register_forward_hook(on_router)]
        return handles + self.attach_router(block, layer, sink, logits=logits, hidden=hidden)

    def logits_of(self, router_output: Any) -> Any:
        return router_output[2]


class NllbFamily(Family):
    """Top-2. Router output: (top-1 mask after capacity (N,E), combine weights (N,E), logits (N,E)).

    The two experts are the top logit and the top logit among the rest (the router's own
    arithmetic on its returned logits); their weights are the combine weights the router
    returned, times (1 - moe_token_dropout) as the experts apply in eval; a weight of 0 means
    the slot was dropped (capacity or padding).
    """

    def attach(self, model: nn.Module, layer: MoELayer, sink: RoutingSink, *, logits: bool, hidden: bool) -> list[Any]:
        block = model.get_submodule(layer.path)
        scale = 1.0 - float(getattr(model.config, "moe_token_dropout", 0.0) or 0.0)

        def on_router(_m: nn.Module, _args: tuple, out: tuple) -> None:
            _, combine, router_logits = out
            first = router_logits.argmax(dim=-1)
            rest = router_logits.scatter(-1, first[:, None], float("-inf"))
            ids = torch.stack([first, rest.argmax(dim=-1)], dim=-1)
            weights = combine.gather(-1, ids)
            dropped = weights == 0
            sink.routes(layer, ids, weights * scale if block.training is False else weights, dropped=dropped)

        handles = [block.router.register_forward_hook(on_router)]
        return handles + self.attach_router(block, layer, sink, logits=logits, hidden=hidden)

    def logits_of(self, router_output: Any) -> Any:
        return router_output[2]


SwitchTransformers = SwitchFamily(
    "Switch Transformers", ("switch_transformers",),
    "softmax top-1 with expert capacity per sequence (tokens over capacity dropped); weight = top-1 probability",
    router_names=("router",), experts_classes=("SwitchTransformersExperts",), fixed_top_k=1, capacity=True,
)
NllbMoe = NllbFamily(
    "NLLB-MoE", ("nllb_moe",),
    "softmax top-2 with expert capacity; padding tokens get no expert",
    router_names=("router",), experts_classes=("NllbMoeExperts",), fixed_top_k=2, capacity=True,
    unverified_reason=(
        "transformers 5.23's NllbMoeExperts runs only expert_0 and expert_1 whatever the router decides; "
        "moescope records the router's decision, which is not what the experts computed"
    ),
)
