"""`moescope report`: one self-contained HTML file with every analysis and a per-token viewer.

    html = build_report([Path("runs/demo")])          # a trace, results dirs, or a dir of them
    write_report([Path("runs/demo")], Path("report.html"))

The file opens from disk with no network: CSS, JavaScript, figures (data: URIs) and the
viewer's data (JSON in a <script type="application/json">) are all inline, and a Content
Security Policy forbids every request and every script but the viewer's own.
"""
from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

import moescope
from moescope.analysis.result import RESULTS, load_results
from moescope.errors import MoescopeError
from moescope.report.sections import SECTION_MODULES, Section, renderer
from moescope.report.sections import generic
from moescope.report.viewer import MAX_ENTRIES, ViewerSample, json_for_script, viewer_sample
from moescope.store.manifest import MANIFEST
from moescope.store.reader import Trace, open_trace

ASSETS = "assets"


@dataclass
class Inputs:
    """What the report's inputs turned out to be: trace directories and analysis result directories."""

    traces: list[Path] = field(default_factory=list)
    analyses: list[Path] = field(default_factory=list)


def collect_inputs(paths: list[Path]) -> Inputs:
    """Classify each path as a trace (manifest.json), an analysis (results.json) or a directory of those.

    A manifest.json or results.json file stands for its directory. Raises MoescopeError for a
    path that is missing or holds neither, directly or in an immediate subdirectory.
    """
    found = Inputs()
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.name in (MANIFEST, RESULTS):
            path = path.parent
        if not path.exists():
            raise MoescopeError(f"{raw} does not exist; pass a trace directory or an analysis output directory")
        hits = _classify(path)
        if not hits.traces and not hits.analyses and path.is_dir():
            for child in sorted(p for p in path.iterdir() if p.is_dir()):
                sub = _classify(child)
                hits.traces += sub.traces
                hits.analyses += sub.analyses
        if not hits.traces and not hits.analyses:
            raise MoescopeError(
                f"{raw} is neither a trace (no {MANIFEST}) nor an analysis output (no {RESULTS}), nor a directory "
                "holding them; pass what `moescope capture` or `moescope analyze ... --out` wrote"
            )
        found.traces += [p for p in hits.traces if p.resolve() not in {t.resolve() for t in found.traces}]
        found.analyses += [p for p in hits.analyses if p.resolve() not in {a.resolve() for a in found.analyses}]
    return found


def _classify(path: Path) -> Inputs:
    if (path / MANIFEST).is_file():
        return Inputs(traces=[path])
    if (path / RESULTS).is_file():
        return Inputs(analyses=[path])
    return Inputs()


def report_env() -> jinja2.Environment:
    """The jinja2 Environment of the report (autoescape on); sections receive it as `env`."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("moescope.report", ASSETS),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _asset(name: str) -> str:
    return resources.files("moescope.report").joinpath(ASSETS, name).read_text(encoding="utf-8")


def _resolve_trace(results: dict[str, Any], results_dir: Path) -> Path | None:
    """The trace an analysis names, relative paths tried against its directory then the working directory."""
    named = results.get("trace")
    if not named:
        return None
    for candidate in (results_dir / named, Path(named)):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def _order(analysis: str) -> tuple[int, str]:
    known = list(SECTION_MODULES)
    return (known.index(analysis), "") if analysis in known else (len(known), analysis)


def _render_analysis(results: dict[str, Any], out_dir: Path, env: jinja2.Environment) -> Section:
    """The analysis's own section, or the generic one (also when its section module fails)."""
    render = renderer(str(results.get("analysis")))
    if render is None:
        return generic.render(results, out_dir, env)
    try:
        return render(results, out_dir, env)
    except Exception as exc:  # an older or unexpected results.json must not sink the whole report
        message = (f"the {results.get('analysis')} section could not be drawn ({type(exc).__name__}: {exc}); "
                   "raw values shown")
        warnings.warn(f"{out_dir}: {message}", stacklevel=2)
        return generic.render(results, out_dir, env, note=message)


def _stats_section(trace: Trace, env: jinja2.Environment) -> Section | None:
    """The routing-statistics section computed on the spot, or None when that analysis is not installed."""
    try:
        from moescope.analysis.stats import routing_statistics
    except ImportError:
        return None
    result = routing_statistics(trace)
    if result.trace is None:
        result.trace = str(trace.path)
    with tempfile.TemporaryDirectory(prefix="moescope-report-") as tmp:
        result.save(tmp)  # sections read results.json + figures/ like any saved analysis
        return _render_analysis(load_results(tmp), Path(tmp), env)


def _ranges(layers: list[int]) -> str:
    """'0–3, 6, 8–9' for [0, 1, 2, 3, 6, 8, 9]."""
    parts, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            parts.append(str(x) if start == x else f"{start}–{x}")
            start = None
    return ", ".join(parts)


def _overview(trace: Trace) -> list[tuple[str, str]]:
    """(label, value) rows describing the model, the capture and the trace's size."""
    model, capture = trace.model, trace.manifest.get("capture", {})
    E, k, layers = trace.n_experts, trace.top_k, trace.moe_layers
    name = str(model.get("name_or_path") or "unknown")
    if model.get("revision"):
        name += f" @ {model['revision']}"
    arch = " / ".join(str(model[key]) for key in ("model_type", "family") if model.get(key))
    router = ", ".join(str(model[key]) for key in ("router", "score_function") if model.get(key))
    experts = f"E = {E} routed experts per MoE layer, top-k = {k}"
    if model.get("shared_experts"):
        experts += f", plus {model['shared_experts']} shared (always-on)"
    n_layers = f" of {model['n_layers']} layers" if model.get("n_layers") else ""
    mode = str(capture.get("mode", "unknown"))
    if capture.get("generate"):
        mode += f", {capture['generate']} generated tokens per prompt"
    src = "tokens" if trace.has("tokens") else "(SELECT DISTINCT seq_id, pos, NULL AS phase FROM routes)"
    n_seq, n_tok = trace.rows(f"SELECT count(DISTINCT seq_id), count(*) FROM {src}")[0]
    phases = trace.rows(f"SELECT phase, count(*) FROM {src} WHERE phase IS NOT NULL GROUP BY phase ORDER BY phase")
    tokens = f"{n_tok:,}" + (" (" + ", ".join(f"{p}: {c:,}" for p, c in phases) + ")" if phases else "")
    overlap = 1 - math.comb(E - k, k) / math.comb(E, k) if E >= k else float("nan")
    rows = [
        ("Model", name),
        ("Architecture", arch or "not recorded"),
        ("Router", router or "not recorded"),
        ("Experts", experts),
        ("MoE layers", f"{len(layers)}{n_layers}: {_ranges(layers)}"),
        ("Capture", mode + ("" if trace.has_weights else "; expert weights not recorded")),
        ("Sequences", f"{n_seq:,}"),
        ("Tokens", tokens),
        ("Chance level", f"a uniform router sends k/E = {k / E:.1%} of tokens to each expert; two independent "
                         f"uniform top-{k} draws share at least one expert with probability {overlap:.3f}"),
        ("Trace", str(trace.path)),
        ("Captured with", f"moescope {trace.manifest.get('moescope_version', '?')}"),
    ]
    return rows


def _anchor(text: str, taken: set[str]) -> str:
    """A unique id attribute value made of [a-z0-9-]."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    anchor, n = base, 2
    while anchor in taken:
        anchor, n = f"{base}-{n}", n + 1
    taken.add(anchor)
    return anchor


def _viewer_note(sample: ViewerSample) -> str:
    """What part of the trace the viewer holds, in one sentence."""
    if sample.shown < sample.n_sequences:
        parts = [f"Showing the first {sample.shown:,} of {sample.n_sequences:,} sequences (by seq_id)"]
    else:
        parts = [f"All {sample.n_sequences:,} sequence{'s' if sample.n_sequences != 1 else ''}"]
    if sample.cut_sequences:
        parts.append(f"{sample.cut_sequences:,} of them cut to their first {sample.max_tokens:,} tokens")
    if sample.budget_hit:
        parts.append(f"the viewer holds at most {MAX_ENTRIES:,} routing entries, to keep this file small")
    return "; ".join(parts) + "."


def build_report(
    inputs: list[Path], *, title: str | None = None, viewer_sequences: int = 50, viewer_tokens: int = 256
) -> str:
    """The report's HTML text for `inputs` (traces, analysis directories, or directories of them).

    Traces get an overview, a routing-statistics section (when that analysis is installed and
    not among the inputs) and a token viewer of their first `viewer_sequences` sequences, each
    cut to `viewer_tokens` tokens. Analyses get their sections in the order of SECTION_MODULES,
    unknown analyses last, alphabetically.
    """
    if viewer_sequences < 1 or viewer_tokens < 1:
        raise MoescopeError("--sequences and --tokens must be at least 1")
    found = collect_inputs(inputs)
    env = report_env()
    results = [(load_results(d), d) for d in found.analyses]
    traces = list(found.traces)
    if not traces:  # no trace given: show the ones the analyses read
        for res, d in results:
            path = _resolve_trace(res, d)
            if path is not None and path.resolve() not in {t.resolve() for t in traces}:
                traces.append(path)
    opened = [open_trace(p) for p in traces]

    # (order, section, source directory name: tells apart two runs of one analysis)
    sections: list[tuple[tuple[int, str], Section, str]] = []
    for res, d in sorted(results, key=lambda rd: (_order(str(rd[0].get("analysis"))), str(rd[1]))):
        sections.append((_order(str(res.get("analysis"))), _render_analysis(res, d, env), Path(d).name))
    # Statistics are computed for traces given as inputs, unless a stats result came with them
    # (one naming no findable trace counts for all: better no duplicate than two disagreeing).
    stats_for = [_resolve_trace(r, d) for r, d in results if r.get("analysis") == "stats"]
    stats_given = {p.resolve() if p is not None else None for p in stats_for}
    for trace in opened if found.traces else []:
        if None not in stats_given and trace.path.resolve() not in stats_given:
            section = _stats_section(trace, env)
            if section is not None:
                sections.append((_order("stats"), section, trace.path.name))
    sections.sort(key=lambda s: s[0])  # stable: computed stats join the stats given

    taken: set[str] = {"overview", "contents"}
    several = len(opened) > 1
    trace_blocks, viewers = [], []
    names = [t.path.name for t in opened]
    for trace in opened:
        # traces often share a directory name ("trace"): then name them with their parent too
        name = trace.path.name if names.count(trace.path.name) == 1 else f"{trace.path.parent.name}/{trace.path.name}"
        label = f" — {name}" if several else ""
        sample = viewer_sample(trace, sequences=viewer_sequences, max_tokens=viewer_tokens)
        trace_blocks.append({"anchor": _anchor(f"trace {name}" if several else "trace", taken),
                             "title": "Model and trace" + label, "rows": _overview(trace)})
        viewers.append({
            "anchor": _anchor(f"tokens {name}" if several else "tokens", taken),
            "title": "Token viewer" + label,
            "note": _viewer_note(sample),
            "layers": trace.moe_layers,
            "json": json_for_script(sample.data),
        })
    # Section.html is escaped by its section module already: Markup keeps autoescape off it.
    repeated = {t for t in (s.title for _, s, _ in sections) if sum(x.title == t for _, x, _ in sections) > 1}
    body = [{"anchor": _anchor(s.key, taken), "title": s.title + (f" — {source}" if s.title in repeated else ""),
             "summary": s.summary, "html": Markup(s.html)}
            for _, s, source in sections]

    script = _asset("viewer.js")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    if title is None:
        names = sorted({str(t.model.get("name_or_path")) for t in opened if t.model.get("name_or_path")})
        title = "moescope report" + (f": {', '.join(names)}" if names else "")
    return env.get_template("report.html.j2").render(
        title=title,
        version=moescope.__version__,
        traces=trace_blocks,
        sections=body,
        viewers=viewers,
        inputs=[str(p) for p in found.traces + found.analyses],
        css=_asset("report.css"),
        script=script,
        script_hash=f"sha256-{digest}",
    )


def write_report(inputs: list[Path], out_path: Path, **options: Any) -> Path:
    """Write build_report(inputs, **options) to `out_path` (UTF-8, atomically); returns the path."""
    html = build_report(inputs, **options)
    out = Path(out_path)
    if out.is_dir():
        raise MoescopeError(f"{out} is a directory; pass a file name such as {out / 'report.html'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)
    return out
