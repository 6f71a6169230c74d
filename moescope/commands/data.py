"""`moescope data`: build the offline multi-domain corpus and tokenizer for the built-in model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()


def _short(n: int) -> str:
    """12,345,678 -> "12.35M": keeps the table narrow; corpus.json has the exact counts."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}k" if n >= 10_000 else f"{n:,}"


def register(app: typer.Typer, **_: Any) -> None:
    """Add the ``data`` command to ``app``."""

    @app.command("data")
    def data(
        out: Path = typer.Option(..., "--out", help="Directory to write text/, tokenizer/, tokens/ and corpus.json to."),
        chars_per_domain: int = typer.Option(4_000_000, help="Training characters per domain; validation gets 5% of that."),
        seed: int = typer.Option(0, help="Seed of the train/val selection and the generated math."),
        vocab_size: int = typer.Option(8192, help="Byte-level BPE vocabulary size, special tokens included."),
    ) -> None:
        """Build the corpus (code, narrative, drama, technical, dialogue, definitions, math) offline."""
        from moescope.train.corpus import DOMAINS, build_corpus  # keeps `moescope --help` fast

        steps = len(DOMAINS) + 3  # read each domain, train tokenizer, tokenize, baseline
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("checking sources", total=steps)
            started = False

            def on_step(message: str) -> None:
                nonlocal started
                if started:
                    bar.advance(task)
                started = True
                bar.update(task, description=message)

            info = build_corpus(out, chars_per_domain=chars_per_domain, seed=seed,
                                vocab_size=vocab_size, progress=on_step)

        table = Table(title=f"corpus in {out}")
        table.add_column("domain", no_wrap=True)
        for column in ("docs", "chars", "tokens", "val docs", "val chars", "val tokens", "unigram ppl"):
            table.add_column(column, justify="right")
        for d in info.domains:
            ppl = "-" if d.unigram_val_perplexity is None else f"{d.unigram_val_perplexity:,.1f}"
            table.add_row(d.name, *(_short(getattr(s, f)) for s in (d.train, d.val)
                                    for f in ("documents", "characters", "tokens")), ppl)
        pooled = "-" if info.unigram_val_perplexity is None else f"{info.unigram_val_perplexity:,.1f}"
        totals = [sum(getattr(getattr(d, s), f) for d in info.domains)
                  for s in ("train", "val") for f in ("documents", "characters", "tokens")]
        table.add_row("all", *map(_short, totals), pooled, style="bold")
        console.print(table)
        console.print(f"tokenizer: {out / 'tokenizer'} (vocabulary {info.tokenizer['vocab_size']:,}); "
                      f"summary: {out / 'corpus.json'}")
