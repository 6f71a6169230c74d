"""Statistics on Ray: 2 workers ÷ 1 worker (goal: >= 1.7x at 200M token-layer rows).

    .venv/bin/python benchmarks/bench_ray_analysis.py                      # 200M rows (~5 GB of trace; run alone)
    .venv/bin/python benchmarks/bench_ray_analysis.py --rows 200000 --reps 1   # a smoke run

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
    ap.add_argument("--rows", type=int, default=200_000_000, help="token-layer rows of the synthetic trace")
    ap.add_argument("--shard-rows", type=int, default=1 << 22, help="routes rows per shard (one Ray task each)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each setting")
    ap.add_argument("--permutations", type=int, default=10, help="label shuffles of the statistics' baseline")
    ap.add_argument("--trace", type=Path, default=ROOT / "runs" / "bench-ray-analysis")
    ap.add_argument("--keep", action="store_true", help="leave the trace on disk")
    ap.add_argument("--reuse", action="store_true", help="use a complete trace already at --trace")
    ap.add_argument("--no-count", action="store_true", help="time the whole statistics only (the counting pass "
                    "is inside it): half the passes over the trace")
    args = ap.parse_args()

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
        f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/bench_ray_analysis.py --rows {args.rows}` on "
        f"{os.cpu_count()} CPU cores, a local Ray cluster of 2 CPUs; synthetic trace of {n_rows:,} token-layer rows "
        f"(E = 64, k = 8, 16 MoE layers) in {n_shards} shards; medians of {args.reps} interleaved repetitions.", "",
        "| | 1 worker | 2 workers | 2 ÷ 1 |", "| --- | --- | --- | --- |",
        f"| counting pass (s) | {med[1]['count']:.1f} | {med[2]['count']:.1f} | **{result['speedup_count']:.2f}×** |",
        f"| whole statistics (s) | {med[1]['stats']:.1f} | {med[2]['stats']:.1f} | **{result['speedup_stats']:.2f}×** |",
        "", f"Goal ≥ {GOAL}× for the statistics: {'met' if result['speedup_stats'] >= GOAL else 'not met'} at this size.",
    ]
    (RESULTS / "ray_analysis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep and not args.reuse:
        shutil.rmtree(args.trace)


if __name__ == "__main__":
    main()
