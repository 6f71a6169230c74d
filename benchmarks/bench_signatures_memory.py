"""Signatures peak memory against the number of sequences (goal: < 4 GiB at 250,000).

    .venv/bin/python benchmarks/bench_signatures_memory.py                      # 25,000 and 250,000 sequences
    .venv/bin/python benchmarks/bench_signatures_memory.py --sequences 2000     # a quick look
    options: --permutations N (default 200, the CLI's), --extra "--folds 2 --repeats 1" (more
             analyze options), --seq-len 32, --keep / --reuse (keep the
             traces under --dir, then rerun the analyses only), --out FILE (default
             benchmarks/results/signatures_memory.md; "-" prints only), --append (add this run's table
             to --out), --generate-only (write the traces, keep them, stop)

1. Writes one synthetic trace per sequence count, streaming (moescope.testing.synthetic.stream_trace,
   memory bounded by one chunk): E=64, k=8, 16 MoE layers, --seq-len tokens per sequence,
   4 labels (label-biased routing at layers 4 and 12, the rest noise), a vocabulary of 1,024
   token ids, tokens table present (so the bag-of-tokens and the per-fold token-id control run).
2. Runs `moescope analyze signatures TRACE --label label --out DIR` (default options except
   --permutations) in a fresh process and reads its peak RSS from the kernel (wait4 ru_maxrss of
   that child alone) and its wall time.
3. Writes the table to --out. Wall times depend on the machine's load; peak RSS does not.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_GIB = 4.0
SPEC = dict(layers=16, n_experts=64, top_k=8, labels=("a", "b", "c", "d"), biased_layers=(4, 12), strength=0.5,
            vocab=1024, noise=1.0, seed=0)


def generate(trace: Path, n_seq: int, seq_len: int) -> dict:
    """Write the trace in a subprocess; returns its seconds and peak RSS (GiB)."""
    code = ("import json, time, resource; from moescope.testing.synthetic import stream_trace; "
            f"t = time.perf_counter(); stream_trace({str(trace)!r}, rows={n_seq * seq_len * SPEC['layers']}, "
            f"seq_len={seq_len}, chunk_rows=1 << 21, shard_rows=1 << 22, **{SPEC!r}); "
            "print(json.dumps({'seconds': time.perf_counter() - t, "
            "'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        sys.exit(f"generation failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def measure(trace: Path, out: Path, permutations: int, extra: list[str]) -> dict:
    """`analyze signatures` in a fresh process: wall seconds, its own peak RSS, the result's size."""
    cmd = [sys.executable, "-m", "moescope.cli", "analyze", "signatures", str(trace), "--label", "label",
           "--out", str(out), "--permutations", str(permutations), *extra]
    log = out.parent / "analyze.log"
    started = time.perf_counter()
    with open(log, "w") as sink:  # a file, not a pipe: the child never blocks on a full pipe
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=_env())
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (its peak RSS alone)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"analyze signatures failed ({code}):\n{log.read_text()[-3000:]}")
    values = json.loads((out / "results.json").read_text())
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20, "n_sequences": values["n_sequences"],
            "cv_accuracy": values["cv_accuracy_mean"], "token_id_control_per_fold": values["token_id_control_fitted_per_fold"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, nargs="+", default=[25_000, 250_000])
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--extra", default="", help="more `analyze signatures` options, e.g. \"--folds 2 --repeats 1\"")
    ap.add_argument("--dir", type=Path, default=ROOT / "runs" / "bench-signatures-memory")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "signatures_memory.md"))
    ap.add_argument("--append", action="store_true", help="add this run's table under those already in --out")
    ap.add_argument("--generate-only", action="store_true", help="write the traces (kept) and stop")
    args = ap.parse_args()
    rows = []
    for n_seq in args.sequences:
        trace = args.dir / f"s{n_seq}"
        gen = None
        if not (args.reuse and (trace / "manifest.json").exists()):
            print(f"writing {n_seq:,} sequences x {args.seq_len} tokens to {trace} ...", flush=True)
            gen = generate(trace, n_seq, args.seq_len)
        if args.generate_only:
            print(f"  {gen}", flush=True)
            continue
        size = sum(p.stat().st_size for p in trace.rglob("*") if p.is_file())
        with tempfile.TemporaryDirectory() as tmp:
            print(f"analyze signatures on {n_seq:,} sequences ...", flush=True)
            r = measure(trace, Path(tmp) / "out", args.permutations, args.extra.split())
        r.update(sequences=n_seq, trace_gib=size / 2**30, generation=gen)
        print(f"  {json.dumps(r)}", flush=True)
        rows.append(r)
        if not args.keep:
            shutil.rmtree(trace)
    if args.generate_only:
        return
    report = render(rows, args)
    print(report)
    if args.out != "-":
        out = Path(args.out)
        if args.append and out.exists():  # one table per run, the title once
            report = out.read_text() + "\n" + report.split("\n", 2)[2]
        out.write_text(report)


def render(rows: list[dict], args: argparse.Namespace) -> str:
    load = os.getloadavg()[0]
    lines = [
        "# Signatures: peak memory against the number of sequences", "",
        f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/bench_signatures_memory.py --sequences "
        f"{' '.join(map(str, args.sequences))} --seq-len {args.seq_len} --permutations {args.permutations}"
        f"{' --extra ' + repr(args.extra) if args.extra else ''}` on "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()} (load average {load:.1f} at the end: wall "
        "times are pessimistic on a shared machine; peak RSS is not affected). Peak RSS = the kernel's ru_maxrss of "
        f"the fresh process running `moescope analyze signatures` (goal < {GOAL_GIB:g} GiB).", "",
        f"Traces: E=64, k=8, 16 MoE layers, {args.seq_len} tokens per sequence, 4 labels, vocabulary 1,024 token "
        "ids, tokens table present (bag-of-tokens and per-fold token-id control run), no groups; default options "
        f"(5 x 5 CV, 3 load-balancing draws, figures) except --permutations {args.permutations}"
        f"{' ' + args.extra if args.extra else ''}.", "",
        "| sequences | token-layer rows | trace on disk | wall time | peak RSS | goal |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        met = "met" if r["peak_rss_gib"] < GOAL_GIB else "NOT met"
        lines.append(f"| {r['sequences']:,} | {r['sequences'] * args.seq_len * 16:,} | {r['trace_gib']:.2f} GiB | "
                     f"{r['seconds']:.0f} s | **{r['peak_rss_gib']:.2f} GiB** | < {GOAL_GIB:g} GiB: {met} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
