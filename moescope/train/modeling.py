"""Build a small MoE causal LM of a transformers architecture, with the study's routing variants.

Variants (Fan, Messmer, Jaggi 2024):
- token-level routing: the architecture's own router (each token picks its top-k);
- sequence-level routing: each MoE block routes a whole sequence once, from the mean of the
  sequence's router inputs, and every token of it uses those experts and weights. Note the
  mean covers the whole window, so the expert choice carries a few bits about later tokens
  (at most log2 C(E, k) per layer per sequence); perplexities of this variant are an upper
  bound on what causal sequence-level routing could reach;
- frozen router: router weights keep their random initial values.

The variant is stored in the saved config (``moescope_routing``) and re-applied by
:func:`apply_routing_variant` when moescope loads such a model.
"""
from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from moescope.adapters.base import is_contract_experts
from moescope.train.config import ModelConfig


def build_model(cfg: ModelConfig, *, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, seed: int) -> nn.Module:
    """A freshly initialised MoE causal LM (float32, train mode), routing variant applied."""
    from transformers import MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        router_aux_loss_coef=cfg.aux_loss_coef,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        num_experts_per_tok=cfg.top_k,
    )
    if cfg.architecture == "olmoe":
        config = OlmoeConfig(intermediate_size=cfg.expert_size, num_experts=cfg.n_experts,
                             norm_topk_prob=cfg.norm_topk_prob, **common)
        model = OlmoeForCausalLM(config)
    else:
        config = MixtralConfig(intermediate_size=cfg.expert_size, num_local_experts=cfg.n_experts, **common)
        model = MixtralForCausalLM(config)
    config.moescope_routing = cfg.routing
    config.moescope_router = cfg.router
    for router in routers(model):
        # Some families initialise routers to zeros; a random start lets experts diverge
        # (and is what "frozen random router" means).
        nn.init.normal_(router.weight, std=cfg.router_init_std)
    apply_routing_variant(model)
    if cfg.router == "frozen":
        for router in routers(model):
            router.weight.requires_grad_(False)
    model.train()
    return model


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks (parents of a contract experts module), in model order."""
    blocks = []
    for name, module in model.named_modules():
        if name.endswith(".experts") and is_contract_experts(module):
            blocks.append(model.get_submodule(name.rsplit(".", 1)[0]))
    return blocks


def routers(model: nn.Module) -> list[nn.Module]:
    """The router module of every MoE block."""
    return [block.gate for block in moe_blocks(model)]


def _sequence_level_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    # hidden_states: (B, T, H). One routing decision per sequence from its mean router input.
    batch, width, dim = hidden_states.shape
    flat = hidden_states.reshape(-1, dim)
    gate_out = self.gate(hidden_states.mean(dim=1))  # (B, E) logits, (B, k) weights, (B, k) ids
    weights, ids = gate_out[1], gate_out[2]
    ids = ids.repeat_interleave(width, dim=0)  # (B*T, k)
    weights = weights.repeat_interleave(width, dim=0)
    return self.experts(flat, ids, weights).reshape(batch, width, dim)


def apply_routing_variant(model: nn.Module) -> nn.Module:
    """Re-apply the routing variant named in the model's config (``moescope_routing``)."""
    if getattr(model.config, "moescope_routing", "token") == "sequence":
        for block in moe_blocks(model):
            block.forward = types.MethodType(_sequence_level_forward, block)
    return model


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Total and active-per-token parameter counts (embeddings counted once when tied)."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    cfg = model.config
    e = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts")
    k = cfg.num_experts_per_tok
    expert_params = sum(p.numel() for b in moe_blocks(model) for p in b.experts.parameters())
    active = total - expert_params + expert_params * k // e
    return {"total": total, "active": active, "experts": expert_params}
