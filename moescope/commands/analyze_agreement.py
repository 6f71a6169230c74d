"""`moescope analyze agreement A B`: routing agreement of two runs of the same model over the same tokens."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from moescope.commands.analyze_compare import PAIR_ENGINE_HELP
from moescope.commands.analyze_core import ENGINE_HELP

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
        engine: str = typer.Option("local", "--engine", help=PAIR_ENGINE_HELP["engine"]),
        num_workers: int = typer.Option(1, "--num-workers", help=PAIR_ENGINE_HELP["num_workers"]),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help=ENGINE_HELP["address"]),
        shards_at_a: Optional[str] = typer.Option(None, "--shards-at-a", help=PAIR_ENGINE_HELP["shards_at_a"]),
        shards_at_b: Optional[str] = typer.Option(None, "--shards-at-b", help=PAIR_ENGINE_HELP["shards_at_b"]),
    ) -> None:
        """Per-layer top-k set / top-1 agreement of two runs of one model, by phase, position and router margin."""
        from moescope.analysis.agreement_run import agreement
        from moescope.analysis.engine import use_engine
        from moescope.analysis.ray_counts import engine_for_pair
        from moescope.store.reader import open_trace

        counting, locations = engine_for_pair(engine, num_workers, ray_address, shards_at_a, shards_at_b)
        a, b = open_trace(trace_a), open_trace(trace_b)
        with use_engine(counting):
            result = agreement(a, b, locations=locations)
        _print(result.values, result.save(out))
