"""The one place adapters are registered, keyed by ``config.model_type``."""
from __future__ import annotations

import difflib
import re
from typing import Any

from moescope.adapters.base import Family
from moescope.errors import UnsupportedModelError

_BY_MODEL_TYPE: dict[str, Family] = {}
_FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    """Register a family for each of its model types; a model type may be claimed once."""
    for model_type in family.model_types:
        if model_type in _BY_MODEL_TYPE:
            raise ValueError(f"model type {model_type!r} is registered twice ({_BY_MODEL_TYPE[model_type].name}, {family.name})")
        _BY_MODEL_TYPE[model_type] = family
    _FAMILIES.append(family)
    return family


def _load_builtin() -> None:
    if not _FAMILIES:
        import moescope.adapters.families  # noqa: F401  (registers on import)


def families() -> list[Family]:
    """Every registered family, in registration order."""
    _load_builtin()
    return list(_FAMILIES)


def model_types() -> list[str]:
    """Every supported model type, sorted."""
    _load_builtin()
    return sorted(_BY_MODEL_TYPE)


def family_for(model_type: str) -> Family:
    """The family that handles `model_type`, or an UnsupportedModelError that says what to do."""
    _load_builtin()
    family = _BY_MODEL_TYPE.get(model_type)
    if family is not None:
        return family
    close = difflib.get_close_matches(model_type, list(_BY_MODEL_TYPE), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnsupportedModelError(
        f"no moescope adapter for model type {model_type!r}{hint}; if it is an MoE model, add a Family for it in "
        "moescope/adapters/families.py (see docs/adapters.md), or run `moescope models` for the supported types"
    )


_MOE_HINTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "num_experts_per_tok")


def _candidates(config: Any) -> list[str]:
    """Registry keys to try: the config's model_type and its text config's, normalised
    (configs say ``nllb-moe``, ``qwen3_vl_moe_text``, ``qwen3_omni_moe_thinker``...)."""
    from moescope.adapters.base import text_config

    keys = []
    for cfg in (config, text_config(config)):
        raw = getattr(cfg, "model_type", "") or ""
        for key in (raw, re.sub(r"_(text|thinker)$", "", raw.replace("-", "_"))):
            if key and key not in keys:
                keys.append(key)
    return keys


def family_for_config(config: Any) -> Family:
    """The family for a transformers config; says so plainly when the model is dense."""
    model_type = getattr(config, "model_type", "") or ""
    _load_builtin()
    for key in _candidates(config):
        if key in _BY_MODEL_TYPE:
            return _BY_MODEL_TYPE[key]
    from moescope.adapters.base import text_config

    cfg = text_config(config)
    if not any(getattr(cfg, hint, None) for hint in _MOE_HINTS):
        raise UnsupportedModelError(
            f"{model_type or 'this model'} has no MoE layers (a dense model): there is no routing to record; "
            "pass a mixture-of-experts model"
        )
    return family_for(model_type)


def family_for_model(model: Any) -> Family:
    """The family for a loaded transformers model (by its config's model_type)."""
    return family_for_config(model.config)
