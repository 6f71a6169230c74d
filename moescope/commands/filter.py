"""`moescope filter TRACE --where PREDICATE --out SUB`: a sub-trace of the selected sequences."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


def register(app: typer.Typer, **_: object) -> None:
    @app.command("filter")
    def filter_(
        source: Path = typer.Argument(..., help="A trace directory."),
        where: str = typer.Option(..., "--where", help="SQL predicate over the sequences table, e.g. \"label = 'code'\"."),
        out: Path = typer.Option(..., "--out", help="Directory for the sub-trace."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different trace already at --out."),
    ) -> None:
        """Write the sequences WHERE selects, with every row of theirs in every table, as a new
        trace that keeps the model description and records its provenance."""
        from moescope.store.subset import filter_trace

        manifest = filter_trace(source, out, where, overwrite=overwrite)
        totals = manifest.get("totals", {})
        console.print(f"[green]wrote[/] {out}: {totals.get('n_sequences', 0):,} sequences, "
                      f"{totals.get('rows', {}).get('routes', 0):,} token-layer routes (where {where})")
