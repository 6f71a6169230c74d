"""The model-loading options every command that loads a model shares (capture, verify, pos,
semantic): one definition, so their names, defaults and help read the same everywhere."""
from __future__ import annotations

import typer

MODEL = typer.Option(None, "--model", help="Local model directory or hub id (default: the built-in model).")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps, or auto (spread over devices).")
DTYPE = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16.")
REVISION = typer.Option(None, "--revision", help="Hub revision of the model.")
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help="Run the model repository's own code.")
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="Accept pickle checkpoints (they can run code).")
