"""Every supported architecture family, declared once.

Families whose experts module follows the transformers 5 contract need only a declaration:
the generic capture in :mod:`moescope.adapters.base` hooks what their experts receive.
Families that route differently live in their own modules and are registered here too.
"""
from __future__ import annotations

from moescope.adapters.base import Family
from moescope.adapters.registry import register

register(Family(
    name="OLMoE",
    model_types=("olmoe", "flex_olmo"),
    router="softmax top-k; renormalised when norm_topk_prob",
))
register(Family(
    name="Mixtral",
    model_types=("mixtral", "minimax", "minimax_m2"),
    router="softmax top-k, renormalised",
))
register(Family(
    name="Qwen-MoE",
    model_types=("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_vl_moe", "qwen3_omni_moe"),
    router="softmax top-k; renormalised when norm_topk_prob; gated shared expert",
))
register(Family(
    name="DeepSeek-V3",
    model_types=("deepseek_v3",),
    router="sigmoid, grouped top-k, bias-corrected selection, renormalised, scaled by routed_scaling_factor",
    score_function="sigmoid",
))
