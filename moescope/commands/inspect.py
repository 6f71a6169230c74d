"""`moescope inspect TRACE`: summarise a trace and validate every shard."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer, **_: object) -> None:
    @app.command("inspect")
    def inspect_trace(
        trace_dir: Path = typer.Argument(..., help="A trace directory."),
        no_checksums: bool = typer.Option(False, "--no-checksums", help="Skip re-hashing every shard."),
    ) -> None:
        """Print what a trace holds and check that every shard is whole and consistent."""
        from moescope.errors import TraceError
        from moescope.router_settings import describe_router
        from moescope.store.reader import open_trace
        from moescope.store.validate import trace_dir_size, validate

        trace = open_trace(trace_dir, allow_incomplete=True, verify=False)  # validate() reports every problem
        console = Console()
        m = trace.manifest
        model = m.get("model", {})
        info = Table(show_header=False, box=None)
        info.add_row("model", f"{model.get('name_or_path')} ({model.get('model_type')}, {model.get('family')})")
        info.add_row("routing", f"E={model.get('n_experts')} experts, top-{model.get('top_k')}, "
                                f"{len(model.get('moe_layers', []))} MoE layers of {model.get('n_layers')}; {model.get('router')}")
        info.add_row("this model", describe_router(model))
        cap = m.get("capture", {})
        info.add_row("capture", f"{cap.get('mode')}" + (f", {cap.get('generate')} new tokens" if cap.get("generate") else ""))
        info.add_row("status", "complete" if m.get("complete") else "[yellow]unfinished (rerun the capture to resume)[/]")
        console.print(info)
        result = validate(trace, checksums=not no_checksums)
        if not result.ok:
            for problem in result.problems:
                console.print(f"[red]invalid:[/] {problem}")
            raise TraceError(f"{trace_dir} failed validation ({len(result.problems)} problem(s)); capture it again")
        has_tokens = trace.has("tokens")
        counts = trace.rows("SELECT count(DISTINCT seq_id), count(*) FROM tokens")[0] if has_tokens else (0, 0)
        phases = dict(trace.rows("SELECT phase, count(*) FROM tokens GROUP BY phase ORDER BY phase")) if has_tokens else {}
        n_routes = trace.scalar("SELECT count(*) FROM routes")
        size = trace_dir_size(trace.path)
        data = Table(show_header=False, box=None)
        data.add_row("sequences", f"{counts[0]:,}")
        data.add_row("tokens", f"{counts[1]:,} (" + ", ".join(f"{k}: {v:,}" for k, v in phases.items()) + ")")
        data.add_row("routes", f"{n_routes:,} token-layer rows")
        data.add_row("tables", ", ".join(t for t in ("sequences", "tokens", "routes", "hidden") if trace.has(t)))
        data.add_row("on disk", f"{size / 1e6:,.2f} MB in {len(m.get('shards', []))} shard group(s); "
                                f"{size / max(n_routes, 1):.1f} bytes per token-layer")
        for name, value in stored_extras(trace).items():
            data.add_row(name, value)
        console.print(data)
        console.print(f"[green]valid[/]: {result.checked_files} shard files checked")


def stored_extras(trace) -> dict[str, str]:  # noqa: ANN001
    """What else the trace holds besides expert ids and weights: metadata fields (with their
    types), truncated texts, router scores and router inputs (hidden states) with their rate."""
    from moescope.schema import SEQUENCES

    m = trace.manifest
    cap = m.get("capture", {})
    out: dict[str, str] = {}
    standard = {c.name for c in SEQUENCES}
    columns = trace.columns("sequences") if trace.has("sequences") else []
    declared = (m.get("input") or {}).get("fields") or {}
    fields = [c for c in columns if c not in standard]
    out["metadata fields"] = ", ".join(f"{c} ({declared[c]})" if c in declared else c for c in fields) or "none"
    renamed = (m.get("input") or {}).get("renamed") or {}
    if renamed:
        out["metadata fields"] += "; renamed: " + ", ".join(f"{a} -> {b}" for a, b in renamed.items())
    if "truncated" in columns:
        n = trace.scalar("SELECT count(*) FROM sequences WHERE truncated")
        out["truncated texts"] = f"{n:,} (cut at {cap.get('max_length')} tokens; column `truncated`)"
    scores = [c for c in ("router_logits", "router_probs") if c in trace.columns("routes")]
    out["router scores"] = ", ".join(scores) if scores else "not stored (capture with --router-scores)"
    if trace.has("hidden"):
        rows = trace.scalar("SELECT count(*) FROM hidden")
        routes = max(trace.scalar("SELECT count(*) FROM routes") or 1, 1)
        how = []
        if cap.get("option_hidden_positions"):
            how.append(f"positions {cap['option_hidden_positions']}")
        elif cap.get("option_hidden_rate") is not None:
            how.append(f"rate {cap['option_hidden_rate']:g}")
        if cap.get("option_hidden_layers"):
            how.append(f"layers {cap['option_hidden_layers']}")
        out["hidden states"] = (f"{rows:,} router inputs ({rows / routes:.2%} of token-layers"
                                + (f"; requested {', '.join(how)}" if how else "") + ")")
    else:
        out["hidden states"] = "not stored (capture with --hidden-rate)"
    return out
