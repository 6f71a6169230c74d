"""`moescope models`: the supported architecture families."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer, **_: object) -> None:
    @app.command("models")
    def models() -> None:
        """List every supported MoE model type: family, router, experts, top-k, shared experts, verified."""
        from moescope.adapters.catalog import catalog

        table = Table(title="MoE architectures moescope captures (transformers defaults shown)")
        for col in ("model type", "family", "router", "experts", "top-k", "shared", "verified"):
            table.add_column(col, overflow="fold")
        for row in catalog():
            table.add_row(row.model_type, row.family, row.router, str(row.n_experts), str(row.top_k),
                          str(row.n_shared), "yes" if row.verified else "no")
        Console().print(table)
