"""The tiny-model fixture: every MoE family builds, runs a padded batch, and routes non-degenerately.

The routing is read here with the simplest hook that works for each family (see the "How to capture
each family" section of docs/moe-families.md): a forward pre-hook on the experts module for families
whose experts take ``(hidden_states, top_k_index, top_k_weights)``, and a forward hook on the router
(or MoE block) for the others. These hooks are deliberately local to the tests: the real capture
code lives in ``moescope.capture``.
"""
from __future__ import annotations

import inspect
import pathlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import transformers
from torch import nn

from moescope.testing import NOT_BUILDABLE, TINY_MODEL_TYPES, tiny_config, tiny_model

BATCH, SEQ, PAD = 2, 12, 3
SELECTION_BIAS_NAMES = {"e_score_correction_bias", "expert_bias", "balancing_biases"}

# Per-family facts, listed rather than discovered so the tests below are parametrized only where they
# apply; test_builds_runs_and_routes checks every list against the models it builds.
# Families whose selection adds a bias to the scores (DeepSeek-V3's e_score_correction_bias and kin).
BIASED = (
    "afmoe", "axk1", "axk2", "bailing_hybrid", "beam", "deepseek_v3", "deepseek_v32", "deepseek_v4", "dots1",
    "dots3_note", "ernie4_5_moe", "ernie4_5_vl_moe", "exaone_moe", "glm4_moe", "glm4_moe_lite", "glm4v_moe",
    "glm5_next", "glm_moe_dsa", "hy_v3", "hy_v4", "inkling", "inkling2", "kimi_linear", "kolibri1", "laguna",
    "lfm2_moe", "longcat_flash", "mimo_v2_flash", "minimax_m2", "minimax_m3_vl", "muse_spark",
    "nemotron3_5_transcribe", "nemotron_h", "solar_open", "step3p7", "zaya",
)
# Families that mix dense (or non-MoE) layers with MoE layers; the tiny config keeps at least one of
# each. The others are MoE in every layer.
MIXED = (
    "afmoe", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_ocr2", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "dots1", "dots3_note", "ernie4_5_moe", "ernie4_5_vl_moe", "exaone_moe", "flint", "glm4_moe",
    "glm4_moe_lite", "glm4v_moe", "glm5_next", "glm_moe_dsa", "hy_v3", "hy_v4", "inkling", "jamba", "kimi_linear",
    "laguna", "lfm2_moe", "llama4", "mellum", "mimo_v2_flash", "minimax_m3_vl", "mistral4", "mistral_large4",
    "muse_spark", "nemotron3_5_transcribe", "nemotron_h", "nllb_moe", "qwen2_moe", "qwen3_moe", "qwen3_next",
    "qwen3_omni_moe", "qwen3_vl_moe", "step3p7", "switch_transformers", "unlimited_ocr",
)
# Families whose tiny config routes within expert groups (group-limited top-k).
GROUPED = (
    "axk1", "axk2", "bailing_hybrid", "beam", "deepseek_ocr2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1",
    "dots3_note", "exaone_moe", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm5_next", "glm_moe_dsa", "hy_v4",
    "kimi_linear", "mimo_v2_flash", "mistral4", "mistral_large4", "nemotron3_5_transcribe", "nemotron_h",
    "solar_open", "unlimited_ocr",
)


@dataclass
class RoutingCall:
    """One MoE call: per-token expert ids (N, k) and the weights the family applies, with -1 for 'no expert'."""

    module: str
    ids: torch.Tensor
    weights: torch.Tensor


def _has_experts_contract(module: nn.Module) -> bool:
    """Experts modules called as ``experts(hidden_states, top_k_index, top_k_weights)``.

    ``@use_experts_implementation`` sets ``has_gate``/``is_transposed``/``is_concatenated`` on the
    instance; DBRX, LongCat-Flash and Step-3.7 experts are not decorated but have the same signature.
    """
    if all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated")):
        return True
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:4]
    except (TypeError, ValueError):
        return False
    return params == ["hidden_states", "top_k_index", "top_k_weights"]


def _topk_product_keys(module: nn.Module, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Doge's product-key selection, replayed from the (2, N, num_keys) router logits DogeCDMoE returns."""
    (scores_x, scores_y), (idx_x, idx_y) = router_logits.topk(module.num_keys, dim=-1)
    scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).flatten(-2)
    ids = (idx_x.unsqueeze(-1) * module.num_keys + idx_y.unsqueeze(-2)).flatten(-2)
    top, pos = scores.topk(module.top_k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    if module.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids.gather(-1, pos), weights


def _router_hook(module: nn.Module) -> Callable | None:
    """For families whose experts do not follow the contract: turn the router output into (ids, weights)."""
    name = type(module).__name__
    if name == "Llama4Router":  # returns (dense sigmoid scores (N, E), logits (N, E))
        def read(out):
            top, ids = torch.topk(out[1], module.top_k, dim=1)
            return ids, torch.sigmoid(top.float())
    elif name == "JetMoeTopKGating":  # returns (sorted slots, token index, gates, expert sizes, logits)
        def read(out):
            top, ids = out[4].topk(module.top_k, dim=1)
            return ids, torch.softmax(top, dim=1)
    elif name == "DogeCDMoE":  # the MoE block returns (output, router logits (2, N, num_keys))
        def read(out):
            return _topk_product_keys(module, out[1])
    elif name == "SwitchTransformersTop1Router":  # (one-hot after capacity (B,S,E), max prob (B,S,1), logits)
        def read(out):
            onehot = out[0].reshape(-1, out[0].shape[-1])
            ids = torch.where(onehot.sum(-1) > 0, onehot.argmax(-1), -1)  # -1: dropped over capacity
            return ids[:, None], out[1].reshape(-1, 1)
    elif name == "NllbMoeTop2Router":  # (top-1 mask (N,E), combine weights (N,E), logits)
        def read(out):
            weights, ids = out[1].topk(2, dim=-1)
            return torch.where(weights > 0, ids, -1), weights  # -1: dropped (capacity, padding)
    else:
        return None
    return read


@contextmanager
def recorded_routing(model: nn.Module) -> Iterator[list[RoutingCall]]:
    """Collect one :class:`RoutingCall` per MoE call made inside the block."""
    calls: list[RoutingCall] = []
    handles = []
    for name, module in model.named_modules():
        if _has_experts_contract(module):
            def pre_hook(mod, args, kwargs, name=name):
                # gpt-oss style experts name their arguments router_indices/routing_weights: go by position.
                values = list(args) + list(kwargs.values())
                calls.append(RoutingCall(name, values[1].detach().clone(), values[2].detach().clone()))
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        elif (read := _router_hook(module)) is not None:
            def hook(mod, args, out, name=name, read=read):
                ids, weights = read(out)
                calls.append(RoutingCall(name, ids.detach().clone(), weights.detach().clone()))
            handles.append(module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _inputs(model: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    """input_ids (2, 12) with the first row left-padded by 3 positions."""
    gen = torch.Generator().manual_seed(1234)
    vocab = model.config.get_text_config().vocab_size
    input_ids = torch.randint(3, vocab, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    pad_id = model.config.get_text_config().pad_token_id or 0
    input_ids[0, :PAD] = pad_id
    attention_mask[0, :PAD] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = input_ids[:, :5]
    return inputs


def _expected_logits_shape(model: transformers.PreTrainedModel, inputs: dict[str, torch.Tensor]) -> tuple[int, ...]:
    text = model.config.get_text_config()
    if model.config.is_encoder_decoder:
        return (*inputs["decoder_input_ids"].shape, text.vocab_size)
    if hasattr(model.config, "canvas_length"):  # block diffusion: logits for the canvas, not the prompt
        return (BATCH, model.config.canvas_length, text.vocab_size)
    if isinstance(model, transformers.OpenAIPrivacyFilterForTokenClassification):
        return (BATCH, SEQ, model.config.num_labels)
    return (BATCH, SEQ, text.vocab_size)


def _layer_is_moe(model: nn.Module) -> list[bool]:
    """For every layer of every routed layer stack (decoder, or encoder and decoder): does it route?

    Stacks without any MoE layer (vision and audio towers) are left out.
    """
    kinds = []
    for name, stack in model.named_modules():
        if isinstance(stack, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "blocks", "block"):
            routed = [any(_has_experts_contract(m) or _router_hook(m) is not None for m in layer.modules()) for layer in stack]
            if any(routed):
                kinds.extend(routed)
    return kinds


def _selection_biases(model: nn.Module) -> list[torch.Tensor]:
    named = [*model.named_buffers(), *model.named_parameters()]
    return [tensor for name, tensor in named if name.rsplit(".", 1)[-1] in SELECTION_BIAS_NAMES]


def _grouped_routers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "num_group", None) not in (None, 1) and hasattr(m, "topk_group")]


def _run(model: transformers.PreTrainedModel) -> tuple[torch.Tensor, list[RoutingCall]]:
    inputs = _inputs(model)
    # Block diffusion draws its canvas from the global RNG: pin it so repeated runs compare.
    with torch.random.fork_rng(devices=[]), torch.no_grad(), recorded_routing(model) as calls:
        torch.manual_seed(0)
        logits = model(**inputs).logits
    return logits, calls


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_builds_runs_and_routes(model_type: str) -> None:
    model = tiny_model(model_type)
    assert not model.training
    text = model.config.get_text_config()
    assert getattr(text, "hidden_size", None) == 64 or getattr(text, "d_model", None) == 64
    assert text.vocab_size == 256
    assert bool(_selection_biases(model)) == (model_type in BIASED)
    assert bool(_grouped_routers(model)) == (model_type in GROUPED)
    layers = _layer_is_moe(model)
    assert sum(layers) >= 2, f"MoE layers per layer: {layers}"
    assert (not all(layers)) == (model_type in MIXED), f"MoE layers per layer: {layers}"

    inputs = _inputs(model)
    logits, calls = _run(model)
    assert tuple(logits.shape) == _expected_logits_shape(model, inputs)
    assert torch.isfinite(logits).all()

    assert len(calls) >= 2, f"expected at least two MoE layers to run, saw {len(calls)}"
    for call in calls:
        ids = call.ids.reshape(-1, call.ids.shape[-1])
        assert ids.shape[0] > 1 and call.weights.shape == call.ids.shape
        chosen = ids[ids >= 0]
        assert chosen.unique().numel() >= 2, f"{call.module}: every token picked the same expert"
        assert len({tuple(row.tolist()) for row in ids}) >= 2, f"{call.module}: every token picked the same set"


@pytest.mark.parametrize("model_type", BIASED)
def test_selection_bias_changes_some_choices(model_type: str) -> None:
    """Re-initialised selection biases are non-zero and flip some (not all) expert choices."""
    model = tiny_model(model_type)
    biases = _selection_biases(model)
    assert all(bias.abs().sum() > 0 for bias in biases)
    _, with_bias = _run(model)
    with torch.no_grad():
        for bias in biases:
            bias.zero_()
    _, without_bias = _run(model)
    changed = [
        (a.ids.sort(-1).values != b.ids.sort(-1).values).any(-1).float().mean().item()
        for a, b in zip(with_bias, without_bias)
    ]
    assert any(0 < frac < 1 for frac in changed), f"fraction of tokens whose choice changed per call: {changed}"


@pytest.mark.parametrize("model_type", GROUPED)
def test_grouped_topk_is_active(model_type: str) -> None:
    """Where the family routes within expert groups, the group restriction changes some choices."""
    model = tiny_model(model_type)
    routers = _grouped_routers(model)
    assert all(r.num_group == 4 and r.topk_group == 2 for r in routers)
    _, grouped = _run(model)
    for router in routers:  # one group holding every expert: plain top-k
        router.num_group, router.topk_group = 1, 1
    _, plain = _run(model)
    assert any((g.ids.sort(-1).values != p.ids.sort(-1).values).any() for g, p in zip(grouped, plain))


# Routing paths adapters must handle, which the tiny configs make sure actually occur.
SPECIAL_PATHS: dict[str, tuple[str, Callable[[RoutingCall, nn.Module], torch.Tensor]]] = {
    # Zaya's "skip" class comes out of the router as expert 0 with weight exactly 0.
    "zaya": ("skipped slots", lambda call, model: (call.ids == 0) & (call.weights == 0)),
    # LongCat-Flash "zero" experts are identity experts with ids n_routed_experts .. + zero_expert_num - 1.
    "longcat_flash": ("identity-expert ids", lambda call, model: call.ids >= model.config.n_routed_experts),
    # Switch drops tokens over an expert's capacity; NLLB-MoE gives padding tokens no expert.
    "switch_transformers": ("dropped tokens", lambda call, model: call.ids < 0),
    "nllb_moe": ("dropped tokens", lambda call, model: call.ids < 0),
}


@pytest.mark.parametrize("model_type", sorted(SPECIAL_PATHS))
def test_special_routing_paths_occur(model_type: str) -> None:
    what, select = SPECIAL_PATHS[model_type]
    model = tiny_model(model_type)
    _, calls = _run(model)
    hits = sum(int(select(call, model).sum()) for call in calls)
    total = sum(call.ids.numel() for call in calls)
    assert 0 < hits < total, f"{model_type}: {hits} of {total} slots are {what}"


def test_same_seed_same_model_other_seed_differs() -> None:
    a, b, c = (tiny_model("deepseek_v3", seed=s) for s in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_overrides_and_dtype() -> None:
    config = tiny_config("mixtral", num_experts_per_tok=1)
    assert config.num_experts_per_tok == 1 and config.num_local_experts == 8
    model = tiny_model("qwen3_vl_moe", dtype=torch.bfloat16, num_experts_per_tok=2)
    assert model.config.text_config.num_experts_per_tok == 2
    assert model.model.language_model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_bf16_keeps_fp32_tensors_like_from_pretrained() -> None:
    # Inkling-2 lists its router in _keep_in_fp32_modules_strict; in bf16 it only runs if that is honoured.
    model = tiny_model("inkling2", dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    _, calls = _run(model)
    assert len(calls) == 2


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_every_family_runs_in_bf16(model_type: str) -> None:
    logits, calls = _run(tiny_model(model_type, dtype=torch.bfloat16))
    assert torch.isfinite(logits).all() and len(calls) >= 2


def test_not_buildable_types_raise() -> None:
    for model_type in NOT_BUILDABLE:
        with pytest.raises(ValueError, match="no tiny model"):
            tiny_model(model_type)
    with pytest.raises(ValueError, match="unknown"):
        tiny_config("not_a_model")


def test_every_experts_module_in_transformers_is_covered() -> None:
    """Guards a transformers upgrade: a new family with contract experts must be added to the table."""
    models_dir = pathlib.Path(transformers.__file__).parent / "models"
    with_experts = {
        path.parent.name
        for path in models_dir.glob("*/modeling_*.py")
        if re.search(r"^@use_experts_implementation", path.read_text(encoding="utf-8"), re.MULTILINE)
    }
    missing = with_experts - set(TINY_MODEL_TYPES) - set(NOT_BUILDABLE)
    assert not missing, f"MoE families without a tiny model: {sorted(missing)}"
