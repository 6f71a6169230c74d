"""The table `moescope models` prints: every supported model type, its defaults and whether it is verified.

`verified` is not declared: it is the outcome of the read-back proof (:mod:`moescope.verify`)
on the tiny random model of the type, recorded in ``verified.json`` next to this module by
``scripts/verify_all_models.py`` (tests fail when that record is stale).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope.adapters.base import Family, first_attr
from moescope.adapters.registry import families

VERIFIED_PATH = Path(__file__).resolve().parent / "verified.json"
NO_DEFAULT = "ckpt"  # the config class has no default: each checkpoint's config.json sets it


@dataclass(frozen=True)
class CatalogRow:
    model_type: str
    family: str
    router: str
    n_experts: int | str
    top_k: int | str
    n_shared: int | str
    verified: bool  # the read-back proof passes on a tiny random model of this type (verified.json)
    verified_note: str = ""  # why not, when it fails; which layers' experts the proof did not all reach


def load_verified() -> dict[str, Any]:
    """The committed record of the read-back proof per model type (see scripts/verify_all_models.py)."""
    return json.loads(VERIFIED_PATH.read_text(encoding="utf-8"))


def default_config(model_type: str) -> Any:
    """The default config (text part) of the class moescope builds for `model_type`."""
    import transformers

    from moescope.testing.tiny import model_class_name

    config = getattr(transformers, model_class_name(model_type)).config_class()
    return config.get_text_config()


def defaults(model_type: str, family: Family) -> tuple[int | str, int | str, int | str]:
    """(experts, top-k, shared experts) of the config class defaults; NO_DEFAULT where it has none."""
    cfg = default_config(model_type)
    e = first_attr(cfg, family.n_experts_attrs, NO_DEFAULT)
    k = family.fixed_top_k or first_attr(cfg, family.top_k_attrs, NO_DEFAULT)
    s = first_attr(cfg, family.shared_attrs, None)
    if s is None:  # Qwen-style: one gated shared expert when it has a width
        s = 1 if (getattr(cfg, "shared_expert_intermediate_size", 0) or 0) > 0 else 0
    return e, k, s


def catalog() -> list[CatalogRow]:
    """One row per supported model type, sorted by family then model type."""
    record = load_verified()["model_types"]
    rows = []
    for family in families():
        for model_type in family.model_types:
            e, k, s = defaults(model_type, family)
            entry = record.get(model_type, {"passed": False, "reason": "not in verified.json: run scripts/verify_all_models.py"})
            note = "" if entry["passed"] else "; ".join(x for x in (entry["reason"], family.unverified_reason) if x)
            if entry["passed"]:
                note = _partial_reach(entry)
            rows.append(CatalogRow(model_type, family.name, family.router, e, k, s, bool(entry["passed"]), note))
    return sorted(rows, key=lambda r: (r.family.lower(), r.model_type))


def _partial_reach(entry: dict[str, Any]) -> str:
    """A note when the tiny proof left some expert of some layer unreached (those were not checked)."""
    partial = [f"layer {layer}: {r}" for layer, r in sorted(entry.get("experts_reached", {}).items(), key=lambda x: int(x[0]))
               if r.split("/")[0] != r.split("/")[1]]
    return ("experts reached by the proof (the others unchecked), by MoE layer: " + ", ".join(partial)) if partial else ""


def unsupported() -> dict[str, str]:
    """Model types of the pinned transformers that mention experts but have nothing to record, with why."""
    from moescope.testing.tiny import NOT_BUILDABLE

    return dict(sorted(NOT_BUILDABLE.items()))
