"""Out-of-core benchmark: statistics and signatures over a trace far larger than memory.

    .venv/bin/python benchmarks/bench_out_of_core.py                 # 200M token-layer rows (goal: < 4 GiB each)
    .venv/bin/python benchmarks/bench_out_of_core.py --rows 20000000 # a quicker look
    options: --keep (leave the trace on disk), --reuse (use a complete trace already at --trace),
             --duckdb-memory-limit 3GB / --duckdb-threads 2 (set on the trace's DuckDB connection)

1. Writes a synthetic trace streaming (moescope.testing.synthetic.stream_trace; memory bounded
   by one chunk): E=64, k=8, 16 MoE layers, sequences of 500 tokens with 4 labels (label-biased
   routing at two layers, the rest uniform noise), weights included, so --rows 200M means
   12.5M tokens in 25,000 sequences.
2. Runs routing_statistics(label="label") and routing_signatures(label="label"), each in a
   fresh subprocess, and reports wall time and peak RSS (the child's own ru_maxrss, so the
   generator's memory is not counted). Permutation baselines are cut to --permutations (time
   grows linearly with them, memory does not).
3. Writes benchmarks/results/out_of_core.md and deletes the trace unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GOAL_GIB = 4.0
SPEC = dict(layers=16, n_experts=64, top_k=8, seq_len=500, labels=("a", "b", "c", "d"), biased_layers=(4, 12),
            strength=0.5, vocab=4096, noise=1.0, seed=0)
BYTES_PER_ROW = 25  # measured ~20 (routes + tokens + sequences, zstd); a margin for the disk check


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def child(kind: str, trace_dir: str, permutations: int, memory_limit: str | None, threads: int | None) -> None:
    """Run one analysis in this (fresh) process and print a JSON line with its figures."""
    from moescope import open_trace

    trace = open_trace(trace_dir)
    if memory_limit:
        trace.con.execute(f"SET memory_limit = '{memory_limit}'")
    if threads:
        trace.con.execute(f"SET threads = {int(threads)}")
    started = time.perf_counter()
    if kind == "stats":
        from moescope.analysis.stats import routing_statistics

        result = routing_statistics(trace, label="label", permutations=permutations)
        check = {"tokens_layer0": int(result.values["n_tokens"][0])}
    else:
        from moescope.analysis.signatures import routing_signatures

        result = routing_signatures(trace, label="label", permutations=permutations, control_draws=1)
        check = {"n_sequences": int(result.values["n_sequences"])}
    print(json.dumps({"kind": kind, "seconds": time.perf_counter() - started, "peak_rss_gib": peak_rss_gib(),
                      **check}), flush=True)


def run_child(kind: str, trace_dir: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--trace", str(trace_dir), "--permutations", str(args.permutations)]
    if args.duckdb_memory_limit:
        cmd += ["--duckdb-memory-limit", args.duckdb_memory_limit]
    if args.duckdb_threads:
        cmd += ["--duckdb-threads", str(args.duckdb_threads)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.perf_counter() - started  # includes imports and opening the trace
    return out


def generate(trace_dir: Path, rows: int) -> dict:
    """Write the trace in a subprocess (its memory is reported separately)."""
    code = ("import json, sys, time, resource; from moescope.testing.synthetic import stream_trace; "
            f"t = time.perf_counter(); m = stream_trace({str(trace_dir)!r}, rows={rows}, chunk_rows=1 << 21, "
            f"shard_rows=1 << 22, **{SPEC!r}); "
            "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_gib': "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 'totals': m['totals']}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"generation failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000_000)
    ap.add_argument("--trace", type=Path, default=ROOT / "runs" / "bench-out-of-core")
    ap.add_argument("--permutations", type=int, default=10)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--duckdb-memory-limit", default=None)
    ap.add_argument("--duckdb-threads", type=int, default=None)
    ap.add_argument("--child", choices=["stats", "signatures"])
    args = ap.parse_args()
    if args.child:
        child(args.child, str(args.trace), args.permutations, args.duckdb_memory_limit, args.duckdb_threads)
        return

    need = args.rows * BYTES_PER_ROW
    free = shutil.disk_usage(args.trace.parent if args.trace.parent.exists() else ROOT).free
    if not args.reuse and free < 2 * need:
        sys.exit(f"need ~{need / 1e9:.1f} GB (x2 margin) free for the trace, {free / 1e9:.1f} GB free")
    gen = None
    if not (args.reuse and (args.trace / "manifest.json").exists()):
        print(f"writing {args.rows:,} token-layer rows to {args.trace} ...", flush=True)
        gen = generate(args.trace, args.rows)
        print(f"  {gen['seconds']:.0f} s, peak {gen['peak_rss_gib']:.2f} GiB", flush=True)
    size = sum(p.stat().st_size for p in args.trace.rglob("*") if p.is_file())
    manifest = json.loads((args.trace / "manifest.json").read_text())
    results = {}
    for kind in ("stats", "signatures"):
        print(f"{kind} ...", flush=True)
        results[kind] = run_child(kind, args.trace, args)
        print(f"  {results[kind]}", flush=True)
    write_report(args, manifest, size, gen, results)
    if not args.keep:
        shutil.rmtree(args.trace)


def write_report(args: argparse.Namespace, manifest: dict, size: int, gen: dict | None, results: dict) -> None:
    rows = manifest["totals"]["rows"]
    n_seq = manifest["totals"]["n_sequences"]
    lines = [
        "# Out-of-core analyses", "",
        f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/bench_out_of_core.py` on {os.cpu_count()} CPU cores, "
        f"{platform.python_version()}; peak memory = ru_maxrss of a fresh process running one analysis "
        f"(goal < {GOAL_GIB:g} GiB each). DuckDB settings: memory_limit {args.duckdb_memory_limit or 'default (80% of RAM)'}, "
        f"threads {args.duckdb_threads or 'default'}; permutation baselines: {args.permutations}.", "",
        "| trace | |", "| --- | --- |",
        f"| routes rows (token x MoE layer) | {rows['routes']:,} |",
        f"| tokens / sequences | {rows.get('tokens', 0):,} / {n_seq:,} (500 tokens each, 4 labels) |",
        f"| model | E={manifest['model']['n_experts']}, k={manifest['model']['top_k']}, "
        f"{len(manifest['model']['moe_layers'])} MoE layers, weights recorded |",
        f"| on disk | {size / 2**30:.2f} GiB ({size / rows['routes']:.1f} bytes per token-layer row) |",
    ]
    if gen:
        lines.append(f"| writing it (stream_trace) | {gen['seconds']:.0f} s, peak {gen['peak_rss_gib']:.2f} GiB |")
    lines += ["", "| analysis | wall time | peak RSS | goal |", "| --- | --- | --- | --- |"]
    for kind, r in results.items():
        ok = "met" if r["peak_rss_gib"] < GOAL_GIB else "**not met**"
        lines.append(f"| {kind} | {r['wall_seconds']:.0f} s (analysis {r['seconds']:.0f} s) | "
                     f"{r['peak_rss_gib']:.2f} GiB | < {GOAL_GIB:g} GiB: {ok} |")
    lines += ["", "Rerun: `.venv/bin/python benchmarks/bench_out_of_core.py` (add `--keep` to keep the trace, "
              "then `--reuse` to rerun the analyses only)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "out_of_core.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print((RESULTS / "out_of_core.md").read_text())


if __name__ == "__main__":
    main()
