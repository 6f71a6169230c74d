"""The read-back proof on the tiny model of every model type, and its committed record.

`moescope models` shows, per model type, whether the proof (:mod:`moescope.verify`) passes on
the tiny random model of that type (:mod:`moescope.testing.tiny`). That outcome is computed by
``scripts/verify_all_models.py`` into ``moescope/adapters/verified.json``; the adapter tests
re-run the proof and fail when the record is stale. Both use the inputs below.
"""
from __future__ import annotations

from typing import Any

import torch

from moescope.verify import ModelProof, prove

BATCH, WIDTH, PAD = 2, 12, 3  # row 0 is left-padded by PAD positions
# Model types whose 2 x 12 random tokens leave some expert of some MoE layer unreached: their rows
# are this many tokens wide instead (the smallest width, in steps of doubling, that reaches every
# expert of every MoE layer; found by scripts/verify_all_models.py --find-widths). An expert no
# token reaches is not checked by the proof (an adapter swapping two such experts would pass), so
# tests/test_adapters.py asserts every expert is reached and fails if this table falls short.
WIDER: dict[str, int] = {"afmoe": 24, "axk2": 24, "beam": 24, "doge": 24, "laguna": 24, "phimoe": 24,
                         # not every expert even at 384 (see PARTIAL_REACH); 96 is where reach stops growing
                         "switch_transformers": 96, "zaya": 96}
# Model types whose tiny model leaves experts unreached at any width (checked up to 384 tokens a
# row, and with other seeds): (layer, experts reached, experts) per such layer, and why.
PARTIAL_REACH: dict[str, tuple[list[tuple[int, int, int]], str]] = {
    "zaya": ([(0, 7, 8), (1, 7, 8)],
             "its router is an MLP whose GELU features are nearly non-negative: with random weights, one "
             "class's logit is never the largest (the same with other routing seeds and full-vocabulary inputs)"),
    "switch_transformers": ([(3, 6, 8)],
                            "top-1 routing of decoder states that vary little: 2 of 8 experts of the decoder's "
                            "sparse layer get no token even at 2 x 160 decoder tokens (the encoder's layer reaches all 8)"),
    "nllb_moe": ([(1, 2, 8), (3, 2, 8)],
                 "transformers 5.23's NllbMoeExperts runs only expert_0 and expert_1 (the proof fails there, as it should)"),
}
# Families that draw from the global RNG in forward (block diffusion's canvas): seeded per call.
_SEEDED = ("diffusion_gemma",)


def width_for(model: Any) -> int:
    """Tokens per row of :func:`tiny_inputs` for this model's type (12 unless listed in `WIDER`)."""
    return WIDER.get(str(model.config.model_type), WIDTH)


def tiny_inputs(model: Any, width: int | None = None) -> dict[str, torch.Tensor]:
    """A (2, width) batch of random token ids, row 0 left-padded by 3 (plus decoder ids for
    encoder-decoders, 5 per 12 tokens of width); width defaults to :func:`width_for`."""
    width = width or width_for(model)
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 250), (BATCH, width), generator=g)
    mask = torch.ones(BATCH, width, dtype=torch.long)
    pad = getattr(cfg, "pad_token_id", None)
    pad = 0 if pad is None else pad
    ids[0, :PAD], mask[0, :PAD] = pad, 0
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if getattr(cfg, "is_encoder_decoder", False):
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else pad
        dec = torch.randint(3, min(vocab, 250), (BATCH, 5 * width // WIDTH), generator=g)
        dec[:, 0] = start
        kwargs["decoder_input_ids"] = dec
    return kwargs


def seeded_forward_rng(model: Any) -> None:
    """Seed the global RNG before a forward of a family that draws noise in forward (else nothing)."""
    if str(model.config.model_type).startswith(_SEEDED):
        torch.manual_seed(1)


def prove_tiny(model: Any, width: int | None = None, **kwargs: Any) -> ModelProof:
    """The read-back proof of a tiny model on :func:`tiny_inputs` (global RNG state kept)."""
    with torch.random.fork_rng(devices=[]):
        seeded_forward_rng(model)
        return prove(model, tiny_inputs(model, width), **kwargs)


def unreached(proof: ModelProof) -> list[tuple[int, int, int]]:
    """(layer, experts reached, experts) of every MoE layer where some expert got no token."""
    return [(p.layer, p.experts_reached, p.n_experts) for p in proof.layers if p.experts_reached < p.n_experts]


def record_entry(proof: ModelProof) -> dict[str, Any]:
    """What verified.json keeps per model type: the outcome, not platform-dependent digits."""
    return {
        "passed": proof.passed,
        "moe_layers": len(proof.layers),
        "experts_reached": {str(p.layer): f"{p.experts_reached}/{p.n_experts}" for p in proof.layers},
        "reason": "; ".join(f"layer {p.layer}: {_what_differs(p)}" for p in proof.layers if not p.passed),
    }


def _what_differs(layer: Any) -> str:
    """A failure in words without digits (they vary by platform): which of the checks failed."""
    parts = []
    if layer.experts_match < 1.0:
        parts.append("experts")
    if layer.max_weight_error > layer.tolerance:
        parts.append("weights")
    return (" and ".join(parts) + " read back differ from the record") if parts else layer.reason
