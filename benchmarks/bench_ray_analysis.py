"""Statistics on Ray: 2 workers ÷ 1 worker (goal: >= 1.7x at 200M token-layer rows).

    .venv/bin/python benchmarks/bench_ray_analysis.py                      # 200M rows (~5 GB of trace; run alone)
    .venv/bin/python benchmarks/bench_ray_analysis.py --rows 200000 --reps 1   # a smoke run
    .venv/bin/python benchmarks/bench_ray_analysis.py --analysis agreement   # 200M rows, two traces
    .venv/bin/python benchmarks/bench_ray_analysis.py --analysis compare     # 20M rows, two traces

With --analysis agreement or compare, a second trace B is written next to the first: the
same spec (so the same tokens) with router noise 1.2 instead of 1.0 (some expert sets
differ) and shards of 3/4 the size (so the two traces' shards do not line up); the timed
call is ``agreement(A, B)`` or ``compare_traces(A, B)``, the same way, and the check is
that both settings give the same results.json values. Results go to
benchmarks/results/ray_analysis_<analysis>.md (+ .json).

1. Writes a synthetic trace streaming (moescope.testing.synthetic.stream_trace, the spec of
   bench_out_of_core.py: E=64, k=8, 16 MoE layers, 500-token sequences, 4 labels), in shards
   of --shard-rows rows (the unit of work of a Ray task).
2. Starts a local Ray cluster of 2 CPUs (on loopback) and runs, interleaved --reps times,
   ``routing_statistics(trace, label="label")`` under ``RayCounting(num_workers=1)`` and
   ``RayCounting(num_workers=2)`` (one CPU per task; the driver's own work — merging, the
   DuckDB lookups, the permutation baselines — is the same in both). Times: the counting pass
   alone (``count_routes`` as the statistics call it) and the whole analysis.
3. Checks that both settings give the same counts, and writes
   benchmarks/results/ray_analysis.md (+ .json). Deletes the trace unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
GOAL = 1.7
SPEC = dict(layers=16, n_experts=64, top_k=8, seq_len=500, labels=("a", "b", "c", "d"), biased_layers=(4, 12),
            strength=0.5, vocab=4096, noise=1.0, seed=0)


def timed(fn):  # noqa: ANN001, ANN201
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--analysis", choices=("stats", "agreement", "compare"), default="stats")
    ap.add_argument("--rows", type=int, default=None, help="token-layer rows of the synthetic trace "
                    "(default 200M; 20M for compare, whose shuffle nulls run on every aligned token)")
    ap.add_argument("--shard-rows", type=int, default=1 << 22, help="routes rows per shard (one Ray task each)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each setting")
    ap.add_argument("--permutations", type=int, default=10, help="label shuffles of the statistics' baseline")
    ap.add_argument("--shuffles", type=int, default=20, help="compare: shuffles of each chance level")
    ap.add_argument("--trace", type=Path, default=ROOT / "runs" / "bench-ray-analysis")
    ap.add_argument("--keep", action="store_true", help="leave the trace on disk")
    ap.add_argument("--reuse", action="store_true", help="use a complete trace already at --trace")
    ap.add_argument("--no-count", action="store_true", help="time the whole statistics only (the counting pass "
                    "is inside it): half the passes over the trace")
    args = ap.parse_args()
    if args.rows is None:
        args.rows = 20_000_000 if args.analysis == "compare" else 200_000_000
    if args.analysis != "stats":
        return pair_main(args)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import numpy as np
    import ray

    import moescope
    from moescope.analysis.engine import use_engine
    from moescope.analysis.ray_counts import RayCounting
    from moescope.analysis.routing_counts import count_routes
    from moescope.analysis.stats import routing_statistics
    from moescope.inference import default_jobs
    from moescope.testing.synthetic import stream_trace

    if not (args.reuse and (args.trace / "manifest.json").exists()):
        print(f"writing {args.rows:,} token-layer rows to {args.trace} ...", flush=True)
        gen_s, _ = timed(lambda: stream_trace(args.trace, rows=args.rows, chunk_rows=min(1 << 21, args.shard_rows),
                                              shard_rows=args.shard_rows, **SPEC))
        print(f"  {gen_s:.0f} s", flush=True)
    trace = moescope.open_trace(args.trace)
    n_rows = trace.manifest["totals"]["rows"]["routes"]
    n_shards = len(trace.manifest["shards"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    times: dict[int, dict[str, list[float]]] = {w: {"count": [], "stats": []} for w in (1, 2)}
    loads = {}
    try:
        for rep in range(args.reps):
            for workers in ((1, 2) if rep % 2 == 0 else (2, 1)):
                with use_engine(RayCounting(num_workers=workers)):
                    if not args.no_count:
                        t, counts = timed(lambda: count_routes(trace, phase="all", sequences=True,
                                                               token_experts=trace.has("tokens")))
                        times[workers]["count"].append(t)
                    # the driver's evaluation as the CLI runs it (--jobs 0: a thread per core), same in both
                    t, res = timed(lambda: routing_statistics(trace, label="label", permutations=args.permutations,
                                                              figures=False, n_jobs=default_jobs()))
                    times[workers]["stats"].append(t)
                    loads[workers] = np.asarray(res.values["load"]["counts"])
                print(f"rep {rep}, {workers} worker(s): count {(times[workers]['count'] or [float('nan')])[-1]:.1f} s, "
                      f"statistics {times[workers]['stats'][-1]:.1f} s", flush=True)
    finally:
        ray.shutdown()
    assert np.array_equal(loads[1], loads[2]), "1 and 2 workers counted differently"
    med = {w: {k: statistics.median(v) if v else float("nan") for k, v in d.items()} for w, d in times.items()}
    result = {"rows": n_rows, "shards": n_shards, "reps": args.reps, "permutations": args.permutations,
              "cpus": os.cpu_count(), "seconds": times, "median_seconds": med,
              "speedup_count": med[1]["count"] / med[2]["count"], "speedup_stats": med[1]["stats"] / med[2]["stats"],
              "goal": GOAL}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray_analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Statistics on Ray: 2 workers ÷ 1 worker", "",
        f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/bench_ray_analysis.py --rows {n_rows}"
        f"{' --no-count' if args.no_count else ''} --reps {args.reps}` on "
        f"{os.cpu_count()} CPU cores, a local Ray cluster of 2 CPUs; synthetic trace of {n_rows:,} token-layer rows "
        f"(E = 64, k = 8, 16 MoE layers) in {n_shards} shards; medians of {args.reps} interleaved repetitions.", "",
        "| | 1 worker | 2 workers | 2 ÷ 1 |", "| --- | --- | --- | --- |",
        *([] if args.no_count else [f"| counting pass (s) | {med[1]['count']:.1f} | {med[2]['count']:.1f} | "
                                    f"**{result['speedup_count']:.2f}×** |"]),
        f"| whole statistics (s) | {med[1]['stats']:.1f} | {med[2]['stats']:.1f} | **{result['speedup_stats']:.2f}×** |",
        "", f"Goal ≥ {GOAL}× for the statistics: {'met' if result['speedup_stats'] >= GOAL else 'not met'} at this size.",
    ]
    (RESULTS / "ray_analysis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep and not args.reuse:
        shutil.rmtree(args.trace)


def pair_main(args: argparse.Namespace) -> None:
    """--analysis agreement / compare: 2 workers ÷ 1 worker on two traces of the same tokens."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    import moescope
    from moescope.analysis.agreement_run import agreement
    from moescope.analysis.engine import use_engine
    from moescope.analysis.ray_counts import RayCounting
    from moescope.analysis.routing_inputs import compare_traces
    from moescope.testing.synthetic import stream_trace

    paths = {"a": args.trace, "b": args.trace.with_name(args.trace.name + "-b")}
    sizes = {"a": args.shard_rows, "b": args.shard_rows * 3 // 4}
    for side, path in paths.items():
        if not (args.reuse and (path / "manifest.json").exists()):
            print(f"writing {args.rows:,} token-layer rows to {path} ...", flush=True)
            spec = {**SPEC, "noise": 1.0 if side == "a" else 1.2}
            gen_s, _ = timed(lambda: stream_trace(path, rows=args.rows, chunk_rows=min(1 << 21, args.shard_rows),
                                                  shard_rows=sizes[side], **spec))
            print(f"  {gen_s:.0f} s", flush=True)
    a, b = moescope.open_trace(paths["a"]), moescope.open_trace(paths["b"])
    run = ((lambda: agreement(a, b, figures=False).values) if args.analysis == "agreement"
           else (lambda: compare_traces(a, b, shuffles=args.shuffles).values))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    times: dict[int, list[float]] = {1: [], 2: []}
    values = {}
    try:
        for rep in range(args.reps):
            for workers in ((1, 2) if rep % 2 == 0 else (2, 1)):
                with use_engine(RayCounting(num_workers=workers)):
                    t, values[workers] = timed(run)
                times[workers].append(t)
                print(f"rep {rep}, {workers} worker(s): {args.analysis} {t:.1f} s", flush=True)
    finally:
        ray.shutdown()
    assert json.dumps(values[1], default=str) == json.dumps(values[2], default=str), "1 and 2 workers differ"
    med = {w: statistics.median(v) for w, v in times.items()}
    n_rows = a.manifest["totals"]["rows"]["routes"]
    shards = (len(a.manifest["shards"]), len(b.manifest["shards"]))
    result = {"analysis": args.analysis, "rows": n_rows, "shards": shards, "reps": args.reps, "cpus": os.cpu_count(),
              "seconds": times, "median_seconds": med, "speedup": med[1] / med[2], "goal": GOAL}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"ray_analysis_{args.analysis}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# analyze {args.analysis} on Ray: 2 workers ÷ 1 worker", "",
        f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/bench_ray_analysis.py --analysis {args.analysis} "
        f"--rows {args.rows}` on {os.cpu_count()} CPU cores, a local Ray cluster of 2 CPUs; two synthetic traces of "
        f"{n_rows:,} token-layer rows each (E = 64, k = 8, 16 MoE layers) in {shards[0]} and {shards[1]} shards; "
        f"medians of {args.reps} interleaved repetitions.", "",
        "| | 1 worker | 2 workers | 2 ÷ 1 |", "| --- | --- | --- | --- |",
        *([] if args.no_count else [f"| counting pass (s) | {med[1]['count']:.1f} | {med[2]['count']:.1f} | "
                                    f"**{result['speedup_count']:.2f}×** |"]),
        f"| whole analysis (s) | {med[1]:.1f} | {med[2]:.1f} | **{result['speedup']:.2f}×** |",
    ]
    (RESULTS / f"ray_analysis_{args.analysis}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep and not args.reuse:
        for path in paths.values():
            shutil.rmtree(path)


if __name__ == "__main__":
    main()
