"""The design-choice experiment's result: per-variant rows (from moescope.train.experiment)
summarised over seeds, the study's comparisons, and figures.

Every number sits next to its baseline: perplexity next to the unigram model of the same
validation tokens, NMI next to its permutation chance (see moescope.analysis.specialisation),
the busiest expert's load next to the fair share (max_over_fair = 1).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Callable

from moescope.analysis.result import AnalysisResult

MEASURES = ("domain_nmi", "token_type_nmi", "token_type_nmi_within_sequence", "token_id_nmi",
            "domain_nmi_vocabulary_control")


def cell_name(row: dict[str, Any]) -> str:
    """The variant's name without its seed, e.g. 'token-top2-learned'."""
    return f"{row['routing']}-top{row['top_k']}-{row['router']}"


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per grid cell (routing, top-k, router): means and sds over seeds.

    Keys: name, routing, top_k, router, seeds, mean_ppl / mean_ppl_sd, unigram_mean_ppl, and
    for each of MEASURES: <m> (layer-mean NMI), <m>_chance, <m>_excess (+ _sd), and
    specialises_by (the verdicts of the seeds, joined when they differ).
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[cell_name(row)].append(row)
    out = []
    for name, rs in groups.items():
        first = rs[0]
        ppl, ppl_sd = _mean_sd([r["mean_ppl"] for r in rs])
        entry = {"name": name, "routing": first["routing"], "top_k": first["top_k"], "router": first["router"],
                 "seeds": [r["seed"] for r in rs], "mean_ppl": ppl, "mean_ppl_sd": ppl_sd,
                 "unigram_mean_ppl": _mean_sd([r["unigram_mean_ppl"] for r in rs])[0],
                 "specialises_by": " / ".join(sorted({r["specialises_by"] for r in rs}))}
        for m in MEASURES:
            if any(m not in r for r in rs):  # rows measured before the measure existed
                continue
            entry[m] = _mean_sd([r[m]["mean"]["nmi"] for r in rs])[0]
            entry[f"{m}_chance"] = _mean_sd([r[m]["mean"]["chance"] for r in rs])[0]
            entry[f"{m}_excess"], entry[f"{m}_excess_sd"] = _mean_sd([r[m]["mean"]["excess"] for r in rs])
        out.append(entry)
    return out


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, SD (None for one value), min, max and the values themselves."""
    mean, sd = _mean_sd(values)
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": len(values), "values": values}


def _paired_ratios(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], num: Any, den: Any,
                   split: str) -> list[dict[str, Any]]:
    """Per group (key(row) without `split`): mean ppl ratio num / den of the same seed, over seeds."""
    by: dict[Any, dict[Any, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by[key(r)][r[split]][r["seed"]] = r["mean_ppl"]
    out = []
    for group, sides in by.items():
        seeds = sorted(set(sides.get(num, {})) & set(sides.get(den, {})))
        if seeds:
            ratios = [sides[num][s] / sides[den][s] for s in seeds]
            out.append({"group": group, "seeds": seeds, **{f"ratio_{k}": v for k, v in _spread(ratios).items()}})
    return out


def findings(cell_rows: list[dict[str, Any]], rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The study's three comparisons, as numbers.

    - frozen_vs_learned: per (routing, top-k) with both routers, frozen / learned mean ppl
      (1 = as good; the unigram ppl is the scale of "no model"), from the cell means; with the
      variant `rows`, also the ratio of the same seed's two runs, its mean, SD, min and max
      over seeds (ratio_sd, ratio_min, ratio_max, ratio_values);
    - top1_vs_top2: per (routing, router) with both, top-1 / top-2 mean ppl, with the same spread;
    - by_routing: per routing level, the mean over its cells of each measure's NMI above chance
      and how many variants (cells without `rows`) specialise by token types / domains / neither.
    """
    by = {(c["routing"], c["top_k"], c["router"]): c for c in cell_rows}
    frozen = [{"routing": r, "top_k": k, "ratio": by[(r, k, "frozen")]["mean_ppl"] / by[(r, k, "learned")]["mean_ppl"],
               "learned_ppl": by[(r, k, "learned")]["mean_ppl"], "frozen_ppl": by[(r, k, "frozen")]["mean_ppl"]}
              for (r, k, ro) in by if ro == "learned" and (r, k, "frozen") in by]
    topk = [{"routing": r, "router": ro, "ratio": by[(r, 1, ro)]["mean_ppl"] / by[(r, 2, ro)]["mean_ppl"]}
            for (r, k, ro) in by if k == 2 and (r, 1, ro) in by]
    if rows:
        fr = {p["group"]: p for p in _paired_ratios(rows, lambda r: (r["routing"], r["top_k"]), "frozen", "learned", "router")}
        tk = {p["group"]: p for p in _paired_ratios(rows, lambda r: (r["routing"], r["router"]), 1, 2, "top_k")}
        for f in frozen:
            f.update({k: v for k, v in fr.get((f["routing"], f["top_k"]), {}).items() if k.startswith("ratio_") or k == "seeds"})
        for t in topk:
            t.update({k: v for k, v in tk.get((t["routing"], t["router"]), {}).items() if k.startswith("ratio_") or k == "seeds"})
    by_routing = {}
    for routing in sorted({c["routing"] for c in cell_rows}, reverse=True):
        cs = [c for c in cell_rows if c["routing"] == routing]
        entry = {f"{m}_excess": statistics.fmean(c[f"{m}_excess"] for c in cs) for m in MEASURES
                 if all(f"{m}_excess" in c for c in cs)}
        # verdicts per trained variant (one per seed) when the rows are given, else per cell
        judged = [r for r in rows if r["routing"] == routing] if rows else cs
        entry["verdicts"] = {v: sum(x["specialises_by"] == v for x in judged) for v in ("token types", "domains", "neither")}
        by_routing[routing] = entry
    return {"frozen_vs_learned": frozen,
            "frozen_vs_learned_mean_ratio": statistics.fmean(f["ratio"] for f in frozen) if frozen else None,
            "top1_vs_top2": topk, "by_routing": by_routing}


def design_choices_result(rows: list[dict[str, Any]], params: dict[str, Any], *, figures: bool = True) -> AnalysisResult:
    """The AnalysisResult (analysis "design-choices") of an experiment's variant rows."""
    cell_rows = cells(rows)
    first = rows[0]
    values = {
        "n_variants": len(rows), "n_experts": first["n_experts"], "moe_layers": first["moe_layers"],
        "domains": list(first["domains"]), "unigram_mean_ppl": first["unigram_mean_ppl"],
        "variants": rows, "cells": cell_rows, "findings": findings(cell_rows, rows),
    }
    figs = {}
    if figures:
        from moescope.analysis.design_choices_plots import layer_figure, perplexity_figure, specialisation_figure

        figs = {"perplexity": perplexity_figure(cell_rows), "specialisation": specialisation_figure(cell_rows),
                "layers": layer_figure(rows)}
    return AnalysisResult(analysis="design-choices", values=values, params=params, figures=figs)

