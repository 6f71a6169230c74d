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
# Families that draw from the global RNG in forward (block diffusion's canvas): seeded per call.
_SEEDED = ("diffusion_gemma",)


def tiny_inputs(model: Any) -> dict[str, torch.Tensor]:
    """A (2, 12) batch of random token ids, row 0 left-padded by 3 (plus decoder ids for encoder-decoders)."""
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 250), (BATCH, WIDTH), generator=g)
    mask = torch.ones(BATCH, WIDTH, dtype=torch.long)
    pad = getattr(cfg, "pad_token_id", None)
    pad = 0 if pad is None else pad
    ids[0, :PAD], mask[0, :PAD] = pad, 0
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if getattr(cfg, "is_encoder_decoder", False):
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else pad
        dec = torch.randint(3, min(vocab, 250), (BATCH, 5), generator=g)
        dec[:, 0] = start
        kwargs["decoder_input_ids"] = dec
    return kwargs


def seeded_forward_rng(model: Any) -> None:
    """Seed the global RNG before a forward of a family that draws noise in forward (else nothing)."""
    if str(model.config.model_type).startswith(_SEEDED):
        torch.manual_seed(1)


def prove_tiny(model: Any, **kwargs: Any) -> ModelProof:
    """The read-back proof of a tiny model on :func:`tiny_inputs` (global RNG state kept)."""
    with torch.random.fork_rng(devices=[]):
        seeded_forward_rng(model)
        return prove(model, tiny_inputs(model), **kwargs)


def record_entry(proof: ModelProof) -> dict[str, Any]:
    """What verified.json keeps per model type: the outcome, not platform-dependent digits."""
    return {
        "passed": proof.passed,
        "moe_layers": len(proof.layers),
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
