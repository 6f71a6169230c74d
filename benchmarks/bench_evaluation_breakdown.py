"""Where the evaluation half of the analysis benchmark spends its CPU time (no pandas run).

    .venv/bin/python benchmarks/bench_evaluation_breakdown.py              # 10M rows, writes benchmarks/results/evaluation_breakdown.md
    .venv/bin/python benchmarks/bench_evaluation_breakdown.py --rows 300000   # a smoke run (printed only)

Builds the same synthetic trace as bench_analysis.py, gathers the inputs once, then runs
summarise_statistics and evaluate_signatures with the benchmark's settings but on one thread
(n_jobs=1, so that per-part CPU seconds add up), timing every ridge_cv call by kind and every
token-id control fold with process CPU seconds (user + sys: steadier than wall time on a
shared machine).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_analysis as bench  # noqa: E402

RESULTS = bench.RESULTS
EXTRA_LAYER_SHUFFLES = ("per-layer sequential tests: shuffles beyond the shared ones (batches of 200, until 10 "
                        "reach the layer or the Holm-ready budget)")


def _kind(features, kw: dict, S: int, p_main: int) -> str:
    if callable(features):
        return "token identity (bag of tokens, token-id control; whole and per layer)"
    p = features.shape[1]
    if kw.get("permuted_labels") is not None:
        return "routing, all layers, with permutations" if p == p_main else "routing per layer, with permutations"
    return "first-n curve and load-balancing control (1 repeat)"


def breakdown(trace_dir: Path) -> dict:
    import moescope
    from moescope import inference as inf
    from moescope.analysis import signature_controls as sc
    from moescope.analysis import signatures as sg
    from moescope.analysis import stats as st
    from moescope.analysis.stats import gather_statistics_inputs, summarise_statistics

    trace = moescope.open_trace(trace_dir)
    counts = sg.shared_counts(trace, phase="prompt")
    stats_in = gather_statistics_inputs(trace, label=bench.LABEL, counts=counts)
    sig_in = sg.gather_signature_inputs(trace, bench.LABEL, counts=counts)
    S, p_main = len(sig_in.labels), len(trace.moe_layers) * trace.n_experts
    cpu: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    ridge_cv, fold = inf.ridge_cv, sc.TokenIdControl.fold

    in_layers = []  # set while the per-layer sequential tests draw their extra shuffles
    layer_p_value = sg.layer_p_value

    def timed_layer_p_value(*a, **kw):
        in_layers.append(True)
        try:
            return layer_p_value(*a, **kw)
        finally:
            in_layers.pop()

    def timed_ridge_cv(features, y, splits, **kw):
        t = time.process_time()
        out = ridge_cv(features, y, splits, **kw)
        kind = (EXTRA_LAYER_SHUFFLES if in_layers else _kind(features, kw, S, p_main))
        cpu[kind] += time.process_time() - t
        calls[kind] += 1
        return out

    def timed_fold(self, train, test):
        t = time.process_time()
        out = fold(self, train, test)
        cpu["token-id control maps refitted per training fold"] += time.process_time() - t
        calls["token-id control maps refitted per training fold"] += 1
        return out

    stats_parts: dict[str, float] = collections.defaultdict(float)
    originals = {name: getattr(st, name) for name in ("coactivation", "token_specialisation", "label_specialisation",
                                                       "transitions")}

    def timed(name):
        def run(*a, **kw):
            t = time.process_time()
            out = originals[name](*a, **kw)
            stats_parts[name] += time.process_time() - t
            return out
        return run

    inf.ridge_cv, sc.TokenIdControl.fold, sg.layer_p_value = timed_ridge_cv, timed_fold, timed_layer_p_value
    for name in originals:
        setattr(st, name, timed(name))
    try:
        t = time.process_time()
        summarise_statistics(stats_in, label=bench.LABEL, seed=0, figures=False)
        stats_cpu = time.process_time() - t
        t = time.process_time()
        sg.evaluate_signatures(sig_in, label=bench.LABEL, **dict(bench.EVAL, n_jobs=1))
        sig_cpu = time.process_time() - t
    finally:
        inf.ridge_cv, sc.TokenIdControl.fold, sg.layer_p_value = ridge_cv, fold, layer_p_value
        for name, f in originals.items():
            setattr(st, name, f)
    return {"stats": stats_cpu, "signatures": sig_cpu, "parts": dict(cpu), "calls": dict(calls), "sequences": S,
            "stats_parts": dict(stats_parts)}


def render(info: dict, res: dict) -> str:
    lines = ["# Evaluation breakdown", "",
             f"`benchmarks/bench_evaluation_breakdown.py`: the evaluation half of `bench_analysis.py` on "
             f"{info['rows']:,} token-layer rows ({res['sequences']} sequences), one thread, CPU seconds (user + sys). "
             f"Load average before the run: {info['load']:.2f} on {os.cpu_count()} cores.", "",
             "| part | calls | CPU s |", "|---|---:|---:|",
             f"| **routing statistics (summarise_statistics)** | 1 | **{res['stats']:.2f}** |"]
    labels = {"coactivation": "co-activation with its simulated chance (routers replicated per layer)",
              "token_specialisation": "token specialisation (lift, binomial p, simulated purity chance)",
              "label_specialisation": "label specialisation (MI, label permutations)",
              "transitions": "layer-to-layer transitions"}
    for name, sec in sorted(res["stats_parts"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| - {labels[name]} | 1 | {sec:.2f} |")
    lines.append(f"| - everything else (load, weights, phases) | | {res['stats'] - sum(res['stats_parts'].values()):.2f} |")
    lines += [f"| **routing signatures (evaluate_signatures)** | 1 | **{res['signatures']:.2f}** |"]
    for name, sec in sorted(res["parts"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| - {name} | {res['calls'][name]} | {sec:.2f} |")
    rest = res["signatures"] - sum(res["parts"].values())
    lines.append(f"| - everything else (control set-up, load-balanced draws, cosine statistics, splits) | | {rest:.2f} |")
    lines.append(f"| **total evaluation** | | **{res['stats'] + res['signatures']:.2f}** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="rows of the trace (default 10M); a smoke run")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moescope-bench-", dir=args.workdir) as tmp:
        load = os.getloadavg()[0]
        info = bench.make_trace(Path(tmp) / "t", args.rows or 10_000_000)
        info["load"] = load
        res = breakdown(Path(tmp) / "t")
    report = render(info, res)
    print(report)
    if not args.rows:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "evaluation_breakdown.md").write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
