"""Tiny random-weight models for every mixture-of-experts family in transformers 5.23.0.

Every adapter test builds its model here, so the models must be small (hidden size 64, vocab 256,
2-4 layers), fast (build + one forward of a (2, 12) batch in well under 2 s on CPU) and, above all,
*route non-degenerately*: different tokens must pick different experts, and where a family corrects
its selection with a bias (DeepSeek-V3's ``e_score_correction_bias`` and friends) the correction must
actually change some choices. Many families initialise router weights or bias buffers to zeros,
which makes every token pick the same experts (``topk`` over ties); :func:`tiny_model` therefore
re-initialises every router weight and every selection bias with small seeded random values.

The per-family knowledge lives in one table, ``SPECS`` of :mod:`moescope.testing.tiny_specs`
(model type -> how to build it); everything else is generic. ``docs/moe-families.md`` explains how each family routes.

Model types are the directory names under ``transformers/models`` (``nllb_moe``, ``inkling``,
``nemotron3_5_transcribe``). The table names the class to build, so it does not matter that some
register a different ``model_type`` string (``nllb-moe``, ``inkling_text``, ``nemo_speechlm``).

Which class is built: the ``*ForCausalLM`` class when the family has one (for multimodal families
with a text-only causal LM, e.g. ``llama4`` -> ``Llama4ForCausalLM`` on a ``Llama4TextConfig``), the
seq2seq LM class for encoder-decoders, otherwise the multimodal conditional-generation class driven
with ``input_ids`` only. :func:`tiny_config` returns the config of *that* class.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import re
from typing import Any

import torch
import transformers
from torch import nn

from moescope.testing import tiny_specs as specs
from moescope.testing.tiny_specs import NOT_BUILDABLE, TINY_MODEL_TYPES

__all__ = ["NOT_BUILDABLE", "TINY_MODEL_TYPES", "model_class_name", "reinit_routing", "tiny_config", "tiny_model"]



def model_class_name(model_type: str) -> str:
    """Name of the transformers class :func:`tiny_model` builds for ``model_type``."""
    return _spec(model_type)["cls"]


def _spec(model_type: str) -> dict[str, Any]:
    if model_type in NOT_BUILDABLE:
        raise ValueError(f"{model_type!r} has no tiny model: {NOT_BUILDABLE[model_type]}")
    try:
        return specs.SPECS[model_type]
    except KeyError:
        raise ValueError(f"unknown MoE model type {model_type!r}; known: {', '.join(TINY_MODEL_TYPES)}") from None


def _model_cls(model_type: str) -> type[transformers.PreTrainedModel]:
    return getattr(transformers, _spec(model_type)["cls"])


def _fields(config_cls: type) -> dict[str, Any]:
    """Field name -> default value of a (dataclass) config class."""
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def _generic_text_kwargs(config_cls: type) -> dict[str, Any]:
    """The generic tiny sizes that apply to ``config_cls``, plus E experts and top-k."""
    fields = _fields(config_cls)
    kwargs = {k: v for k, v in specs.TEXT_DEFAULTS.items() if k in fields}
    for key, value in specs.ONLY_IF_SET_VALUES.items():
        if key in fields and fields[key] is not None:
            kwargs[key] = value
    if "kv_lora_rank" in fields:
        # Multi-head latent attention expands one latent into every head: no grouped-query heads.
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)
    for key in specs.NUM_EXPERTS_KEYS:
        if key in fields:
            kwargs[key] = specs.NUM_EXPERTS
    for key in specs.TOP_K_KEYS:
        if key in fields:
            kwargs[key] = specs.TOP_K
    return kwargs


@functools.lru_cache(maxsize=None)
def _default_sub_configs(config_cls: type) -> dict[str, transformers.PretrainedConfig]:
    """Default sub-config instances of a composite config class (to learn their fields and types)."""
    default = config_cls()
    return {name: getattr(default, name) for name in getattr(config_cls, "sub_configs", {}) if getattr(default, name, None) is not None}


def _tower_kwargs(sub_config: transformers.PretrainedConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """Shrink a vision/audio tower config generically, keeping its model_type (for AutoConfig sub-configs).

    Recurses into nested towers (e.g. DeepSeek-OCR-2's SAM and encoder configs inside its vision config).
    """
    present = sub_config.to_dict()
    kwargs: dict[str, Any] = {"model_type": sub_config.model_type} if sub_config.model_type else {}
    kwargs.update({k: v for k, v in specs.TOWER_DEFAULTS.items() if k in present})
    for name in getattr(type(sub_config), "sub_configs", {}) or {}:
        nested = getattr(sub_config, name, None)
        if isinstance(nested, transformers.PretrainedConfig):
            kwargs[name] = _tower_kwargs(nested, extra.get(name, {}))
    kwargs.update({k: v for k, v in extra.items() if not isinstance(v, dict) or k not in kwargs})
    return kwargs


def tiny_config(model_type: str, **overrides: Any) -> transformers.PretrainedConfig:
    """Config of the tiny model for ``model_type`` (see module docstring for which class it is for).

    ``overrides`` apply to the config that holds the MoE settings: the model's own config for flat
    models, its ``text_config`` for multimodal ones, and are passed to the config constructor, so
    derived fields (layer-type lists, head dims) follow them.
    Example: ``tiny_config("mixtral", num_experts_per_tok=1)``.

    Raises:
        ValueError: ``model_type`` is unknown or listed in :data:`NOT_BUILDABLE`.
    """
    spec = copy.deepcopy(_spec(model_type))  # configs may keep (and mutate) the lists we pass
    config_cls = _model_cls(model_type).config_class
    sub_configs = getattr(config_cls, "sub_configs", {}) or {}
    if "text_config" not in sub_configs:
        kwargs = {**_generic_text_kwargs(config_cls), **spec.get("text", {}), **overrides}
        return config_cls(**kwargs)

    defaults = _default_sub_configs(config_cls)
    text_default = defaults["text_config"]
    text_kwargs = {"model_type": text_default.model_type, **_generic_text_kwargs(type(text_default)),
                   **spec.get("text", {}), **overrides}
    top_kwargs: dict[str, Any] = dict(spec.get("top", {}))
    top_kwargs["text_config"] = text_kwargs
    for name, sub in defaults.items():
        if name != "text_config":
            top_kwargs[name] = _tower_kwargs(sub, spec.get("towers", {}).get(name, {}))
    return config_cls(**top_kwargs)


def tiny_model(
    model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> transformers.PreTrainedModel:
    """Build the tiny model for ``model_type`` in eval mode, with seeded, non-degenerate routing.

    Weights come from the model's own initialisation under ``torch.manual_seed(seed)``; then every
    router weight and selection bias is re-drawn (see :func:`reinit_routing`) so that tokens spread
    over experts and bias-corrected selection differs from plain top-k. Same seed, same model.
    With ``dtype`` bf16/fp16 the tensors a checkpoint load keeps in float32 stay float32, as they would.
    """
    config = tiny_config(model_type, **overrides)
    cls = _model_cls(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype)
    _keep_in_fp32_like_from_pretrained(model, dtype)
    reinit_routing(model, seed=seed, bias_scale=_spec(model_type).get("bias_scale", _BIAS_SCALE))
    return model.eval()


def _keep_in_fp32_like_from_pretrained(model: transformers.PreTrainedModel, dtype: torch.dtype) -> None:
    """Upcast the tensors ``from_pretrained`` would keep in float32 (``_keep_in_fp32_modules[_strict]``).

    ``_from_config(dtype=...)`` casts everything, but real checkpoints loaded in bf16/fp16 keep e.g.
    Inkling-2's router weight and several ``e_score_correction_bias`` buffers in float32 (Inkling-2's
    router even crashes otherwise). Matching follows ``PreTrainedModel._get_dtype_plan``: a regex
    search of each pattern in the parameter name.
    """
    patterns = list(getattr(model, "_get_dtype_plan", lambda _: {})(dtype))
    if not patterns:
        return
    keep = re.compile("|".join(p.replace("*", ".*") for p in patterns))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if keep.search(name) and tensor.is_floating_point():
            tensor.data = tensor.data.float()


# ---------------------------------------------------------------------------------------------
# Router re-initialisation.
# ---------------------------------------------------------------------------------------------
# Router modules, by class-name suffix. Deliberately explicit: gates that are *not* routers
# (KDA forget gates, residual gates, Qwen's shared_expert_gate Linear) must be left alone.
_ROUTER_SUFFIXES = ("Router", "TopKGating", "HunYuanMoEV1Gate")
# Buffers / parameters that bias expert *selection* (not the weights), whatever module holds them.
_SELECTION_BIAS_NAMES = {"e_score_correction_bias", "expert_bias", "balancing_biases"}
_BIAS_SCALE = 0.1


def _is_router(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith(_ROUTER_SUFFIXES)


@torch.no_grad()
def reinit_routing(model: nn.Module, *, seed: int = 0, bias_scale: float = _BIAS_SCALE) -> None:
    """Re-draw router weights and selection biases of ``model`` in place, deterministically from ``seed``.

    * 2-D router weights: N(0, 1/fan_in), so router logits have unit scale and tokens spread out.
    * Router biases (gpt-oss style ``bias``): N(0, 0.1).
    * Per-expert output scales (Gemma 4 ``per_expert_scale``): U(0.5, 1.5), so the weights the
      experts multiply by differ from the renormalised router probabilities.
    * Selection biases (``e_score_correction_bias``, ``expert_bias``, ``balancing_biases``):
      U(-bias_scale, bias_scale), comparable to the gaps between the scores they are added to, so
      bias-corrected top-k differs from plain top-k for some tokens (not all).
    * Zaya's skip class (last ``balancing_biases`` entry): +2 x bias_scale, so some tokens skip.
    * DeepSeek-V4 hash routing table ``tid2eid``: k distinct random experts per token id.
    * Doge's product-key router ``router_gate``.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)

    def draw(shape: torch.Size | tuple[int, ...], like: torch.Tensor, kind: str, scale: float = 1.0) -> torch.Tensor:
        if kind == "normal":
            out = torch.randn(shape, generator=gen) * scale
        else:  # uniform in [-scale, scale)
            out = (torch.rand(shape, generator=gen) * 2 - 1) * scale
        return out.to(dtype=like.dtype, device=like.device)

    for module_name, module in model.named_modules():
        if _is_router(module) or module_name.endswith("router_gate"):
            for pname, param in module.named_parameters():
                leaf = pname.rsplit(".", 1)[-1]
                if "norm" in pname:
                    continue
                if param.ndim == 2:
                    param.copy_(draw(param.shape, param, "normal", param.shape[1] ** -0.5))
                elif leaf == "bias":
                    param.copy_(draw(param.shape, param, "normal", _BIAS_SCALE))
                elif leaf == "per_expert_scale":
                    param.copy_(1.0 + draw(param.shape, param, "uniform", 0.5))
        for bname, buf in list(module.named_buffers(recurse=False)) + list(module.named_parameters(recurse=False)):
            if bname in _SELECTION_BIAS_NAMES:
                buf.copy_(draw(buf.shape, buf, "uniform", bias_scale))
                if bname == "balancing_biases":
                    # Zaya: the last class means "skip this slot" (id 0, weight 0). Favour it a little so
                    # that some tokens actually skip and the skip path is exercised.
                    buf[-1] = 2 * bias_scale
            elif bname == "tid2eid":
                # One row per token id: k distinct experts (zeros would send every token to expert 0 k times).
                num_experts = module.num_experts
                rows = torch.stack([torch.randperm(num_experts, generator=gen)[: buf.shape[1]] for _ in range(buf.shape[0])])
                buf.copy_(rows.to(buf.dtype))
