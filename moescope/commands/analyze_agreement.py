"""`moescope analyze agreement A B`: routing agreement of two runs of the same model over the same tokens."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console(stderr=True)


def _print(values: dict[str, Any], path: Path) -> None:
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    console.print(f"compared {values['n_tokens_compared']:,} tokens ({values['n_tokens_unaligned']:,} unaligned); "
                  f"chance set agreement {values['chance_set_agreement']:.2g}")
    for i, layer in enumerate(values["moe_layers"]):
        console.print(f"layer {layer}: set {fmt(values['per_layer_set_agreement'][i])}, top-1 "
                      f"{fmt(values['per_layer_top1_agreement'][i])}, overlap/k {fmt(values['per_layer_mean_overlap'][i])}"
                      f"  (n={values['per_layer_n'][i]:,})")
    for note in values.get("notes") or []:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[green]wrote[/] {path}")


def register(app: typer.Typer, *, analyze_app: typer.Typer, **_: object) -> None:
    @analyze_app.command("agreement")
    def agreement_command(
        trace_a: Path = typer.Argument(..., help="First trace (e.g. an engine import, or a float32 capture)."),
        trace_b: Path = typer.Argument(..., help="Second trace of the same model over the same tokens (e.g. its replay)."),
        out: Path = typer.Option(..., "--out", help="Directory for results.json and figures/."),
    ) -> None:
        """Per-layer top-k set / top-1 agreement of two runs of one model, by phase, position and router margin."""
        from moescope.analysis.agreement_run import agreement
        from moescope.store.reader import open_trace

        result = agreement(open_trace(trace_a), open_trace(trace_b))
        _print(result.values, result.save(out))
