"""`moescope capture`: run a text dataset through an MoE model into a trace directory."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moescope.commands._model_options import ALLOW_PICKLE, DEVICE, DTYPE, MODEL, REVISION, TRUST_REMOTE_CODE

console = Console(stderr=True)


def progress_bar() -> Progress:
    """A rich progress bar over sequences that also shows tokens/s."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def register(app: typer.Typer, **_: object) -> None:
    @app.command("capture")
    def capture(
        data: Optional[Path] = typer.Option(None, "--data", help="Texts: .txt (one per line), .jsonl (`text` + metadata) or .parquet."),
        replay: Optional[Path] = typer.Option(None, "--replay", help="Instead of --data: run the model over exactly the token ids of this trace (e.g. an engine import)."),
        out: Path = typer.Option(..., "--out", help="Trace directory to write (resumed if it holds this same capture)."),
        model: Optional[str] = MODEL,
        generate: int = typer.Option(0, "--generate", help="Generate N new tokens per text and record them too (0: forward only)."),
        batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward / generate call."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Longest prompt in tokens (default: the model's context)."),
        on_long: str = typer.Option("truncate", "--on-long", help="Texts over --max-length: 'truncate' (a note; flagged in sequences.truncated) or 'refuse'."),
        device: str = DEVICE,
        dtype: str = DTYPE,
        sample: bool = typer.Option(False, "--sample", help="Sample when generating (default: greedy)."),
        temperature: float = typer.Option(1.0, "--temperature"),
        top_p: float = typer.Option(1.0, "--top-p"),
        router_scores: Optional[str] = typer.Option(None, "--router-scores", help="Also store all E router 'logits' or 'probs'."),
        hidden_rate: float = typer.Option(0.0, "--hidden-rate", help="Fraction of tokens whose router input vector is stored."),
        hidden_positions: Optional[str] = typer.Option(None, "--hidden-positions", help="Store router inputs at these token positions, e.g. 0,1,2,10."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Record only these MoE layers, e.g. 0,7 (default: every MoE layer)."),
        hidden_layers: Optional[str] = typer.Option(None, "--hidden-layers", help="Only at these layers, e.g. 0,7 (default: every MoE layer)."),
        no_special_tokens: bool = typer.Option(False, "--no-special-tokens", help="Do not add the tokenizer's special tokens (texts already carry them)."),
        text_field: str = typer.Option("text", "--text-field", help="Field holding the text in .jsonl / .parquet."),
        skip_empty: bool = typer.Option(False, "--skip-empty", help="Drop empty texts instead of refusing the file."),
        seed: int = typer.Option(0, "--seed", help="Seed for sampling and hidden-state selection."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different trace already at --out."),
        shard_rows: int = typer.Option(1 << 21, "--shard-rows", help="Token-layer rows per shard (bounds memory)."),
        revision: Optional[str] = REVISION,
        trust_remote_code: bool = TRUST_REMOTE_CODE,
        allow_pickle: bool = ALLOW_PICKLE,
        engine: str = typer.Option("local", "--engine", help="'local' (this process) or 'ray' (workers on a Ray cluster)."),
        num_workers: int = typer.Option(1, "--num-workers", help="Ray: workers, each holding one copy of the model."),
        gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="Ray: GPUs per worker (0: CPU workers)."),
        threads_per_worker: int = typer.Option(1, "--threads-per-worker", help="Ray: torch threads (and CPUs) per worker."),
        chunk_size: int = typer.Option(64, "--chunk-size", help="Ray: sequences per work item (rounded to whole batches)."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray: cluster address (default: the running cluster, else a local one)."),
    ) -> None:
        """Record which experts every token is routed to, at every MoE layer."""
        from moescope.capture.data import TextDataset
        from moescope.capture.dataset import RunOptions
        from moescope.capture.loading import LoadOptions, load_model
        from moescope.capture.recorder import CaptureOptions
        from moescope.errors import Interrupted, MoescopeError

        if engine not in ("local", "ray"):
            raise MoescopeError(f"--engine must be 'local' or 'ray', not {engine!r}")
        if (data is None) == (replay is None):
            raise MoescopeError("give either --data (texts to capture) or --replay (a trace whose tokens to replay)")
        if replay is not None:
            from moescope.commands.replay import run_replay

            if generate or engine != "local" or hidden_rate or hidden_positions:
                raise MoescopeError("--replay runs the trace's own tokens in this process: it takes no --generate, "
                                    "--engine ray or hidden-state options")

            run_replay(replay, out, model=model, device=device, dtype=dtype, router_scores=router_scores,
                       batch_size=batch_size, revision=revision, trust_remote_code=trust_remote_code,
                       allow_pickle=allow_pickle, overwrite=overwrite, shard_rows=shard_rows)
            return
        dataset = TextDataset(data, text_field=text_field, skip_empty=skip_empty)
        run = RunOptions(batch_size=batch_size, max_length=max_length, on_long=on_long, generate=generate,
                         do_sample=sample, temperature=temperature, top_p=top_p, seed=seed,
                         shard_rows=shard_rows, add_special_tokens=not no_special_tokens)
        options = CaptureOptions(router_scores=router_scores, hidden_rate=hidden_rate, seed=seed,
                                 hidden_positions=_int_list(hidden_positions, "--hidden-positions"),
                                 hidden_layers=_int_list(hidden_layers, "--hidden-layers"),
                                 layers=_int_list(layers, "--layers"))
        load = LoadOptions(device=device, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                           allow_pickle=allow_pickle)
        try:
            if engine == "ray":
                from moescope.capture.distributed import RayOptions

                ray_options = RayOptions(num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                                         threads_per_worker=threads_per_worker, chunk_size=chunk_size,
                                         address=ray_address)
                manifest = run_distributed_with_progress(model, dataset, out, load, options, run, ray_options,
                                                         overwrite)
            else:
                console.print(f"loading {model or 'the built-in default model'} ...")
                loaded, tokenizer = load_model(model, load)
                manifest = run_with_progress(loaded, tokenizer, dataset, out, options, run, model, overwrite)
        except KeyboardInterrupt:
            raise Interrupted(interrupted_line(out)) from None
        print_summary(out, manifest)


def interrupted_line(out: Path) -> str:
    """What Ctrl-C leaves: how much is committed, and that the same command resumes it."""
    import json

    try:
        manifest = json.loads((Path(out) / "manifest.json").read_text(encoding="utf-8"))
        done = sum(s["n_sequences"] for s in manifest.get("shards", []))
        kept = f"{done:,} sequences are committed in {out}"
    except (OSError, ValueError, KeyError, TypeError):
        kept = f"nothing was committed in {out}"
    return f"interrupted; {kept} and the same command resumes it"


def _sequences_progress(bar: Progress, total: int):  # noqa: ANN202
    """A progress(done, total, tokens) callback that moves `bar` and shows tokens/s since now."""
    import time

    started = time.perf_counter()
    task = bar.add_task("capturing", total=total, rate="-")

    def progress(done: int, _total: int, tokens: int) -> None:
        rate = tokens / max(time.perf_counter() - started, 1e-9)
        bar.update(task, completed=done, rate=f"{rate:,.0f}")

    return progress


def note(line: str) -> None:
    """Print a one-line note of the capture (resume point, truncation, renamed fields)."""
    console.print(line, highlight=False, soft_wrap=True)


def run_with_progress(model, tokenizer, dataset, out, options, run, name, overwrite=False):  # noqa: ANN001
    """capture_dataset with a progress bar; returns the manifest."""

    from moescope.capture.dataset import capture_dataset

    with progress_bar() as bar:
        progress = _sequences_progress(bar, len(dataset))
        return capture_dataset(model, tokenizer, dataset, out, options=options, run=run,
                               model_name=name, overwrite=overwrite, progress=progress, notify=note)


def run_distributed_with_progress(model, dataset, out, load, options, run, ray_options, overwrite=False):  # noqa: ANN001
    """capture_distributed with a progress bar over committed chunks; returns the manifest."""
    import logging

    from moescope.capture.distributed import capture_distributed

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the bar below replaces Ray Data's own logs
    console.print(f"starting {ray_options.num_workers} Ray worker(s) with {model or 'the built-in default model'} ...")
    with progress_bar() as bar:
        progress = _sequences_progress(bar, len(dataset))
        return capture_distributed(model, dataset, out, load=load, options=options, run=run,
                                   ray_options=ray_options, model_name=model, overwrite=overwrite, progress=progress,
                                   notify=note)


def _int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    """"0,5,10" -> (0, 5, 10); one clear line when it is not a list of integers."""
    if not text:
        return None
    from moescope.errors import MoescopeError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MoescopeError(f"{flag} takes comma-separated integers such as 0,5,10, not {text!r}") from None


def print_summary(out: Path, manifest: dict) -> None:
    totals = manifest.get("totals", {})
    rows = totals.get("rows", {})
    if not manifest.get("complete"):  # a partial run on purpose (Ray max_chunks)
        console.print(f"[yellow]trace unfinished[/]: {out}; the same command completes it")
        return
    console.print(
        f"[green]trace complete[/]: {out}  ({totals.get('n_sequences', 0):,} sequences, "
        f"{rows.get('tokens', 0):,} tokens, {rows.get('routes', 0):,} token-layer routes)"
    )
