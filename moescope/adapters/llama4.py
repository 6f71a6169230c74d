"""Llama 4: a dense score matrix instead of the experts contract.

`Llama4Router` returns ``(scores (N,E), logits (N,E))`` where scores hold sigmoid(logit) at the
top-k experts and exactly 0 elsewhere; the block feeds every expert ``h * score`` (the weight
scales the expert's *input*), so the experts a token used are the non-zero entries of `scores`,
and their weights are those entries. Both are read from the router's own output.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from moescope.adapters.base import Family, MoELayer, RoutingSink


class Llama4Family(Family):
    def attach(self, model: nn.Module, layer: MoELayer, sink: RoutingSink, *, logits: bool, hidden: bool) -> list[Any]:
        block = model.get_submodule(layer.path)
        k = layer.top_k

        def on_router(_m: nn.Module, _args: tuple, out: tuple) -> None:
            scores = out[0].reshape(-1, out[0].shape[-1])
            weights, ids = scores.topk(k, dim=-1)  # the k non-zero entries, strongest first
            sink.routes(layer, ids, weights)

        handles = [block.router.register_forward_hook(on_router)]
        return handles + self.attach_router(block, layer, sink, logits=logits, hidden=hidden)

    def logits_of(self, router_output: Any) -> Any:
        return router_output[1]


Llama4 = Llama4Family(
    "Llama 4", ("llama4",),
    "top-k of logits; weights sigmoid(logit), not renormalised, scaling the expert's input; shared expert",
    score_function="sigmoid", router_names=("router",), experts_classes=("Llama4TextExperts",),
)
