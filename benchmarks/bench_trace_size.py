"""Trace size: bytes per token-layer of the routes table, before and after the encodings of
store/writer.py, on a random-router model and on the built-in model's demo traces.

    .venv/bin/python benchmarks/bench_trace_size.py            # full size (E=64, k=8 model of bench_capture.py)
    .venv/bin/python benchmarks/bench_trace_size.py --quick    # a smaller random model (still E=64, k=8)

Writes docs/results/trace_size/results.json; scripts/findings_trace_size.py turns it into the
figures of docs/benchmarks.md and docs/trace-format.md.

For every trace the same routes table is written (in memory) with
- ``format1``: the options every table had before (dictionary everywhere, zstd 3);
- ``current``: :func:`moescope.store.writer.parquet_options` (what the writer uses now);
- three layouts measured but not adopted: rows sorted by (layer, seq_id, pos) (readers
  count on a token's rows being together), float16 BYTE_STREAM_SPLIT (DuckDB 2.0 cannot
  read it) and float32 BYTE_STREAM_SPLIT (changes the column's type; doubles weights in memory).
Each is checked lossless (ids equal, weights bit-identical in float16) and timed (median of
--reps writes). Also reported: order-0 entropy floors of the weights, which bound what any
per-value encoding can reach.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "results" / "trace_size" / "results.json"
PROMPTS = ROOT / "moescope" / "data" / "prompts"
DEFAULT_MODEL = ROOT / "moescope" / "data" / "default_model"


def random_router_model(quick: bool, vocab: int):
    """The OLMoE-style random MoE of bench_capture.py (E=64, k=8); --quick: smaller hidden/layers."""
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    size = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=32) if quick else \
        dict(hidden_size=512, num_hidden_layers=8, intermediate_size=256)
    cfg = OlmoeConfig(vocab_size=vocab, num_attention_heads=8, num_key_value_heads=8, num_experts_per_tok=8,
                      num_experts=64, pad_token_id=1, eos_token_id=0, bos_token_id=0, max_position_embeddings=1024,
                      **size)
    model = OlmoeForCausalLM(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("gate.weight"):
            torch.nn.init.normal_(p, std=0.02)
    return model


def capture_traces(tmp: Path, quick: bool, sequences: int) -> dict[str, Path]:
    """Capture the three traces: random router, demo tasks (+24 generated), demo shared-vocabulary."""
    from transformers import AutoTokenizer

    from moescope.capture.dataset import RunOptions, capture_dataset
    from moescope.capture.loading import LoadOptions, load_model

    texts = [json.loads(line)["text"] for line in (PROMPTS / "tasks.jsonl").read_text().splitlines() if line.strip()]
    data = tmp / "random.jsonl"
    with open(data, "w", encoding="utf-8") as fh:  # ~250-token texts: four prompts joined
        for i in range(sequences):
            fh.write(json.dumps({"text": " ".join(texts[(i + j) % len(texts)] for j in range(4))}) + "\n")
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    traces = {"random router (E=64, k=8)": tmp / "random"}
    capture_dataset(random_router_model(quick, len(tok)), tok, data, traces["random router (E=64, k=8)"],
                    run=RunOptions(batch_size=8, max_length=256), overwrite=True)
    model, tokenizer = load_model(None, LoadOptions())
    for name, file, new in (("built-in model, demo tasks", "tasks.jsonl", 24),
                            ("built-in model, shared-vocabulary set", "shared_vocab.jsonl", 0)):
        traces[name] = tmp / file.split(".")[0]
        capture_dataset(model, tokenizer, PROMPTS / file, traces[name], run=RunOptions(batch_size=16, generate=new),
                        overwrite=True)
    return traces


def layouts(table: pa.Table) -> dict[str, tuple[pa.Table, dict]]:
    """name -> (table as written, write_table options)."""
    from moescope.store.writer import PARQUET_OPTIONS, parquet_options

    current = parquet_options("routes", table)
    bss16 = dict(current, column_encoding={**current["column_encoding"], "weights.list.element": "BYTE_STREAM_SPLIT"},
                 compression_level={**current["compression_level"], "weights.list.element": 1})
    w32 = table.column("weights").cast(pa.list_(pa.float32()))
    t32 = table.set_column(table.schema.get_field_index("weights"), pa.field("weights", w32.type), w32)
    by_layer = table.sort_by([("layer", "ascending"), ("seq_id", "ascending"), ("pos", "ascending")])
    return {
        "format1": (table, dict(PARQUET_OPTIONS)),
        "current": (table, current),
        "rows sorted by layer (not adopted)": (by_layer, current),
        "float16 BYTE_STREAM_SPLIT (not DuckDB-readable)": (table, bss16),
        "float32 BYTE_STREAM_SPLIT (changes the type)": (t32, bss16),
    }


def _bits(col: pa.ChunkedArray) -> np.ndarray:
    flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float16).view(np.uint16)


def measure(table: pa.Table, reps: int) -> dict[str, dict]:
    """Bytes per row and median write seconds of every layout; asserts each is lossless."""
    out = {}
    for name, (tab, opts) in layouts(table).items():
        times = []
        for _ in range(reps):
            buf = io.BytesIO()
            start = time.perf_counter()
            pq.write_table(tab, buf, **opts)
            times.append(time.perf_counter() - start)
        back = pq.read_table(io.BytesIO(buf.getvalue()))  # what was written reads back exactly
        assert back.select(["seq_id", "pos", "layer", "experts"]).equals(tab.select(["seq_id", "pos", "layer", "experts"]))
        assert np.array_equal(_bits(back.column("weights")), _bits(tab.column("weights"))), name
        out[name] = {"bytes": len(buf.getvalue()), "bytes_per_row": len(buf.getvalue()) / table.num_rows,
                     "write_seconds": statistics.median(times)}
    base = out["format1"]
    for v in out.values():
        v["size_vs_format1"] = v["bytes"] / base["bytes"]
        v["write_time_vs_format1"] = v["write_seconds"] / base["write_seconds"]
    return out


def entropy_bits(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def floors(table: pa.Table, k: int) -> dict[str, float]:
    """Entropy of the weights in bits per weight: order 0, of each byte, and of the within-row
    differences of the (descending) float16 bit patterns (what a delta coder could reach)."""
    w = _bits(table.column("weights")).reshape(-1, k)
    delta = np.concatenate([w[:, :1].astype(np.int32), w[:, :-1].astype(np.int32) - w[:, 1:]], axis=1)
    return {
        "order0_bits_per_weight": entropy_bits(w.ravel()),
        "high_byte_bits": entropy_bits(w.ravel() >> 8),
        "low_byte_bits": entropy_bits(w.ravel() & 0xFF),
        "per_rank_bits_per_weight": sum(entropy_bits(w[:, i]) for i in range(k)) / k,
        "delta_bits_per_weight": sum(entropy_bits(delta[:, i]) for i in range(k)) / k,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller random model (hidden 128, 4 layers)")
    p.add_argument("--sequences", type=int, default=None, help="random-model sequences (default 256; 64 with --quick)")
    p.add_argument("--reps", type=int, default=5, help="timed writes per layout (median)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    sequences = args.sequences or (64 if args.quick else 256)
    import moescope

    results = {"config": {"quick": args.quick, "sequences": sequences, "reps": args.reps,
                          "random_model": "hidden 128, 4 layers" if args.quick else "hidden 512, 8 layers",
                          "pyarrow": pa.__version__},
               "traces": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in capture_traces(Path(tmp), args.quick, sequences).items():
            trace = moescope.open_trace(path)
            table = trace.table("routes")
            e, k = trace.n_experts, trace.top_k
            bound = k * int(np.ceil(np.log2(e))) / 8 + 2 * k
            results["traces"][name] = {"n_experts": e, "top_k": k, "rows": table.num_rows,
                                       "bound_bytes_per_row": bound, "layouts": measure(table, args.reps),
                                       "entropy": floors(table, k)}
            lay = results["traces"][name]["layouts"]
            print(f"{name}: {table.num_rows} rows; bytes/row format1 {lay['format1']['bytes_per_row']:.2f}, "
                  f"current {lay['current']['bytes_per_row']:.2f} (bound {bound:.1f}); "
                  f"write time x{lay['current']['write_time_vs_format1']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
