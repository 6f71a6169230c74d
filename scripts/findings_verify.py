"""The cost of checking shards on open, quoted in docs/trace-format.md, from
docs/results/verify/results.json (written by benchmarks/bench_verify.py)."""
from __future__ import annotations

from findings_common import REPO, load_results, main_for


def render() -> dict:
    r = load_results("verify")
    text = (
        f"on a synthetic trace of {r['rows']:,} token-layer rows ({r['parquet_mb']:.0f} MB of Parquet in "
        f"{r['shard_files']} shard files; E=64, top-8, weights stored), checking every shard took "
        f"{r['verify_s']:.2f} s ({r['verify_cpu_s']:.2f} s CPU, {r['verify_mb_per_s']:,} MB/s) in a fresh process, "
        f"against {r['read_routes_s']:.2f} s for one read of the routes table, which any analysis does at "
        f"least once: about {100 * r['verify_s'] / r['read_routes_s']:.0f}% of a single pass. The check scales "
        f"with the bytes on disk. Measured with `.venv/bin/python {r['command']}` "
        "(`.venv/bin/python benchmarks/bench_verify.py` for the 10M-row data of benchmarks/bench_analysis.py)."
    )
    return {REPO / "docs" / "trace-format.md": {"verify-cost": text}}


if __name__ == "__main__":
    main_for(render)
