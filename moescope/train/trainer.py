"""The training loop: AdamW, cosine schedule, per-domain evaluation, telemetry, resume.

    out/
      config.yaml         the run's full configuration
      metrics.jsonl       one line per evaluation: losses, per-domain perplexity, per-layer telemetry
      checkpoint/         the latest checkpoint (weights, optimizer, step); resumed automatically
      model/              the final model + tokenizer, loadable with from_pretrained
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import yaml

from moescope.train.batches import TokenCorpus
from moescope.train.config import TrainConfig
from moescope.train.modeling import build_model, count_parameters
from moescope.train.telemetry import RoutingMeter


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path
    steps: int
    tokens: int
    seconds: float
    final_eval: dict[str, Any]
    parameters: dict[str, Any]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step`: linear warm-up, then cosine decay to min_lr_ratio * lr."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.total_steps - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
    )


def cross_entropy(model: torch.nn.Module, windows: torch.Tensor, *, router_logits: bool) -> tuple[torch.Tensor, Any]:
    """Mean next-token cross-entropy (nats) of (B, T+1) windows, and the model output."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    out = model(input_ids=inputs, output_router_logits=router_logits, use_cache=False)
    logits = out.logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    return ce, out


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: TokenCorpus, cfg: TrainConfig, batch_size: int = 8) -> dict[str, Any]:
    """Validation cross-entropy and perplexity per domain (cross-entropy only, no aux loss)."""
    was_training = model.training
    model.eval()
    unigram_logp = corpus.unigram_logp(model.config.vocab_size)
    per_domain = {}
    for domain in corpus.domains:
        windows = corpus.val_windows(domain, cfg.data.seq_len, cfg.data.eval_tokens_per_domain)
        total, n = 0.0, 0
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            ce, _ = cross_entropy(model, chunk, router_logits=False)
            total += float(ce) * chunk.shape[0]
            n += chunk.shape[0]
        loss = total / n
        # The chance-level reference on exactly these target tokens: a unigram model of the train split.
        unigram = -float(unigram_logp[windows[:, 1:].numpy()].mean())
        per_domain[domain] = {"loss": round(loss, 5), "ppl": round(math.exp(loss), 3),
                              "unigram_ppl": round(math.exp(unigram), 3), "tokens": n * cfg.data.seq_len}
    model.train(was_training)
    mean_loss = sum(d["loss"] for d in per_domain.values()) / len(per_domain)
    return {"domains": per_domain, "mean_loss": round(mean_loss, 5), "mean_ppl": round(math.exp(mean_loss), 3)}


# -- checkpoints ------------------------------------------------------------------------------
def _save_checkpoint(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Replace out/checkpoint atomically (a crash leaves the old or the new one, whole)."""
    from safetensors.torch import save_model

    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    from safetensors.torch import load_model

    for name in ("checkpoint", "checkpoint.old"):
        ckpt = out / name
        if (ckpt / "state.json").exists():
            load_model(model, str(ckpt / "model.safetensors"))
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            return json.loads((ckpt / "state.json").read_text())
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


# -- the loop -----------------------------------------------------------------------------------
def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train `cfg` into `out_dir`, resuming from its checkpoint if there is one.

    `on_step(step, total_steps, stats)` is called after every optimizer step (progress bars).
    Returns where the final model is and its last evaluation.
    """
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = TokenCorpus(cfg.data.corpus, cfg.data.domains, cfg.data.mixing)
    tokenizer = AutoTokenizer.from_pretrained(corpus.tokenizer_dir)
    model = build_model(cfg.model, vocab_size=len(tokenizer), bos_id=tokenizer.bos_token_id,
                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=cfg.seed)
    opt = _optimizer(model, cfg)
    (out / "config.yaml").write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))
    metrics_path = out / "metrics.jsonl"
    state = _load_checkpoint(out, model, opt) if resume else None
    if state is None:
        state = {"step": 0, "tokens": 0, "seconds": 0.0}
        metrics_path.unlink(missing_ok=True)
    else:
        _truncate_metrics(metrics_path, state["step"])

    use_aux = cfg.model.aux_loss_coef > 0
    pooled = use_aux and cfg.model.balance == "pooled"
    meter = RoutingMeter(model, keep_logits_for_loss=(use_aux and not pooled) or cfg.model.z_loss_coef > 0).attach()
    total = cfg.total_steps
    window_start, window_tokens, loss_sum, aux_sum, n_sum = time.perf_counter(), 0, 0.0, 0.0, 0
    last_eval: dict[str, Any] = {}
    model.train()
    while state["step"] < total:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = corpus.train_batch(step, cfg.optim.batch_size, cfg.data.seq_len, cfg.seed)
        ce, out_ = cross_entropy(model, batch, router_logits=pooled)
        balance, z = meter.router_losses() if meter.keep_logits_for_loss else (None, None)
        aux = (out_.aux_loss if pooled else balance) if use_aux else None
        loss = ce
        if aux is not None:
            loss = loss + cfg.model.aux_loss_coef * aux
        if cfg.model.z_loss_coef > 0:
            loss = loss + cfg.model.z_loss_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip)
        opt.step()

        state["step"] = step + 1
        state["tokens"] += batch.shape[0] * (batch.shape[1] - 1)
        window_tokens += batch.shape[0] * (batch.shape[1] - 1)
        ce_value = ce.item()
        loss_sum += ce_value
        aux_sum += aux.item() if aux is not None else 0.0
        n_sum += 1
        now = time.perf_counter()
        if on_step:
            on_step(state["step"], total, {"loss": ce_value, "tok_s": window_tokens / max(now - window_start, 1e-9)})

        done = state["step"] == total
        if state["step"] % cfg.eval_every == 0 or done:
            elapsed = now - window_start
            state["seconds"] += elapsed
            meter.detach()
            last_eval = evaluate(model, corpus, cfg)
            meter.attach()
            record = {
                "step": state["step"],
                "tokens": state["tokens"],
                "lr": lr_at(step, cfg),
                "train_loss": round(loss_sum / n_sum, 5),
                "train_aux_loss": round(aux_sum / n_sum, 5) if use_aux else None,
                "tokens_per_second": round(window_tokens / max(elapsed, 1e-9), 1),
                "val": last_eval,
                "routing": meter.summary(),
            }
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            window_start, window_tokens, loss_sum, aux_sum, n_sum = time.perf_counter(), 0, 0.0, 0.0, 0
        if state["step"] % cfg.checkpoint_every == 0 or done:
            _save_checkpoint(out, model, opt, state)
    meter.detach()

    if not last_eval:
        last_eval = evaluate(model, corpus, cfg)
    model_dir = out / "model"
    save_final(model, tokenizer, model_dir)
    result = TrainResult(out, model_dir, state["step"], state["tokens"], state["seconds"], last_eval,
                         count_parameters(model))
    (out / "result.json").write_text(json.dumps(
        {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 1),
         "final_eval": last_eval, "parameters": result.parameters}, indent=2))
    return result


def save_final(model: torch.nn.Module, tokenizer: Any, model_dir: Path) -> None:
    """Save model (safetensors, float32) and tokenizer so from_pretrained loads them."""
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
