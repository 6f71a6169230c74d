"""`moescope demo`: capture, statistics, signatures and the report on the built-in model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer, **_: object) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("moescope-demo"), "--out", help="Directory for traces, results and report.html."),
        model: Optional[str] = typer.Option(None, "--model", help="Another MoE model (default: the built-in one)."),
        generate: int = typer.Option(24, "--generate", help="Tokens generated after each task prompt."),
        permutations: int = typer.Option(200, "--permutations", help="Label shuffles for the permutation baseline."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps, or auto."),
    ) -> None:
        """The whole flow on the built-in model and prompts: capture, statistics, signatures, report."""
        import time

        from moescope.demo import run_demo

        console = Console()
        started = time.perf_counter()
        with console.status("starting") as status:
            result = run_demo(out, model=model, generate=generate, permutations=permutations, device=device,
                              on_stage=lambda s: (status.update(s), console.log(s)))
        table = Table(title=f"Does the prompt's category leave a fingerprint in routing? ({result.model})")
        for col in ("prompt set", "routing signature [95% CI]", "chance (majority)", "labels permuted", "bag of token ids",
                    "token-id routing control"):
            table.add_column(col, justify="right" if col != "prompt set" else "left")
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        for name, v in result.signatures.items():
            table.add_row(name, f"{pct(v.get('cv_accuracy_mean'))} [{pct(v.get('cv_accuracy_ci_low'))}, "
                          f"{pct(v.get('cv_accuracy_ci_high'))}]",
                          pct(v.get("chance_accuracy")),
                          f"{pct(v.get('permutation_accuracy_mean'))} ({v.get('permutation_p_value_text') or 'p = n/a'})",
                          pct(v.get("bag_of_tokens_accuracy_mean")), pct(v.get("token_id_control_accuracy_mean")))
        console.print(table)
        console.print(f"[green]done[/] in {time.perf_counter() - started:.0f} s. Open the report: "
                      f"[bold]{result.report.resolve()}[/]  (traces and results.json files are in {out}/)")
