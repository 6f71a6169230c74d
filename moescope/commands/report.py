"""`moescope report INPUT... --out report.html`: one self-contained HTML report."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer, **_: object) -> None:
    @app.command("report")
    def report(
        inputs: List[Path] = typer.Argument(
            ..., help="Trace directories, analysis output directories, or directories holding them."
        ),
        out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
        title: Optional[str] = typer.Option(None, "--title", help="Page title (default: from the model name)."),
        sequences: int = typer.Option(50, "--sequences", help="Sequences shown in the token viewer (the first N)."),
        tokens: int = typer.Option(256, "--tokens", help="Tokens shown per sequence in the token viewer."),
    ) -> None:
        """Write every analysis, its figures and baselines, and a per-token routing viewer into one HTML file."""
        from moescope.report.html import write_report

        path = write_report(inputs, out, title=title, viewer_sequences=sequences, viewer_tokens=tokens)
        typer.echo(str(path))
