"""`moescope models`: the supported architecture families."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer, **_: object) -> None:
    @app.command("models")
    def models(
        details: bool = typer.Option(False, "--details", help="Full router descriptions, notes and caveats."),
    ) -> None:
        """List every supported MoE model type: family, router, experts, top-k, shared experts, verified."""
        from moescope.adapters.catalog import catalog, unsupported
        from moescope.adapters.registry import family_for

        console = Console()
        rows = catalog()
        table = Table(title=f"{len(rows)} MoE model types (experts / top-k / shared: the transformers config defaults)")
        table.add_column("model type", no_wrap=True)
        table.add_column("family", max_width=20)
        table.add_column("router", overflow="fold" if details else "ellipsis", no_wrap=not details,
                         max_width=None if details else 32)
        for col in ("experts", "top-k", "shared", "verified"):
            table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
        for row in rows:
            table.add_row(row.model_type, row.family, row.router, str(row.n_experts), str(row.top_k),
                          str(row.n_shared), "[green]yes[/]" if row.verified else "[yellow]no[/]")
        console.print(table)
        console.print("verified = a tiny random model of the type passes tests/test_adapters.py: the recorded "
                      "experts and weights are the ones the model used (counterfactual check), capture changes "
                      "no output bit, and generate() phases are right.")
        if details:
            for row in rows:
                family = family_for(row.model_type)
                extra = "; ".join(x for x in (family.notes, family.unverified_reason) if x)
                if extra:
                    console.print(f"[bold]{row.model_type}[/]: {extra}")
        console.print("\n[bold]Not supported[/] (in transformers but no routing to record):")
        for model_type, reason in unsupported().items():
            console.print(f"  {model_type}: {reason}")
