"""`moescope train --config FILE`: train a small MoE causal LM (resumes after an interruption)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def register(app: typer.Typer, **_: object) -> None:
    @app.command("train")
    def train_cmd(
        config: Path = typer.Option(..., "--config", help="Training config (YAML); see configs/."),
        out: Path = typer.Option(..., "--out", help="Run directory: checkpoint, metrics.jsonl, model/."),
        corpus: Optional[Path] = typer.Option(None, "--corpus", help="Corpus directory (overrides data.corpus)."),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Override optim.max_tokens."),
        fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint and start over."),
    ) -> None:
        """Train an MoE causal LM from scratch; logs per-domain perplexity and per-layer routing telemetry."""
        from moescope.train.config import load_config
        from moescope.train.trainer import train

        cfg = load_config(config)
        if corpus is not None:
            cfg = cfg.replace(data={"corpus": str(corpus)})
        if max_tokens is not None:
            cfg = cfg.replace(optim={"max_tokens": max_tokens})
        with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                      TextColumn("{task.fields[rate]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=console) as bar:
            task = bar.add_task("train", total=cfg.total_steps, loss="-", rate="-")

            def on_step(step: int, total: int, stats: dict) -> None:
                bar.update(task, completed=step, loss=f"{stats['loss']:.3f}", rate=f"{stats['tok_s']:,.0f}")
                if not console.is_terminal and (step % 50 == 0 or step == total):
                    # Logs and nohup runs get a plain line instead of a redrawn bar.
                    console.print(f"step {step}/{total} loss {stats['loss']:.3f} {stats['tok_s']:,.0f} tok/s")

            result = train(cfg, out, on_step=on_step, resume=not fresh)
        ev = result.final_eval
        console.print(f"[green]done[/]: {result.tokens:,} tokens, mean validation perplexity {ev['mean_ppl']:.1f}; "
                      f"model in {result.model_dir}")
