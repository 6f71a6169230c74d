"""The table `moescope models` prints: every supported model type and its defaults."""
from __future__ import annotations

from dataclasses import dataclass

from moescope.adapters.base import first_attr, text_config
from moescope.adapters.registry import families


@dataclass(frozen=True)
class CatalogRow:
    model_type: str
    family: str
    router: str
    n_experts: int | str
    top_k: int | str
    n_shared: int | str
    verified: bool  # a tiny random model of this type passes the correctness tests in tests/


def _config_model_type(directory: str) -> str:
    """The config `model_type` of a transformers model directory (``nllb_moe`` -> ``nllb-moe``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    for model_type in CONFIG_MAPPING_NAMES:
        if model_type_to_module_name(model_type) == directory:
            return model_type
    return directory


def _defaults(model_type: str, family) -> tuple:  # noqa: ANN001
    from transformers import AutoConfig

    try:
        cfg = text_config(AutoConfig.for_model(_config_model_type(model_type)))
    except Exception:
        return "?", "?", "?"
    e = first_attr(cfg, family.n_experts_attrs, "?")
    k = family.fixed_top_k or first_attr(cfg, family.top_k_attrs, "?")
    s = first_attr(cfg, family.shared_attrs, None)
    if s is None:  # Qwen-style: one gated shared expert when it has a width
        s = 1 if (getattr(cfg, "shared_expert_intermediate_size", 0) or 0) > 0 else 0
    return e, k, s


def catalog() -> list[CatalogRow]:
    """One row per supported model type, sorted by family then model type."""
    from moescope.testing.tiny import TINY_MODEL_TYPES

    rows = []
    for family in families():
        for model_type in family.model_types:
            e, k, s = _defaults(model_type, family)
            rows.append(CatalogRow(model_type, family.name, family.router, e, k, s,
                                   family.verified and model_type in TINY_MODEL_TYPES))
    return sorted(rows, key=lambda r: (r.family.lower(), r.model_type))


def unsupported() -> dict[str, str]:
    """Model types of the pinned transformers that mention experts but have nothing to record, with why."""
    from moescope.testing.tiny import NOT_BUILDABLE

    return dict(sorted(NOT_BUILDABLE.items()))
