"""The section of an analysis that has no section module: its scalar values and its figures.

Also the fallback when a section module fails on an older or unexpected results.json, so
that one analysis never keeps the rest of the report from being written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moescope.report.sections import Section, figure_data_uri

# results.json keys that describe the run rather than report a result
HEADER_KEYS = ("analysis", "moescope_version", "trace", "params", "figures")

TEMPLATE = """\
{% if note %}<p class="note warn">{{ note }}</p>{% endif %}
{% if values %}
<table class="values">
  <thead><tr><th>key</th><th>value</th></tr></thead>
  <tbody>
  {% for key, value in values %}<tr><th scope="row"><code>{{ key }}</code></th><td class="num">{{ value }}</td></tr>
  {% endfor %}
  </tbody>
</table>
{% endif %}
{% if others %}<p class="muted">Also in results.json (not shown here):
{% for key in others %}<code>{{ key }}</code>{{ ", " if not loop.last }}{% endfor %}.</p>{% endif %}
{% for fig in figures %}
<figure>
{% if fig.uri %}<img src="{{ fig.uri }}" alt="{{ fig.name }}">
{% else %}<p class="note warn">figure {{ fig.name }} is missing from {{ fig.path }}</p>{% endif %}
<figcaption>{{ fig.name }}</figcaption></figure>
{% endfor %}
{% if params %}<details><summary>Parameters</summary><table class="values">
{% for key, value in params %}<tr><th scope="row"><code>{{ key }}</code></th><td>{{ value }}</td></tr>{% endfor %}
</table></details>{% endif %}
"""


def format_value(value: Any) -> str:
    """A scalar as the report shows it: floats to 4 significant digits, None as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def render(results: dict[str, Any], out_dir: Path, env: Any, *, note: str | None = None) -> Section:
    """A Section listing the top-level scalar values of `results` and embedding its figures."""
    name = str(results.get("analysis") or Path(out_dir).name)
    body = {k: v for k, v in results.items() if k not in HEADER_KEYS}
    values = [(k, format_value(v)) for k, v in body.items() if _is_scalar(v)]
    others = [k for k, v in body.items() if not _is_scalar(v)]
    figures = []
    for rel in results.get("figures") or []:
        path = Path(out_dir) / str(rel)
        figures.append({"name": Path(str(rel)).stem, "path": str(out_dir),
                        "uri": figure_data_uri(path) if path.is_file() else None})
    params = results.get("params") if isinstance(results.get("params"), dict) else {}
    html = env.from_string(TEMPLATE).render(
        note=note, values=values, others=others, figures=figures,
        params=[(k, format_value(v) if _is_scalar(v) else str(v)) for k, v in params.items()],
    )
    summary = (f"The values of the '{name}' analysis as stored in results.json "
               "(no report section exists for it; see docs/report.md to add one).")
    return Section(key=name, title=name.replace("-", " ").replace("_", " ").capitalize(), summary=summary, html=html)
