"""Cost of checking every shard against the manifest when a trace is opened (size + SHA-256).

    .venv/bin/python benchmarks/bench_verify.py              # 10M rows, the bench_analysis.py data
    .venv/bin/python benchmarks/bench_verify.py --rows 1000000   # a smoke run

Builds the same synthetic trace as benchmarks/bench_analysis.py (E=64, top-8, 16 MoE layers,
weights stored) with moescope.testing.synthetic.stream_trace, then times, in fresh
subprocesses (so the per-process cache of verified shards is cold): open_trace with
verify=False, open_trace with verify=True, and one full read of the routes table (what any
analysis does at least once), wall and CPU seconds. Writes docs/results/verify/results.json
(quoted in docs/trace-format.md by scripts/findings_verify.py) and prints it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "verify" / "results.json"
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = r"""
import json, sys, time
import moescope
from moescope.store.reader import open_trace
path, mode = sys.argv[1], sys.argv[2]
t, c = time.perf_counter(), time.process_time()
trace = open_trace(path, verify=(mode == "verify"))
if mode == "read":
    rows = sum(b.num_rows for b in trace.batches("routes", ["seq_id", "pos", "layer", "experts", "weights"]))
print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}))
"""


def timed(path: Path, mode: str, repeats: int) -> dict:
    """Best of `repeats` fresh-process runs of opening (and for "read", reading) the trace."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True,
                             check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["wall"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the results JSON")
    args = parser.parse_args()
    from bench_analysis import SPEC

    from moescope.testing.synthetic import stream_trace

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace"
        manifest = stream_trace(path, rows=args.rows, **SPEC)
        size = sum(p.stat().st_size for p in path.rglob("*.parquet"))
        plain, verified = timed(path, "plain", args.repeats), timed(path, "verify", args.repeats)
        read = timed(path, "read", args.repeats)
        result = {
            "command": " ".join(["benchmarks/bench_verify.py", *sys.argv[1:]]),
            "rows": manifest["totals"]["rows"]["routes"], "shard_files": sum(len(s["files"]) for s in manifest["shards"]),
            "parquet_mb": round(size / 1e6, 1),
            "open_s": round(plain["wall"], 3), "open_verified_s": round(verified["wall"], 3),
            "verify_s": round(verified["wall"] - plain["wall"], 3),
            "verify_cpu_s": round(verified["cpu"] - plain["cpu"], 3),
            "verify_mb_per_s": round(size / 1e6 / max(verified["wall"] - plain["wall"], 1e-9)),
            "read_routes_s": round(read["wall"] - plain["wall"], 3),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
