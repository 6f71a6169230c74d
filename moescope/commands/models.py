"""`moescope models`: the supported architecture families."""
from __future__ import annotations

import typer
from rich import box
from rich.console import Console
from rich.table import Table

# Below this terminal width the router description is left to --details (it would squeeze the rest).
_ROUTER_COLUMN_MIN_WIDTH = 110


def register(app: typer.Typer, **_: object) -> None:
    @app.command("models")
    def models(
        details: bool = typer.Option(False, "--details", help="Full router descriptions, notes and caveats."),
    ) -> None:
        """List every supported MoE model type: family, experts, top-k, shared experts, verified (--details: routers, notes)."""
        from moescope.adapters.catalog import NO_DEFAULT, catalog, unsupported
        from moescope.adapters.registry import family_for

        console = Console()
        rows = catalog()
        show_router = console.width >= _ROUTER_COLUMN_MIN_WIDTH
        # No vertical rules: at 80 columns every row stays on one line.
        table = Table(title=f"{len(rows)} MoE model types", title_justify="left", box=box.SIMPLE_HEAD)
        table.add_column("model type", no_wrap=True)
        table.add_column("family", overflow="fold")
        if show_router:
            table.add_column("router", overflow="ellipsis", no_wrap=True, max_width=32)
        for col in ("E", "k", "shared", "verified"):
            table.add_column(col, justify="right", no_wrap=True)
        for row in rows:
            cells = [row.model_type, row.family] + ([row.router] if show_router else [])
            table.add_row(*cells, str(row.n_experts), str(row.top_k), str(row.n_shared),
                          "[green]yes[/]" if row.verified else "[red]no[/]")
        console.print(table)
        console.print(f"E / k / shared: routed experts, experts per token, shared experts, as the transformers "
                      f"config class defaults them ({NO_DEFAULT}: no default, each checkpoint's config.json sets it).")
        console.print("verified: computed, not declared: the read-back proof (`moescope verify`) passes on a tiny "
                      "random model of the type: every expert made to output a known vector, the MoE block's "
                      "output shows which experts reached each token with what weight, and that equals what "
                      "moescope records (moescope/adapters/verified.json, scripts/verify_all_models.py). "
                      "Run `moescope verify --model YOUR_MODEL` on your own checkpoint.")
        for row in rows:
            family = family_for(row.model_type)
            extra = "; ".join(x for x in (row.router if details else "", family.notes if details else "",
                                          row.verified_note) if x)
            if extra:
                console.print(f"[bold]{row.model_type}[/]: {extra}")
        console.print("\n[bold]Not supported[/] (in transformers but no routing to record):")
        for model_type, reason in unsupported().items():
            console.print(f"  {model_type}: {reason}")
