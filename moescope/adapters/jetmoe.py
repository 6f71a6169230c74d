"""JetMoE: two routers per layer (attention experts and MLP experts), outputs sorted by expert.

`JetMoeTopKGating` returns the flattened (token, slot) pairs sorted by expert:
``(index_sorted_experts (N*k), batch_index, batch_gates (N*k), expert_size [E], logits (N,E))``.
Slot j of the sorted order belongs to the expert whose cumulative `expert_size` range holds j;
its token-slot position is ``index_sorted_experts[j]`` and its weight ``batch_gates[j]``: the
very values the experts computation consumes, un-sorted back to (N, k) here.

Trace layers: the MLP router of decoder layer i is layer i; its attention router (mixture of
attention heads) is layer L + i, with L the number of decoder layers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moescope.adapters.base import Family, MoELayer, RoutingSink, stack_of, text_config


class JetMoeFamily(Family):
    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        cfg = text_config(model.config)
        n_layers, e, k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
        layers = []
        for name, module in model.named_modules():
            if type(module).__name__ == "JetMoeMoE":
                index = int(name.split(".")[-2])
                layers.append(MoELayer(index, name, stack_of(model, name), e, k))
            elif type(module).__name__ == "JetMoeMoA":
                index = int(name.split(".")[-3])
                layers.append(MoELayer(n_layers + index, name, stack_of(model, name), e, k))
        return sorted(layers, key=lambda layer: layer.layer)

    def attach(self, model: nn.Module, layer: MoELayer, sink: RoutingSink, *, logits: bool, hidden: bool) -> list[Any]:
        block = model.get_submodule(layer.path)
        e, k = layer.n_experts, layer.top_k

        def on_router(_m: nn.Module, _args: tuple, out: tuple) -> None:
            order, _, gates, sizes, router_logits = out
            n = router_logits.shape[0]
            expert_of_slot = torch.repeat_interleave(
                torch.arange(e, device=order.device), torch.as_tensor(sizes, device=order.device)
            )
            ids = torch.empty(n * k, dtype=torch.long, device=order.device)
            weights = torch.empty(n * k, dtype=gates.dtype, device=order.device)
            ids[order] = expert_of_slot
            weights[order] = gates
            sink.routes(layer, ids.view(n, k), weights.view(n, k))

        handles = [block.router.register_forward_hook(on_router)]
        return handles + self.attach_router(block, layer, sink, logits=logits, hidden=hidden)

    def logits_of(self, router_output: Any) -> Any:
        return router_output[4]


JetMoe = JetMoeFamily(
    "JetMoE", ("jetmoe",),
    "top-k logits, softmax over the k; two routers per layer: attention experts (layer L+i) and MLP experts (layer i)",
    router_names=("router",),
)
