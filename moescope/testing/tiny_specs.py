"""The per-family table of :mod:`moescope.testing.tiny`: generic tiny sizes and, per model type,
how to build a tiny random-weight model of that MoE family (class, config overrides, towers,
selection-bias scale). Data only; :func:`moescope.testing.tiny.tiny_model` does the building."""
from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------------------------------------
# Generic sizes. Applied to the config that holds the MoE settings (the text config of composite
# models) only when that config class has the field, so one table serves every family.
# ---------------------------------------------------------------------------------------------
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    # Multi-head latent attention (DeepSeek-V2/V3 style).
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    # Sparse-attention indexers (DeepSeek-V3.2 style): top-k below the test length so it is active.
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 4,
    # Linear attention / gated delta-net.
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_heads": 2,
    "linear_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    # Mamba internals (CPU runs the pure-PyTorch reference path).
    "mamba_d_state": 8,
    "mamba_dt_rank": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 32,
    "mamba_num_heads": 4,
    "mamba_head_dim": 32,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 8,
    "ssm_state_size": 8,
    "n_groups": 1,
    "chunk_size": 8,
}

# Keys whose ``None`` default switches a feature off (no sliding window, no query LoRA): only shrink
# them when the family turns the feature on by default, so we do not change the architecture.
ONLY_IF_SET_VALUES: dict[str, Any] = {"sliding_window": 8, "q_lora_rank": 32}

# Names of the "number of routed experts" and "experts per token" fields across families.
NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k_experts", "num_experts_per_token", "moe_top_k")
NUM_EXPERTS = 8
TOP_K = 3  # 3 rather than 2 so a bug that swaps or re-sorts the k slots shows up.

# Generic shrinking of the non-text towers (vision, audio) of multimodal models. They never run in
# a text-only forward, but building a full-size tower takes seconds, so they must be tiny too.
TOWER_DEFAULTS: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "depth": 1,
    "num_layers": 1,
    "encoder_layers": 1,
    "num_attention_heads": 2,
    "num_heads": 2,
    "encoder_attention_heads": 2,
    "embed_dim": 32,
    "d_model": 32,
    "encoder_ffn_dim": 64,
    "head_dim": 16,
    "num_key_value_heads": 2,
    "out_hidden_size": 64,  # projected into the text model's hidden size
    "output_dim": 64,
    "projection_dim": 32,
    "mlp_dim": 64,
    "output_channels": 32,
    "vocab_size": 256,
    "projection_intermediate_size": 64,
}

# ---------------------------------------------------------------------------------------------
# The table. Keys of each spec:
#   cls:    transformers class to build.
#   text:   overrides for the config holding the MoE settings (the flat config, or text_config).
#   top:    overrides for the top-level config of composite models.
#   towers: {sub_config_name: overrides} for vision/audio towers (on top of TOWER_DEFAULTS).
#   bias_scale: half-width of the uniform selection-bias draw when 0.1 does not suit the family's
#           score scale (the aim: the bias flips some choices, roughly 10-50% of tokens, not all).
# Comments say why a family needs what it needs; read docs/moe-families.md for the routing.
# "intermediate_size": 32 appears where a family's experts read intermediate_size (it has no
# moe_intermediate_size); "num_hidden_layers" 3 is one dense layer + two MoE layers.
# ---------------------------------------------------------------------------------------------
DENSE_SPARSE_SPARSE = ["dense", "sparse", "sparse"]
GROUPED = {"n_group": 4, "topk_group": 2}  # 8 experts in 4 groups, 2 groups kept: grouping is active

SPECS: dict[str, dict[str, Any]] = {
    "afmoe": {
        "cls": "AfmoeForCausalLM",
        # first layer dense; sliding/full attention alternate; route_scale != 1 so the scaling shows.
        "text": {"num_hidden_layers": 3, "num_dense_layers": 1, "num_shared_experts": 1,
                 "global_attn_every_n_layers": 2, "route_scale": 2.0},
    },
    "aria": {
        "cls": "AriaTextForCausalLM",
        # Aria's experts use `intermediate_size` (there is no moe_intermediate_size).
        "text": {"num_hidden_layers": 2, "intermediate_size": 32, "moe_num_shared_experts": 1},
    },
    "axk1": {
        "cls": "AXK1ForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1, **GROUPED},
    },
    "axk2": {
        "cls": "AXK2ForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1, **GROUPED},
    },
    "bailing_hybrid": {
        "cls": "BailingHybridForCausalLM",
        # One dense layer, then two MoE layers; a group size of 3 mixes linear and full attention.
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "layer_group_size": 3,
                 "n_shared_experts": 1, **GROUPED},
    },
    "beam": {
        "cls": "BeamForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, **GROUPED},
    },
    "cohere2_moe": {
        "cls": "Cohere2MoeForCausalLM",
        # The dense prefix needs its own width; shared experts exist only when num_shared_experts > 0.
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "prefix_dense_intermediate_size": 128,
                 "num_shared_experts": 1, "intermediate_size": 32, "sliding_window_pattern": 2},
    },
    "dbrx": {
        "cls": "DbrxForCausalLM",
        # DBRX names everything differently and nests attention/FFN settings in sub-dicts.
        "text": {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256,
                 # DbrxAttention reads attn_config.rope_theta (no longer a config field in 5.23) and clamps
                 # q/k/v with clip_qkv unconditionally (None crashes), so both must be set.
                 "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 3}},
    },
    "deepseek_ocr2": {
        "cls": "DeepseekOcr2ForConditionalGeneration",
        # group_limited_greedy activates DeepSeek-V2 style grouped selection.
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1,
                 "topk_method": "group_limited_greedy", **GROUPED},
    },
    "deepseek_v2": {
        "cls": "DeepseekV2ForCausalLM",
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_shared_experts": 1,
                 "topk_method": "group_limited_greedy", "routed_scaling_factor": 1.5, **GROUPED},
    },
    "deepseek_v3": {
        "cls": "DeepseekV3ForCausalLM",
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_shared_experts": 1, **GROUPED},
    },
    "deepseek_v32": {
        "cls": "DeepseekV32ForCausalLM",
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_shared_experts": 1, **GROUPED},
    },
    "deepseek_v4": {
        "cls": "DeepseekV4ForCausalLM",
        # Every layer is MoE; the first uses the token-id hash router, the others the learned router.
        "text": {"num_hidden_layers": 3, "mlp_layer_types": ["hash_moe", "moe", "moe"], "o_groups": 2, "o_lora_rank": 16},
    },
    "diffusion_gemma": {
        # Block diffusion: input_ids are the prompt (encoder); logits are for a canvas of canvas_length
        # tokens (decoder), drawn at random from the global RNG when decoder_input_ids is not given.
        "cls": "DiffusionGemmaForBlockDiffusion",
        "text": {"num_hidden_layers": 2},
        "top": {"canvas_length": 8},
    },
    "doge": {
        "cls": "DogeForCausalLM",
        # Product-key routing needs a square number of experts (4 x 4 keys).
        "text": {"num_hidden_layers": 2, "is_moe": True, "num_experts": 16},
    },
    "dots1": {
        "cls": "Dots1ForCausalLM",
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_shared_experts": 1, **GROUPED},
    },
    "dots3_note": {
        "cls": "Dots3NoteForCausalLM",
        # Sliding-window layers take their attention sizes from swa_* aliases (a per-layer config).
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1, **GROUPED,
                 "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_q_lora_rank": 32,
                 "swa_kv_lora_rank": 16, "swa_head_dim": 24, "swa_qk_nope_head_dim": 16, "swa_v_head_dim": 16},
    },
    "ernie4_5_moe": {
        "cls": "Ernie4_5_MoeForCausalLM",
        "text": {"num_hidden_layers": 3, "moe_layer_start_index": 1, "moe_layer_end_index": 2,
                 "moe_layer_interval": 1, "moe_num_shared_experts": 1},
        "bias_scale": 0.03,  # the bias is added to softmax probabilities (~1/8 each)
    },
    "ernie4_5_vl_moe": {
        "cls": "Ernie4_5_VLMoeForConditionalGeneration",
        # Two expert sets per layer (text and vision), each with its own width.
        # 3-D RoPE sections must fit head_dim 16 (8 frequencies: 3 + 3 height/width, 2 time).
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "moe_num_shared_experts": 1,
                 "moe_intermediate_size": [32, 32],
                 "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]}},
        "bias_scale": 0.03,  # the bias is added to softmax probabilities (~1/8 each)
    },
    "exaone_moe": {
        "cls": "ExaoneMoeForCausalLM",
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "num_shared_experts": 1,
                 "sliding_window_pattern": 2, **GROUPED},
    },
    "flex_olmo": {"cls": "FlexOlmoForCausalLM", "text": {"num_hidden_layers": 2}},
    "flint": {
        "cls": "FlintForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_only_layers": [0], "decoder_sparse_step": 1},
    },
    "gemma4": {
        "cls": "Gemma4ForCausalLM",
        # Gemma 4 runs the MoE block in parallel with a dense MLP in every layer once enabled.
        "text": {"num_hidden_layers": 2, "enable_moe_block": True, "hidden_size_per_layer_input": 0},
    },
    "glm4_moe": {
        "cls": "Glm4MoeForCausalLM",
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_shared_experts": 1, **GROUPED},
    },
    "glm4_moe_lite": {
        "cls": "Glm4MoeLiteForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1, **GROUPED},
    },
    "glm4v_moe": {
        "cls": "Glm4vMoeForConditionalGeneration",
        # M-RoPE sections must add up to the 4 rotary frequencies of head_dim 16 x partial factor 0.5.
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_shared_experts": 1, **GROUPED,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                     "mrope_section": [2, 1, 1]}},
    },
    "glm5_next": {
        "cls": "Glm5NextForConditionalGeneration",
        # The indexer's top-k must be a multiple of its key pooling; DSA layers must be NoPE.
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1, **GROUPED,
                 "index_kpool": 2, "qk_rope_head_dim": 0, "qk_nope_head_dim": 16,
                 "layer_types": ["linear_attention", "indexed_attention", "linear_attention"]},
    },
    "glm_moe_dsa": {
        "cls": "GlmMoeDsaForCausalLM",
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_shared_experts": 1, **GROUPED},
    },
    "gpt_oss": {"cls": "GptOssForCausalLM", "text": {"num_hidden_layers": 2, "intermediate_size": 32}},
    "granitemoe": {"cls": "GraniteMoeForCausalLM", "text": {"num_hidden_layers": 2, "intermediate_size": 32}},
    "granitemoe_swa": {
        "cls": "GraniteMoeSWAForCausalLM",
        "text": {"num_hidden_layers": 2, "intermediate_size": 32, "layer_types": ["sliding_attention", "full_attention"]},
    },
    "granitemoehybrid": {
        "cls": "GraniteMoeHybridForCausalLM",
        # Every layer has MoE + shared MLP; the mixers alternate mamba ("linear_attention") and attention.
        "text": {"num_hidden_layers": 3, "intermediate_size": 32,
                 "layer_types": ["linear_attention", "full_attention", "linear_attention"]},
    },
    "granitemoeshared": {"cls": "GraniteMoeSharedForCausalLM", "text": {"num_hidden_layers": 2, "intermediate_size": 32}},
    "hunyuan_v1_moe": {"cls": "HunYuanMoEV1ForCausalLM", "text": {"num_hidden_layers": 2}},
    "hy_v3": {
        "cls": "HYV3ForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "num_shared_experts": 1},
    },
    "hy_v4": {
        "cls": "HYV4ForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1, **GROUPED},
    },
    "inkling": {
        "cls": "InklingForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1,
                 "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16, "sliding_window_size": 8},
    },
    "inkling2": {
        "cls": "Inkling2ForCausalLM",
        "text": {"num_hidden_layers": 2, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
                 "sliding_window_size": 8},
    },
    "jamba": {
        "cls": "JambaForCausalLM",
        # Layers 1 and 3 are attention + MoE, layers 0 and 2 are mamba + dense MLP.
        "text": {"num_hidden_layers": 4, "intermediate_size": 32, "attn_layer_period": 2, "attn_layer_offset": 1,
                 "expert_layer_period": 2, "expert_layer_offset": 1},
    },
    "jetmoe": {
        "cls": "JetMoeForCausalLM",
        # num_attention_heads is derived (kv heads x top-k); each attention expert has kv_channels dims.
        "text": {"num_hidden_layers": 2, "intermediate_size": 32, "kv_channels": 16},
    },
    "kimi_linear": {
        "cls": "KimiLinearForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1,
                 "layer_types": ["linear_attention", "full_attention", "linear_attention"], **GROUPED},
    },
    "kolibri1": {
        "cls": "Kolibri1ForCausalLM",
        "text": {"num_hidden_layers": 2},
        "bias_scale": 0.5,  # the bias is added to raw logits (unit scale), not to sigmoid scores
    },
    "laguna": {
        "cls": "LagunaForCausalLM",
        # Scaling factor and logit soft-capping switched on so both show up in tests.
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE,
                 "num_attention_heads_per_layer": [4, 4, 4], "moe_routed_scaling_factor": 2.0,
                 "moe_router_logit_softcapping": 5.0},
    },
    "lfm2_moe": {
        "cls": "Lfm2MoeForCausalLM",
        "text": {"num_hidden_layers": 3, "num_dense_layers": 1,
                 "layer_types": ["conv", "full_attention", "conv"]},
    },
    "llama4": {
        "cls": "Llama4ForCausalLM",
        # Layer 0 dense, layers 1 and 2 MoE.
        "text": {"num_hidden_layers": 3, "intermediate_size": 32, "intermediate_size_mlp": 128,
                 "moe_layers": [1, 2], "attention_chunk_size": 8},
    },
    "longcat_flash": {
        "cls": "LongcatFlashForCausalLM",
        # Two "zero" (identity) experts so ids >= n_routed_experts occur.
        # head_dim is the rotary (qk_rope) part of the latent attention here.
        "text": {"num_layers": 2, "ffn_hidden_size": 128, "expert_ffn_hidden_size": 32, "zero_expert_num": 2,
                 "head_dim": 8},
        "bias_scale": 0.03,  # the bias is added to softmax probabilities over 10 (8 + 2 zero) experts
    },
    "mellum": {"cls": "MellumForCausalLM", "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE}},
    "mimo_v2_flash": {
        "cls": "MiMoV2FlashForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, **GROUPED},
    },
    "minimax": {
        "cls": "MiniMaxForCausalLM",
        "text": {"num_hidden_layers": 2, "intermediate_size": 32, "block_size": 4,
                 "layer_types": ["linear_attention", "full_attention"]},
    },
    "minimax_m2": {"cls": "MiniMaxM2ForCausalLM", "text": {"num_hidden_layers": 2, "intermediate_size": 32}},
    "minimax_m3_vl": {
        "cls": "MiniMaxM3VLForCausalLM",
        "text": {"num_hidden_layers": 3, "intermediate_size": 32, "dense_intermediate_size": 128,
                 "mlp_layer_types": DENSE_SPARSE_SPARSE, "routed_scaling_factor": 2.0},
    },
    "mistral4": {
        "cls": "Mistral4ForCausalLM",
        "text": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_shared_experts": 1, **GROUPED},
    },
    "mistral_large4": {
        "cls": "MistralLarge4ForConditionalGeneration",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1, **GROUPED},
    },
    "mixtral": {"cls": "MixtralForCausalLM", "text": {"num_hidden_layers": 2, "intermediate_size": 32}},
    "muse_spark": {
        "cls": "MuseSparkForConditionalGeneration",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "moe_hidden_size": 32},
        "top": {"out_hidden_size": 64, "projector_hidden_size": 32},
        "bias_scale": 0.02,  # logits are scaled by output_multiplier (~0.18), so sigmoid scores are close
        # The audio tower is a pyramid with one entry per stage.
        "towers": {"audio_config": {"patch_sizes": [16], "hidden_sizes": [32], "depths": [1]}},
    },
    "nemotron3_5_transcribe": {
        # A speech LM whose language model is Nemotron-H; text-only input_ids skip the audio encoder.
        "cls": "Nemotron3_5TranscribeForConditionalGeneration",
        "text": {"layers_block_type": ["linear_attention", "moe", "full_attention", "moe"],
                 "moe_shared_expert_intermediate_size": 32, **GROUPED},
        "towers": {"audio_config": {"diarization_config": {"head_config": {"hidden_size": 16, "audio_hidden_size": 32}}},
                   "word_timestamp_config": {"blank_token_id": 255}},
    },
    "nemotron_h": {
        "cls": "NemotronHForCausalLM",
        # Mamba, MoE, attention, MoE: the mixers are the non-MoE layers.
        "text": {"layers_block_type": ["linear_attention", "moe", "full_attention", "moe"],
                 "moe_shared_expert_intermediate_size": 32, **GROUPED},
    },
    "nllb_moe": {
        "cls": "NllbMoeForConditionalGeneration",
        # Layer 1 of the encoder and of the decoder is sparse, layer 0 dense.
        "text": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                 "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
                 "encoder_sparse_step": 2, "decoder_sparse_step": 2, "decoder_start_token_id": 2},
    },
    "olmoe": {"cls": "OlmoeForCausalLM", "text": {"num_hidden_layers": 2, "intermediate_size": 32}},
    "openai_privacy_filter": {
        "cls": "OpenAIPrivacyFilterForTokenClassification",
        "text": {"num_hidden_layers": 2, "intermediate_size": 32},
    },
    "phimoe": {
        # sparsemixer always picks exactly 2 experts, whatever num_experts_per_tok says.
        "cls": "PhimoeForCausalLM",
        "text": {"num_hidden_layers": 2, "intermediate_size": 32, "num_experts_per_tok": 2},
    },
    "qwen2_moe": {
        "cls": "Qwen2MoeForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_only_layers": [0], "decoder_sparse_step": 1},
    },
    "qwen3_5_moe": {
        "cls": "Qwen3_5MoeForCausalLM",
        "text": {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]},
    },
    "qwen3_moe": {
        "cls": "Qwen3MoeForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_only_layers": [0], "decoder_sparse_step": 1},
    },
    "qwen3_next": {
        "cls": "Qwen3NextForCausalLM",
        "text": {"num_hidden_layers": 3, "mlp_only_layers": [0], "decoder_sparse_step": 1,
                 "layer_types": ["linear_attention", "linear_attention", "full_attention"]},
    },
    "qwen3_omni_moe": {
        # The thinker is the text-generating half of Qwen3-Omni (the talker speaks audio codes).
        "cls": "Qwen3OmniMoeThinkerForConditionalGeneration",
        "text": {"num_hidden_layers": 3, "mlp_only_layers": [0], "decoder_sparse_step": 1},
        # get_rope_index reads config.vision_start_token_id, which only the outer Qwen3OmniMoeConfig
        # defines: with an attention_mask the thinker crashes without it (value from that config).
        "top": {"vision_start_token_id": 151652},
    },
    "qwen3_vl_moe": {
        "cls": "Qwen3VLMoeForConditionalGeneration",
        "text": {"num_hidden_layers": 3, "mlp_only_layers": [0], "decoder_sparse_step": 1},
    },
    "qwen4_exp": {
        "cls": "Qwen4ExpForCausalLM",
        # "full_attention" layers are QSA-indexed attention; the indexer keeps budget/ratio = 2 key blocks.
        "text": {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"], "hc_lowrank": 8,
                 "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                 "indexer_compress_ratio": 4},
    },
    "solar_open": {"cls": "SolarOpenForCausalLM", "text": {"num_hidden_layers": 2, "n_shared_experts": 1, **GROUPED}},
    "step3p7": {
        "cls": "Step3p7ForConditionalGeneration",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "share_expert_dim": 32,
                 "moe_router_scaling_factor": 2.0, "sliding_window": 8},
    },
    "switch_transformers": {
        "cls": "SwitchTransformersForConditionalGeneration",
        # One sparse layer in the encoder and one in the decoder (layer 1 of 2); a capacity of 3
        # tokens per expert per sequence makes token dropping actually happen at length 12.
        "text": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2,
                 "num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1, "expert_capacity": 3,
                 "decoder_start_token_id": 0},
    },
    "unlimited_ocr": {
        "cls": "UnlimitedOcrForConditionalGeneration",
        "text": {"num_hidden_layers": 3, "mlp_layer_types": DENSE_SPARSE_SPARSE, "n_shared_experts": 1,
                 "topk_method": "group_limited_greedy", **GROUPED},
    },
    "zaya": {
        "cls": "ZayaForCausalLM",
        # The config validator only accepts top-1 routing.
        "text": {"num_hidden_layers": 2, "router_hidden_size": 16, "num_experts_per_tok": 1},
        "bias_scale": 0.02,  # the bias is added to softmax probabilities over 9 classes (8 experts + skip)
    },
}

# Model types in the candidate list that are not MoE language models, or cannot be built.
NOT_BUILDABLE: dict[str, str] = {
    "gemma4_assistant": "not MoE: Gemma4AssistantConfig rejects enable_moe_block=True (a dense drafter for Gemma 4)",
    "gemma4_unified": "not MoE: Gemma 4 unified has no router or experts (base_model_ep_plan = None)",
    "qwen3_5": "not MoE: dense Qwen 3.5 (its config only mentions MoE in a comment)",
    "vitpose_backbone": "not a language model: ViTPose vision backbone whose 'experts' are picked by a dataset index, not routed",
}

TINY_MODEL_TYPES: tuple[str, ...] = tuple(sorted(SPECS))
