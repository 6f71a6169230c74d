"""`moescope experiment design-choices`: train the routing / top-k / router grid and compare
perplexity and expert specialisation (study 3 of STUDIES.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)


def _split(text: str, name: str, cast: type = str) -> tuple[Any, ...]:
    from moescope.errors import MoescopeError

    try:
        values = tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise MoescopeError(f"--{name} takes comma-separated values, e.g. 1,2; got {text!r}") from None
    return tuple(dict.fromkeys(values))  # duplicates would train the same variant twice


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_table(cells: list[dict[str, Any]], unigram: float) -> Table:
    """One row per grid cell: perplexity (unigram baseline in the title), NMIs next to chance, verdict."""
    seeds = max(len(c["seeds"]) for c in cells)
    table = Table(title="Design choices: validation perplexity and expert specialisation",
                  caption=f"ppl: mean over domains (unigram baseline {unigram:.1f}), ± sd over {seeds} seed(s); "
                          "NMI: layer mean, permutation "
                          "chance in brackets, domain: vocabulary-only router in square brackets; token-id NMI: raw minus shuffled mean (raw in brackets)")
    table.add_column("variant", no_wrap=True)
    for col in ("ppl", "domain NMI", "type NMI", "token-id NMI"):
        table.add_column(col, justify="right")
    table.add_column("experts follow", no_wrap=True)
    for c in cells:
        ppl = _f(c["mean_ppl"], 1) + (f" ± {c['mean_ppl_sd']:.1f}" if c["mean_ppl_sd"] is not None else "")
        table.add_row(c["name"], ppl,
                      f"{_f(c['domain_nmi'])} ({_f(c['domain_nmi_chance'])}) [{_f(c.get('domain_nmi_vocabulary_control'))}]",
                      f"{_f(c['token_type_nmi'])} ({_f(c['token_type_nmi_chance'])})",
                      f"{_f(c['token_id_nmi_excess'])} ({_f(c['token_id_nmi'])})", c["specialises_by"])
    return table


def register(app: typer.Typer, *, experiment_app: typer.Typer, **_: object) -> None:
    @experiment_app.command("design-choices")
    def design_choices_cmd(
        out: Path = typer.Option(..., "--out", help="Output directory: variants/<name>/ runs, results.json, figures/."),
        corpus: Path = typer.Option(Path("runs/corpus"), "--corpus", help="Corpus directory (`moescope data`)."),
        quick: bool = typer.Option(False, "--quick", help="Micro model, 30 steps, tiny evaluation (tests, smoke runs)."),
        routing: str = typer.Option("token,sequence", "--routing", help="Routing levels to train."),
        top_k: str = typer.Option("1,2", "--top-k", help="Experts per token to train."),
        router: str = typer.Option("learned,frozen", "--router", help="Router kinds to train."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds, e.g. 0,1,2: every comparison is reported "
                                            "with its spread over them (default 0,1,2; --quick 0)."),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Training tokens per variant "
                                                 "(default 800,000; --quick 15,360)."),
        threads: int = typer.Option(2, "--threads", help="CPU threads for training and measuring."),
        spec_tokens: Optional[int] = typer.Option(None, "--spec-tokens", help="Validation tokens per domain for "
                                                  "the specialisation measures (default 4,096; --quick 512)."),
        shuffles: Optional[int] = typer.Option(None, "--shuffles", help="Label permutations per chance level "
                                               "(default 99; --quick 19)."),
    ) -> None:
        """Train every variant (resumable: finished ones are reused), then report perplexity and specialisation."""
        import dataclasses

        import torch

        from moescope.analysis.design_choices import design_choices_result
        from moescope.errors import MoescopeError
        from moescope.train import experiment as ex

        preset = "quick" if quick else "default"
        variants = ex.grid(_split(routing, "routing"), _split(top_k, "top-k", int), _split(router, "router"),
                           _split(seeds, "seeds", int) if seeds is not None else ex.DEFAULT_SEEDS[preset])
        if threads < 1:
            raise MoescopeError("--threads must be 1 or more")
        torch.set_num_threads(threads)
        base = ex.base_config(preset, corpus, max_tokens=max_tokens, threads=threads)
        m = ex.MEASUREMENTS[preset]
        m = dataclasses.replace(m, **{k: v for k, v in (("tokens_per_domain", spec_tokens), ("shuffles", shuffles))
                                      if v is not None})
        if m.tokens_per_domain < base.data.seq_len or m.shuffles < 1:
            raise MoescopeError(f"--spec-tokens must be at least seq_len ({base.data.seq_len}); --shuffles at least 1")
        ex.check_inputs(base, variants)  # one-line errors before the progress display starts
        rows = _run(ex, out, variants, base, m)
        params = {"preset": preset, "routing": sorted({v.routing for v in variants}),
                  "top_k": sorted({v.top_k for v in variants}), "router": sorted({v.router for v in variants}),
                  "seeds": sorted({v.seed for v in variants}), "base_config": base.to_dict(),
                  "measurement": dataclasses.asdict(m)}
        result = design_choices_result(rows, params)
        path = result.save(out)
        console.print(summary_table(result.values["cells"], result.values["unigram_mean_ppl"]))
        console.print(f"[green]wrote[/] {path}; `moescope report {out} --out report.html` renders it")

    def _run(ex: Any, out: Path, variants: list, base: Any, m: Any) -> list[dict[str, Any]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=err) as bar:
            task = bar.add_task("", total=base.total_steps, loss="-")
            position = {"i": 0}

            def on_variant(variant: Any, stage: str) -> None:
                if stage == "train" and position["i"] == 0:
                    err.print(f"{len(variants)} variants x {base.optim.max_tokens:,} training tokens into {out}")
                if stage == "train":
                    position["i"] += 1
                    bar.reset(task, total=base.total_steps, loss="-")
                label = f"[{position['i']}/{len(variants)}] {variant.name}: {stage}"
                bar.update(task, description=label)
                if stage == "done":
                    bar.update(task, completed=base.total_steps)
                    if not err.is_terminal:
                        err.print(f"{variant.name} done")

            def on_step(step: int, total: int, stats: dict) -> None:
                bar.update(task, completed=step, loss=f"{stats['loss']:.3f}")

            return ex.run_experiment(out, variants, base, m, on_variant=on_variant, on_step=on_step)
