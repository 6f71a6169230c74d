"""Training benchmark: tokens/s of the default model's config, and the MoE's cost against a dense
model with the same active parameters, measured interleaved in one run.

    .venv/bin/python benchmarks/bench_train.py [--steps 6] [--reps 3] [--threads 2]

The dense model is a Llama (same hidden size, layers, heads, vocabulary, tied embeddings) whose
MLP is as wide as the MoE's active experts (top_k x expert_size), so both do the same
multiply-adds per token in their MLPs; the ratio is what routing and expert dispatch cost.
Full optimizer steps (forward, backward, AdamW) on random tokens of the default batch shape.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def models(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    from moescope.train.modeling import build_model, count_parameters

    m = cfg.model
    moe = build_model(m, vocab_size=8192, bos_id=0, eos_id=0, pad_id=1, seed=0)
    dense = LlamaForCausalLM(LlamaConfig(
        vocab_size=8192, hidden_size=m.hidden_size, intermediate_size=m.top_k * m.expert_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        tie_word_embeddings=m.tie_embeddings, max_position_embeddings=m.max_position,
    ))
    return moe, dense, count_parameters(moe), sum(p.numel() for p in dense.parameters())


def step_time(model, batch, opt, moe: bool, aux: float) -> float:
    start = time.perf_counter()
    out = model(input_ids=batch[:, :-1], use_cache=False, **({"output_router_logits": True} if moe else {}))
    loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
    if moe and getattr(out, "aux_loss", None) is not None:
        loss = loss + aux * out.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    from moescope.train.config import load_config

    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "configs" / "default-model.yaml"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    moe, dense, moe_params, dense_params = models(cfg)
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (moe, dense)}
    batch = torch.randint(2, 8192, (cfg.optim.batch_size, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0))
    tokens = cfg.optim.batch_size * cfg.data.seq_len
    times = {"moe": [], "dense": []}
    for name, model in (("moe", moe), ("dense", dense)):  # warm-up
        step_time(model, batch, opts[id(model)], name == "moe", cfg.model.aux_loss_coef)
    for rep in range(args.reps):
        order = (("moe", moe), ("dense", dense)) if rep % 2 == 0 else (("dense", dense), ("moe", moe))
        for name, model in order:
            for _ in range(args.steps):
                times[name].append(step_time(model, batch, opts[id(model)], name == "moe", cfg.model.aux_loss_coef))
    moe_s, dense_s = statistics.median(times["moe"]), statistics.median(times["dense"])
    rows = [
        "| measure | value |",
        "| --- | --- |",
        f"| config | {Path(args.config).name}: hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, "
        f"{cfg.model.n_experts} experts of {cfg.model.expert_size}, top-{cfg.model.top_k}; batch {cfg.optim.batch_size} x {cfg.data.seq_len} |",
        f"| MoE parameters | {moe_params['total'] / 1e6:.1f}M total, {moe_params['active'] / 1e6:.1f}M active per token |",
        f"| dense comparison | Llama, MLP width {cfg.model.top_k * cfg.model.expert_size}: {dense_params / 1e6:.1f}M parameters |",
        f"| MoE training throughput | **{tokens / moe_s:,.0f} tokens/s** (median step {moe_s:.2f} s, {args.threads} threads) |",
        f"| dense training throughput | {tokens / dense_s:,.0f} tokens/s (median step {dense_s:.2f} s) |",
        f"| MoE step time / dense step time | **{moe_s / dense_s:.2f}x** |",
    ]
    table = "\n".join(rows)
    print(table)
    out = ROOT / "benchmarks" / "results" / "train.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores; {args.reps} interleaved "
                   f"repetitions of {args.steps} optimizer steps each.\n\n{table}\n")


if __name__ == "__main__":
    main()
