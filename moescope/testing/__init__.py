"""Test fixtures for moescope: tiny, randomly initialised MoE models of every transformers MoE family.

Nothing here touches the network: every model is built from a config with random weights.
See :mod:`moescope.testing.tiny`.
"""
from __future__ import annotations

from moescope.testing.tiny import (
    NOT_BUILDABLE,
    TINY_MODEL_TYPES,
    model_class_name,
    reinit_routing,
    tiny_config,
    tiny_model,
)

__all__ = ["NOT_BUILDABLE", "TINY_MODEL_TYPES", "model_class_name", "reinit_routing", "tiny_config", "tiny_model"]
