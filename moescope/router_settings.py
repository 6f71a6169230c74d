"""What a model's router does, in numbers: group-limited selection, renormalisation, scaling.

Capture records :func:`router_settings` in the manifest's model description (key
``router_settings``) so that analyses can simulate chance *under the same selection rule* as
the model (a DeepSeek-style group-limited top-k puts most pairs of experts inside the kept
groups; a random-pairing null that ignores that would call the grouping "structure"), and so
that ``inspect`` and the report can say what this model does rather than what its family may do.
Older traces and imported ones have no such key: readers get ``None`` and fall back to the
family-free nulls, with a note.
"""
from __future__ import annotations

from typing import Any

# Attributes under which families keep the factor their router multiplies the weights by.
_SCALE_ATTRS = ("routed_scaling_factor", "moe_routed_scaling_factor", "route_scale", "moe_router_scaling_factor")


def router_settings(cfg: Any, family: Any) -> dict[str, Any]:
    """The routing settings of a loaded model's (text) config, as plain JSON values.

    Returns n_group / topk_group (None when the config has none), grouped (whether the
    selection is group-limited: groups exist, fewer are kept than there are, and topk_method
    is not plain "greedy"), topk_method, norm_topk_prob (None when the config has no such
    switch), routed_scaling_factor (the first scale attribute the config has; None if none),
    score_function (the family's: softmax / sigmoid / ...), fixed_top_k (sparsemixer's 2) and
    capacity (capacity-limited experts that drop tokens).
    """
    n_group, topk_group = getattr(cfg, "n_group", None), getattr(cfg, "topk_group", None)
    method = getattr(cfg, "topk_method", None)
    grouped = bool(n_group and topk_group and int(n_group) > 1 and int(topk_group) < int(n_group)
                   and method != "greedy")
    scale = next((getattr(cfg, a) for a in _SCALE_ATTRS if getattr(cfg, a, None) is not None), None)
    norm = getattr(cfg, "norm_topk_prob", None)
    return {
        "n_group": int(n_group) if n_group else None,
        "topk_group": int(topk_group) if topk_group else None,
        "grouped": grouped,
        "topk_method": method,
        "norm_topk_prob": None if norm is None else bool(norm),
        "routed_scaling_factor": None if scale is None else float(scale),
        "score_function": getattr(cfg, "scoring_func", None) or family.score_function,
        "fixed_top_k": family.fixed_top_k,
        "capacity": bool(family.capacity),
    }


def settings_of(model: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recorded settings of a manifest's model description (None for older or imported traces)."""
    return (model or {}).get("router_settings")


def describe_router(model: dict[str, Any] | None) -> str:
    """One line on what *this* model's router does, e.g. "sigmoid scores; group-limited: 2 of 4
    groups of 2 experts kept per token; top-k weights renormalised; times 2.5". Falls back to the
    family's description when the trace records no settings."""
    model = model or {}
    s = settings_of(model)
    if s is None:
        return str(model.get("router") or "router settings not recorded")
    parts = [f"{s.get('score_function')} scores"]
    if s.get("grouped"):
        E = model.get("n_experts")
        size = f" of {E // s['n_group']} experts" if E and s["n_group"] else ""
        parts.append(f"group-limited top-k: {s['topk_group']} of {s['n_group']} groups{size} kept per token")
    if s.get("fixed_top_k"):
        parts.append(f"fixed top-{s['fixed_top_k']} (sparsemixer)")
    if s.get("norm_topk_prob") is not None:
        parts.append("top-k weights renormalised to sum 1" if s["norm_topk_prob"] else "top-k weights not renormalised")
    if s.get("routed_scaling_factor") not in (None, 1.0):
        parts.append(f"weights times {s['routed_scaling_factor']:g} (routed scaling factor)")
    if s.get("capacity"):
        parts.append("expert capacity limits drop tokens")
    return "; ".join(parts)
