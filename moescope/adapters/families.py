"""Every supported architecture family, declared once and registered by ``model_type``.

Most families hand routing to an experts module with the transformers-5 contract
``experts(hidden (N,H), top_k_index (N,k), top_k_weights (N,k))``; for them a declaration is
the whole adapter (see :class:`moescope.adapters.base.Family`). The others live in their own
modules (llama4, jetmoe, doge, capacity) and are registered at the end.

Model types are transformers' model directory names; `registry.family_for_config` also
matches the `model_type` strings their configs carry (``nllb-moe``, ``qwen3_vl_moe_text``...).
How each family routes, read from transformers 5.23's code: docs/moe-families.md.
"""
from __future__ import annotations

from moescope.adapters.base import Family
from moescope.adapters.capacity import NllbMoe, SwitchTransformers
from moescope.adapters.doge import Doge
from moescope.adapters.jetmoe import JetMoe
from moescope.adapters.llama4 import Llama4
from moescope.adapters.registry import register

SIGMOID = "sigmoid"


def _cohere_average_factor(cfg) -> float:  # noqa: ANN001
    # Cohere2-MoE averages routed and shared outputs by default: (routed + shared) / 2.
    shared = (getattr(cfg, "num_shared_experts", 0) or 0) > 0
    return 0.5 if shared and getattr(cfg, "shared_expert_combination_strategy", "average") == "average" else 1.0


# -- softmax top-k routers ---------------------------------------------------------------------
register(Family("OLMoE", ("olmoe", "flex_olmo"), "softmax top-k; renormalised when norm_topk_prob"))
register(Family("Mixtral", ("mixtral", "minimax", "mellum"), "softmax top-k, renormalised"))
register(Family(
    "Qwen-MoE",
    ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_vl_moe", "qwen3_omni_moe", "qwen4_exp"),
    "softmax top-k, renormalised when norm_topk_prob; shared expert gated by sigmoid(shared_expert_gate)",
))
register(Family("Jamba", ("jamba",), "softmax top-k, not renormalised; MoE every expert_layer_period layers"))
register(Family("HunYuan-MoE", ("hunyuan_v1_moe",), "softmax top-k, renormalised; always-on shared MLP"))
register(Family(
    "PhiMoE", ("phimoe",), "sparsemixer top-2: argmax, then the runner-up within a jitter margin; not renormalised",
    fixed_top_k=2,
))
register(Family(
    "GraniteMoE", ("granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared"),
    "top-k logits, softmax over the k (= renormalised softmax); optional shared MLP",
))
register(Family("Aria", ("aria",), "top-k logits, softmax over the k; ungated shared experts"))
register(Family(
    "gpt-oss", ("gpt_oss",), "top-k of logits with bias, softmax over the k",
))
register(Family(
    "OpenAI privacy filter", ("openai_privacy_filter",),
    "top-k of biased logits, softmax over the k divided by k; the block multiplies by k again",
    weight_scale=lambda cfg: cfg.num_experts_per_tok,
    notes="a bidirectional token classifier, not a language model",
))
register(Family(
    "Cohere2-MoE", ("cohere2_moe",),
    "softmax (or sigmoid) of the top-k logits; routed and shared outputs averaged by default",
    weight_scale=_cohere_average_factor,
))
GEMMA4_ROUTER = "softmax top-k on a normalised router input, renormalised, times a per-expert scale; dense MLP in parallel"
register(Family("Gemma 4", ("gemma4",), GEMMA4_ROUTER))
register(Family(
    "DiffusionGemma", ("diffusion_gemma",), GEMMA4_ROUTER, exclude_paths=("model.decoder.",),
    notes="the encoder's routing of the prompt is recorded; the block-diffusion decoder routes a canvas of noise "
          "tokens the model draws itself, which is not recorded",
))
register(Family(
    "Ernie 4.5 MoE", ("ernie4_5_moe", "ernie4_5_vl_moe"),
    "softmax top-k with bias-corrected selection, renormalised; text experts recorded (vision experts see image rows)",
))
register(Family(
    "Mistral 4", ("mistral4", "mistral_large4"),
    "softmax, grouped top-k (group score: sum of top-2), renormalised, times routed_scaling_factor",
))
register(Family(
    "DeepSeek-V2", ("deepseek_v2", "deepseek_ocr2", "unlimited_ocr"),
    "softmax, greedy or group-limited top-k, not renormalised, times routed_scaling_factor; ids unsorted",
))

# -- sigmoid routers with bias-corrected selection ------------------------------------------------
register(Family(
    "DeepSeek-V3",
    ("deepseek_v3", "deepseek_v32", "dots1", "dots3_note", "kimi_linear", "mimo_v2_flash", "solar_open",
     "exaone_moe", "hy_v4", "axk1", "axk2", "bailing_hybrid"),
    "sigmoid, grouped top-k, bias-corrected selection (bias not in the weights), renormalised, "
    "times routed_scaling_factor; ids unsorted",
    score_function=SIGMOID,
))
register(Family(
    "GLM4-MoE", ("glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm5_next", "glm_moe_dsa"),
    "sigmoid, grouped top-k, bias-corrected selection, renormalised, times routed_scaling_factor; ids unsorted",
    score_function=SIGMOID,
))
register(Family(
    "Nemotron-H", ("nemotron_h", "nemotron3_5_transcribe"),
    "sigmoid, grouped top-k, bias-corrected selection, renormalised, scaled; MoE in 'moe' mixer layers",
    score_function=SIGMOID,
))
register(Family(
    "DeepSeek-V4", ("deepseek_v4",),
    "sqrt-softplus scores with bias-corrected top-k; hash layers route by a fixed token-id table",
    score_function="sqrtsoftplus",
))
register(Family("MiniMax-M2", ("minimax_m2",), "sigmoid, bias-corrected selection, renormalised; ids unsorted",
                score_function=SIGMOID))
register(Family(
    "MiniMax-M3-VL", ("minimax_m3_vl",), "sigmoid, bias-corrected selection, renormalised; block scales by routed_scaling_factor",
    score_function=SIGMOID, weight_scale=lambda cfg: cfg.routed_scaling_factor,
))
register(Family("AFMoE", ("afmoe",), "sigmoid, bias-corrected selection, renormalised, times route_scale",
                score_function=SIGMOID))
register(Family(
    "Beam", ("beam",), "sigmoid, grouped top-k, bias-corrected selection; block scales by routed_scaling_factor",
    score_function=SIGMOID, weight_scale=lambda cfg: cfg.routed_scaling_factor,
))
register(Family("Flint", ("flint",), "sigmoid top-k, renormalised when norm_topk_prob", score_function=SIGMOID))
register(Family("HY-V3", ("hy_v3",), "sigmoid, bias-corrected selection, renormalised, scaled", score_function=SIGMOID))
register(Family(
    "Inkling", ("inkling", "inkling2"),
    "sigmoid, bias-corrected selection; inkling normalises routed and shared gates together",
    score_function=SIGMOID,
))
register(Family("Kolibri", ("kolibri1",), "bias-corrected top-k of logits, sigmoid weights", score_function=SIGMOID))
register(Family(
    "Laguna", ("laguna",), "soft-capped logits, sigmoid, bias-corrected selection; block scales the routed output",
    score_function=SIGMOID, weight_scale=lambda cfg: cfg.moe_routed_scaling_factor,
))
register(Family("LFM2-MoE", ("lfm2_moe",), "sigmoid, bias-corrected selection, renormalised, scaled",
                score_function=SIGMOID))
register(Family("Muse Spark", ("muse_spark",), "sigmoid, renormalised, scaled; experts in a projected space",
                score_function=SIGMOID))
register(Family(
    "Step 3", ("step3p7",), "sigmoid, bias-corrected selection, renormalised; block scales by moe_router_scaling_factor",
    score_function=SIGMOID, experts_classes=("Step3p7Experts",),
    weight_scale=lambda cfg: cfg.moe_router_scaling_factor,
))

# -- contract-shaped with a twist -----------------------------------------------------------------
register(Family(
    "DBRX", ("dbrx",), "softmax top-k, normalised by the p-norm (moe_normalize_expert_weights)",
    experts_classes=("DbrxExperts",), n_experts_attrs=("ffn_config.moe_num_experts",),
    top_k_attrs=("ffn_config.moe_top_k",),
))
register(Family(
    "LongCat-Flash", ("longcat_flash",),
    "softmax over routed and zero experts, bias-corrected selection, scaled; ids >= E are zero (identity) experts",
    experts_classes=("LongcatFlashExperts",), zero_experts=True,
))
register(Family(
    "Zaya", ("zaya",), "softmax over E + 1 classes (the last means skip), bias-corrected selection; top-1",
    skip_weightless=True, zero_experts=True, notes="a skipped token is recorded as id E with weight 0",
))

# -- families that route differently (own modules) -------------------------------------------------
register(Llama4)
register(JetMoe)
register(Doge)
register(SwitchTransformers)
register(NllbMoe)
