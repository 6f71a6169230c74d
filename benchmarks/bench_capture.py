"""Capture benchmark: overhead, bytes on disk, and memory, as ratios measured in one run.

    .venv/bin/python benchmarks/bench_capture.py            # everything, writes benchmarks/results/capture.md
    .venv/bin/python benchmarks/bench_capture.py --quick    # smaller model and data (a smoke run)

Model: an OLMoE-style MoE with random weights, sized to be realistic for a 2-core CPU
(hidden 512, 8 layers, 64 experts of 256, top-8: ~210M parameters, ~30M active per token).
Routing of a random model is close to uniform, which is the hard case for compression.

1. Throughput: the same batches through (a) a plain forward loop and (b) capture_dataset
   (hooks + assembling + Parquet writing in the background thread), interleaved
   repetitions in one process; ratio = capture throughput / plain throughput (goal >= 0.97).
2. Bytes per token-layer on disk vs the information bound k*ceil(log2 E)/8 + 2k
   (goal <= 1.2x), and vs a per-token JSONL trace of the same routing (goal >= 10x smaller).
3. Peak memory (ru_maxrss of a fresh subprocess) capturing N vs 10N tokens (goal <= 1.1x).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def build_model(quick: bool, vocab: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    size = dict(hidden_size=256, num_hidden_layers=4, num_experts=32, intermediate_size=128) if quick else \
        dict(hidden_size=512, num_hidden_layers=8, num_experts=64, intermediate_size=256)
    cfg = OlmoeConfig(vocab_size=vocab, num_attention_heads=8, num_key_value_heads=8, num_experts_per_tok=8,
                      pad_token_id=1, eos_token_id=0, bos_token_id=0, max_position_embeddings=1024, **size)
    model = OlmoeForCausalLM(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("gate.weight"):
            torch.nn.init.normal_(p, std=0.02)
    return model


def make_data(path: Path, n: int, tokenizer) -> Path:
    """n texts of ~200 tokens from the corpus validation split (or generated if absent)."""
    source = ROOT / "runs" / "corpus" / "text"
    texts: list[str] = []
    for domain in ("technical", "narrative", "code", "definitions"):
        f = source / f"{domain}.val.jsonl"
        if f.exists():
            for line in f.read_text(encoding="utf-8").splitlines():
                doc = json.loads(line)["text"]
                for i in range(0, len(doc), 800):
                    if len(doc[i:i + 800]) > 400:
                        texts.append(doc[i:i + 800])
    if not texts:
        texts = [" ".join(f"word{j % 97} number {j}" for j in range(i, i + 150)) for i in range(200)]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": texts[i % len(texts)]}) + "\n")
    return path


def load_tokenizer():
    from transformers import AutoTokenizer

    tok_dir = ROOT / "runs" / "corpus" / "tokenizer"
    if not tok_dir.exists():
        sys.exit("build the corpus first: moescope data --out runs/corpus")
    return AutoTokenizer.from_pretrained(tok_dir)


def plain_pass(model, tokenizer, data: Path, batch_size: int, max_length: int) -> int:
    """The same batches as capture_dataset, forward only; returns tokens processed."""
    from moescope.capture.data import TextDataset
    from moescope.capture.dataset import _batches, _tokenize

    tokens = 0
    with torch.inference_mode():
        for batch in _batches(iter(TextDataset(data)), batch_size):
            enc, _, _ = _tokenize(tokenizer, batch, max_length, "truncate")
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
            tokens += int(enc["attention_mask"].sum())
    return tokens


def capture_pass(model, tokenizer, data: Path, out: Path, batch_size: int, max_length: int) -> None:
    from moescope.capture.dataset import RunOptions, capture_dataset

    capture_dataset(model, tokenizer, data, out, run=RunOptions(batch_size=batch_size, max_length=max_length),
                    overwrite=True)


def throughput(args, tmp: Path) -> dict:
    tok = load_tokenizer()
    model = build_model(args.quick, len(tok))
    data = make_data(tmp / "tp.jsonl", args.sequences, tok)
    plain_pass(model, tok, data, args.batch_size, args.max_length)  # warm-up
    plain_t, cap_t = [], []
    cpu = {"plain": [], "capture": []}  # process CPU seconds (all threads) per pass
    for rep in range(args.reps):
        order = [("plain", plain_t), ("capture", cap_t)] if rep % 2 == 0 else [("capture", cap_t), ("plain", plain_t)]
        for kind, times in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            if kind == "plain":
                tokens = plain_pass(model, tok, data, args.batch_size, args.max_length)
            else:
                capture_pass(model, tok, data, tmp / "tp-trace", args.batch_size, args.max_length)
            times.append(time.perf_counter() - start)
            cpu[kind].append(time.process_time() - start_cpu)
    ratio = statistics.median(plain_t) / statistics.median(cap_t)
    return {"tokens": tokens, "plain_s": plain_t, "capture_s": cap_t, "ratio": ratio,
            "plain_cpu_s": statistics.median(cpu["plain"]), "capture_cpu_s": statistics.median(cpu["capture"]),
            "plain_tok_s": tokens / statistics.median(plain_t), "capture_tok_s": tokens / statistics.median(cap_t),
            "params": sum(p.numel() for p in model.parameters()), "E": model.config.num_experts,
            "k": model.config.num_experts_per_tok, "layers": model.config.num_hidden_layers}


def sizes(tmp: Path) -> dict:
    import moescope

    trace = moescope.open_trace(tmp / "tp-trace")
    e, k = trace.n_experts, trace.top_k
    routes_bytes = sum(os.path.getsize(f) for f in trace.files("routes"))
    total_bytes = sum(p.stat().st_size for p in (tmp / "tp-trace").rglob("*") if p.is_file())
    n = trace.scalar("SELECT count(*) FROM routes")
    bound = k * math.ceil(math.log2(e)) / 8 + 2 * k
    # The same routing as a per-token JSONL trace (one object per token, every layer inside).
    jsonl = tmp / "trace.jsonl"
    with open(jsonl, "w") as f:
        rel = trace.sql("SELECT seq_id, pos, list(layer ORDER BY layer) AS layers, "
                        "list(experts ORDER BY layer) AS experts, list(weights ORDER BY layer) AS weights "
                        "FROM routes GROUP BY seq_id, pos ORDER BY seq_id, pos")
        result = rel.arrow()
        for batch in (result.to_batches() if hasattr(result, "to_batches") else result):
            for row in batch.to_pylist():
                f.write(json.dumps({"seq_id": row["seq_id"], "pos": row["pos"], "routes": [
                    {"layer": l, "experts": e_, "weights": w} for l, e_, w in zip(row["layers"], row["experts"], row["weights"])
                ]}) + "\n")
    return {"rows": n, "bound_bytes": bound, "routes_bytes_per_row": routes_bytes / n,
            "trace_bytes_per_row": total_bytes / n, "jsonl_bytes_per_row": jsonl.stat().st_size / n,
            "routes_vs_bound": routes_bytes / n / bound, "trace_vs_bound": total_bytes / n / bound,
            "jsonl_vs_trace": jsonl.stat().st_size / total_bytes}


def memory_child(args) -> None:
    tok = load_tokenizer()
    model = build_model(args.quick, len(tok))
    with tempfile.TemporaryDirectory() as d:
        data = make_data(Path(d) / "m.jsonl", args.sequences, tok)
        capture_pass(model, tok, data, Path(d) / "trace", args.batch_size, args.max_length)
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def memory(args) -> dict:
    out = {}
    for n in (args.mem_sequences, 10 * args.mem_sequences):
        cmd = [sys.executable, __file__, "--memory-child", "--sequences", str(n), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length)] + (["--quick"] if args.quick else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024
    small, big = out[args.mem_sequences], out[10 * args.mem_sequences]
    return {"small_sequences": args.mem_sequences, "small_mb": small, "big_mb": big, "ratio": big / small}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--mem-sequences", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-child", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="moescope-bench-"))
    try:
        tp = throughput(args, tmp)
        sz = sizes(tmp)
        mem = memory(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "| measure | value | goal |",
        "| --- | --- | --- |",
        f"| model | OLMoE-style, {tp['layers']} MoE layers, E={tp['E']}, k={tp['k']}, {tp['params'] / 1e6:.0f}M parameters, random weights | |",
        f"| tokens per pass | {tp['tokens']:,} ({args.sequences} sequences, batch {args.batch_size}) | |",
        f"| plain forward | {tp['plain_tok_s']:,.0f} tok/s (median of {args.reps}) | |",
        f"| forward + capture + write | {tp['capture_tok_s']:,.0f} tok/s | |",
        f"| throughput with capture / without | **{tp['ratio']:.3f}** | >= 0.97 |",
        f"| CPU seconds per pass, plain / capture (all threads, median) | {tp['plain_cpu_s']:.2f} / {tp['capture_cpu_s']:.2f}: "
        f"capture adds {tp['capture_cpu_s'] - tp['plain_cpu_s']:+.2f} s ({100 * (tp['capture_cpu_s'] / tp['plain_cpu_s'] - 1):+.1f}%) | |",
        f"| information bound per token-layer | {sz['bound_bytes']:.1f} bytes | |",
        f"| routes table per token-layer | {sz['routes_bytes_per_row']:.2f} bytes = **{sz['routes_vs_bound']:.2f}x** the bound | <= 1.2x |",
        f"| whole trace (all tables, manifest) per token-layer | {sz['trace_bytes_per_row']:.2f} bytes = {sz['trace_vs_bound']:.2f}x the bound | |",
        f"| per-token JSONL of the same routing | {sz['jsonl_bytes_per_row']:.1f} bytes: **{sz['jsonl_vs_trace']:.1f}x** larger than the whole trace | >= 10x |",
        f"| peak memory, {mem['small_sequences']} vs {10 * mem['small_sequences']} sequences | {mem['small_mb']:.0f} MB vs {mem['big_mb']:.0f} MB: **{mem['ratio']:.3f}x** | <= 1.1x |",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "capture-quick" if args.quick else "capture" if args.threads == 2 else f"capture-threads{args.threads}"
    (RESULTS / f"{name}.md").write_text(
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, torch threads {args.threads}.\n\n"
        + table + "\n\nraw times (s): plain " + ", ".join(f"{t:.2f}" for t in tp["plain_s"])
        + "; capture " + ", ".join(f"{t:.2f}" for t in tp["capture_s"]) + "\n")


if __name__ == "__main__":
    main()
