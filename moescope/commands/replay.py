"""`moescope capture --replay TRACE`: the wiring of a replay (logic in moescope.capture.replay).

Not a command group of its own: commands/capture.py calls :func:`run_replay` when --replay is given.
"""
from __future__ import annotations

from pathlib import Path


def register(app: object, **_: object) -> None:
    """Nothing to register: --replay is an option of `moescope capture`."""


def run_replay(source: Path, out: Path, *, model: str | None, device: str, dtype: str, router_scores: str | None,
               batch_size: int, revision: str | None, trust_remote_code: bool, allow_pickle: bool, overwrite: bool,
               shard_rows: int) -> None:
    """Load the model, replay `source`'s tokens through it into `out`, print a summary."""
    from moescope.capture.loading import LoadOptions, load_model
    from moescope.capture.recorder import CaptureOptions
    from moescope.capture.replay import replay_trace
    from moescope.commands.capture import console, print_summary

    options = CaptureOptions(router_scores=router_scores)
    load = LoadOptions(device=device, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                       allow_pickle=allow_pickle)
    console.print(f"loading {model or 'the built-in default model'} to replay the tokens of {source} ...")
    loaded, tokenizer = load_model(model, load)
    manifest = replay_trace(loaded, tokenizer, source, out, options=options, batch_size=batch_size,
                            model_name=model, overwrite=overwrite, shard_rows=shard_rows)
    print_summary(out, manifest)
