"""Test fixtures for moescope, none of which touches the network.

- :mod:`moescope.testing.tiny`: tiny, randomly initialised MoE models of every transformers MoE family.
- :mod:`moescope.testing.synthetic`: synthetic traces with planted routing structure.

Names of :mod:`moescope.testing.tiny` are also importable from here; they load torch and
transformers on first use, so importing ``moescope.testing.synthetic`` stays cheap.
"""
from __future__ import annotations

from typing import Any

_TINY = ("NOT_BUILDABLE", "TINY_MODEL_TYPES", "model_class_name", "reinit_routing", "tiny_config", "tiny_model")
__all__ = list(_TINY)


def __getattr__(name: str) -> Any:
    if name in _TINY:
        from moescope.testing import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module 'moescope.testing' has no attribute {name!r}")
