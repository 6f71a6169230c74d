"""The `moescope` command line: thin wiring of the library's layers.

Each command group lives in ``moescope/commands/<name>.py`` and exposes
``register(app, analyze_app=..., experiment_app=...)``; modules are discovered automatically
(those named ``_*`` hold pieces the commands share, such as ``_model_options``).
Errors the user can fix (``MoescopeError``) print one line and exit non-zero.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

import typer
from rich.console import Console

from moescope.errors import Interrupted, MoescopeError

app = typer.Typer(
    name="moescope",
    help="Record how MoE language models route tokens to experts, and analyse it against chance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
analyze_app = typer.Typer(help="Analyses over traces (each writes results.json and figures).", no_args_is_help=True)
experiment_app = typer.Typer(help="Experiments that train models and compare them.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
app.add_typer(experiment_app, name="experiment")

err_console = Console(stderr=True)


_registered = False


def _register_commands() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    import moescope.commands as commands

    # Every module in moescope/commands/ adds its commands; heavy imports stay inside them.
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):  # shared pieces of the commands (e.g. _model_options), not commands
            continue
        module = importlib.import_module(f"moescope.commands.{info.name}")
        module.register(app, analyze_app=analyze_app, experiment_app=experiment_app)
    from moescope.store.selection import add_where_option

    add_where_option(analyze_app)  # --where on every analysis of a trace, added once here


def main() -> None:
    """Entry point of the console script."""
    _register_commands()
    try:
        # In non-standalone mode typer turns Ctrl-C into a returned 130 and `typer.Exit(n)`
        # into a returned n: both must become the exit status (`capture && analyze` stops).
        code = app(standalone_mode=False)
    except Interrupted as exc:
        err_console.print(str(exc), highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except MoescopeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", None) or getattr(exc, "code", 0) or 0
        sys.exit(code)
    except Exception as exc:
        # Usage errors arrive here in non-standalone mode; typer bundles its own click.
        if _is_usage_error(exc):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if code == 130:
        err_console.print("interrupted")
    if isinstance(code, int) and code != 0:
        sys.exit(code)


def _is_usage_error(exc: Exception) -> bool:
    """Whether `exc` is a click usage error (typer's bundled click or the standalone one)."""
    import typer._click.exceptions as bundled

    kinds = [bundled.ClickException]
    try:
        import click

        kinds.append(click.exceptions.ClickException)
    except ImportError:
        pass
    return isinstance(exc, tuple(kinds))


if __name__ == "__main__":
    main()
