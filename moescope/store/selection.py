"""The selection of sequences an analysis command runs on (`moescope analyze ... --where`).

`--where` is added once, to every analyze command that reads a trace, by
:func:`add_where_option` (called by the CLI after the commands register). While such a
command runs, :func:`active_where` returns its predicate, and :func:`moescope.open_trace`
applies it to every trace the command opens; :class:`moescope.analysis.result.AnalysisResult`
records it in results.json. Python callers pass ``open_trace(path, where=...)`` instead.
"""
from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

_WHERE: ContextVar[str | None] = ContextVar("moescope_where", default=None)

WHERE_HELP = ("Analyse only the sequences this SQL predicate over the sequences table selects, "
              "e.g. \"label = 'code'\" (DuckDB syntax; recorded in results.json).")


def active_where() -> str | None:
    """The `--where` predicate of the analysis command running now, if any."""
    return _WHERE.get()


@contextmanager
def selecting(where: str | None) -> Iterator[None]:
    """Apply `where` to every trace opened inside the block (None: no selection)."""
    token = _WHERE.set(where.strip() if where and where.strip() else None)
    try:
        yield
    finally:
        _WHERE.reset(token)


def reads_trace(callback: Callable) -> bool:
    """Whether a command callback takes a trace directory argument (a Path parameter whose
    name starts with `trace`): the commands `--where` applies to."""
    for name, param in inspect.signature(callback, eval_str=True).parameters.items():
        if name.startswith("trace") and param.annotation is Path:
            return True
    return False


def with_where(callback: Callable) -> Callable:
    """`callback` with a `--where` option that selects sequences in the traces it opens."""
    import typer

    sig = inspect.signature(callback, eval_str=True)
    if "where" in sig.parameters:
        return callback  # the command handles --where itself

    @functools.wraps(callback)
    def run(*args: Any, where: Optional[str] = None, **kwargs: Any) -> Any:
        with selecting(where):
            return callback(*args, **kwargs)

    option = inspect.Parameter("where", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                               default=typer.Option(None, "--where", help=WHERE_HELP))
    params = list(sig.parameters.values())
    run.__signature__ = sig.replace(parameters=params + [option])  # type: ignore[attr-defined]
    run.__annotations__ = {**getattr(callback, "__annotations__", {}), "where": Optional[str]}
    return run


def add_where_option(analyze_app: Any) -> None:
    """Give every registered analyze command that reads a trace a `--where` option."""
    for command in analyze_app.registered_commands:
        if command.callback is not None and reads_trace(command.callback):
            command.callback = with_where(command.callback)
