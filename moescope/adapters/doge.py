"""Doge: product-key experts (one neuron each) chosen inside the block, no experts module.

`DogeCDMoE` looks its experts up with ``down_embed(indices)``: a pre-hook on that embedding
sees exactly the (N, k) expert ids the block uses. The weights are ``softmax`` of those
experts' product-key scores, ``lx[id // K] + ly[id % K]`` from the block's returned
``router_logits (2, N, K)``, in the same order and arithmetic as the block. (The block views
its logits as (2, N, K) with a plain reshape, so a token's routing mixes other tokens'
features; the record follows what the model did.)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moescope.adapters.base import Family, MoELayer, RoutingSink, stack_of, text_config


def product_key_scores(router_logits: torch.Tensor, ids: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(N, k) scores of experts `ids` from product-key logits (2, N, num_keys)."""
    return router_logits[0].gather(1, ids // num_keys) + router_logits[1].gather(1, ids % num_keys)


class DogeFamily(Family):
    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        cfg = text_config(model.config)
        layers = []
        for name, module in model.named_modules():
            if type(module).__name__ == "DogeCDMoE":
                index = int(name.split(".")[-2])
                layers.append(MoELayer(index, name, stack_of(model, name), cfg.num_experts, cfg.num_experts_per_tok))
        return layers

    def attach(self, model: nn.Module, layer: MoELayer, sink: RoutingSink, *, logits: bool, hidden: bool) -> list[Any]:
        block = model.get_submodule(layer.path)
        seen: dict[str, torch.Tensor] = {}

        def on_lookup(_m: nn.Module, args: tuple) -> None:
            seen["ids"] = args[0]

        def on_block(_m: nn.Module, _args: tuple, out: tuple) -> None:
            router_logits = out[1]
            ids = seen.pop("ids").reshape(-1, layer.top_k)
            weights = torch.softmax(product_key_scores(router_logits, ids, block.num_keys), dim=-1)
            if block.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            sink.routes(layer, ids, weights)
            if logits:
                full = router_logits[0][:, :, None] + router_logits[1][:, None, :]  # (N, K, K) = all E experts
                sink.router_logits(layer, full.reshape(full.shape[0], -1))

        handles = [block.down_embed.register_forward_pre_hook(on_lookup), block.register_forward_hook(on_block)]
        if hidden:
            handles.append(block.router_gate.register_forward_pre_hook(lambda _m, a: sink.router_input(layer, a[0])))
        return handles


Doge = DogeFamily(
    "Doge", ("doge",),
    "product keys: top-K of each key half, top-k of the pair sums, softmax over the k; dense MLP in parallel",
    notes="routing logits are reshaped across tokens in a full forward (not causal); the record follows the model",
)
