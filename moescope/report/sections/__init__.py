"""Report sections, one module per analysis, registered by the analysis name in results.json.

A section module defines ``render(results: dict, out_dir: Path, env) -> Section`` where
`results` is the analysis's results.json, `out_dir` its directory (figures/ inside) and
`env` the report's jinja2 Environment (autoescape on: every piece of text is escaped).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# analysis name in results.json -> module under moescope.report.sections
SECTION_MODULES = {
    "stats": "stats",
    "signatures": "signatures",
    "semantic": "semantic",
    "pos": "pos",
    "geometry": "geometry",
    "compare": "compare",
    "design-choices": "design_choices",
    "agreement": "agreement",
}


@dataclass
class Section:
    """One part of the report: a title, a one-paragraph summary and its HTML body (already escaped)."""

    key: str
    title: str
    summary: str
    html: str


def renderer(analysis: str) -> Callable[..., Section] | None:
    """The render function for an analysis, or None when no section module exists for it."""
    module = SECTION_MODULES.get(analysis)
    if module is None:
        return None
    try:
        return importlib.import_module(f"moescope.report.sections.{module}").render
    except ModuleNotFoundError:
        return None


def figure_data_uri(path: Any) -> str:
    """A data: URI of a PNG file, so the report is one self-contained file."""
    import base64
    from pathlib import Path

    data = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def embedded_figures(results: dict, out_dir: Any) -> list[dict[str, str]]:
    """The analysis's figures that exist on disk, as {"name", "uri"} (data: URIs), in results order."""
    from pathlib import Path

    figures = []
    for rel in results.get("figures") or []:
        path = Path(out_dir) / str(rel)
        if path.is_file():
            figures.append({"name": Path(str(rel)).stem.replace("_", " "), "uri": figure_data_uri(path)})
    return figures
