"""Run a text dataset through a model into a trace directory: batched, streaming, resumable.

The main thread only tokenizes and runs the model; a single writer thread assembles the
Arrow tables and writes shards, with at most two batches in flight (bounded memory).
Killed at any moment, the same call resumes after the last committed shard.
"""
from __future__ import annotations

import platform
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import moescope
from moescope.capture.assemble import TokenTexts, assemble_group
from moescope.capture.data import Record, TextDataset
from moescope.capture.loading import describe_model
from moescope.capture.recorder import CaptureOptions, Recorder
from moescope.errors import DataError, MoescopeError
from moescope.store.manifest import fingerprint
from moescope.store.writer import DEFAULT_SHARD_ROWS, TraceWriter


@dataclass(frozen=True)
class RunOptions:
    """How to run the data through the model.

    Attributes:
        batch_size: sequences per forward / generate call.
        max_length: longest prompt in tokens (None: the tokenizer's model_max_length).
        on_long: "truncate" (with a warning) or "refuse" texts longer than max_length.
        generate: new tokens to generate per sequence (0: a plain forward over the text).
        do_sample, temperature, top_p: sampling settings for generate (greedy by default).
        seed: seeds sampling per batch (reproducible after a resume) and the hidden sampler.
        shard_rows: routes rows per shard (bounds memory).
    """

    batch_size: int = 8
    max_length: int | None = None
    on_long: str = "truncate"
    generate: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    shard_rows: int = DEFAULT_SHARD_ROWS

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise MoescopeError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.on_long not in ("truncate", "refuse"):
            raise MoescopeError(f"--on-long must be 'truncate' or 'refuse', not {self.on_long!r}")
        if self.generate < 0:
            raise MoescopeError(f"--generate must be 0 or more new tokens, not {self.generate}")


def _batches(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while batch := list(islice(records, size)):
        yield batch


def _max_length(tokenizer: Any, model: Any, requested: int | None) -> int:
    limits = [getattr(tokenizer, "model_max_length", None), getattr(model.config, "max_position_embeddings", None)]
    limit = min([int(x) for x in limits if isinstance(x, int) and 0 < x < 10**8] or [4096])
    if requested is not None:
        if requested > limit:
            raise MoescopeError(f"--max-length {requested} exceeds the model's context of {limit} tokens")
        return requested
    return limit


def capture_dataset(
    model: Any,
    tokenizer: Any,
    data: str | Path | TextDataset,
    out: str | Path,
    *,
    options: CaptureOptions | None = None,
    run: RunOptions | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Capture the routing of every record of `data` into the trace directory `out`.

    Returns the finished manifest. `progress(done_sequences, total_sequences, tokens)` is
    called after each batch. Rerunning with the same arguments resumes an interrupted run.
    """
    options = options or CaptureOptions(seed=(run.seed if run else 0))
    run = run or RunOptions()
    dataset = data if isinstance(data, TextDataset) else TextDataset(data)
    name = model_name or getattr(model, "name_or_path", None) or model.config._name_or_path
    if run.generate and getattr(tokenizer, "padding_side", "left") != "left" and not model.config.is_encoder_decoder:
        tokenizer.padding_side = "left"  # generate() appends on the right: prompts must end aligned
    max_length = _max_length(tokenizer, model, run.max_length)
    model_info = describe_model(model, name)
    capture_info = {
        "mode": "generate" if run.generate else "forward",
        **{k: v for k, v in asdict(run).items() if k != "shard_rows"},
        "max_length": max_length,
        **{f"option_{k}": v for k, v in asdict(options).items()},
        "has_weights": True,
    }
    header = {
        "moescope_version": moescope.__version__,
        "software": {"torch": torch.__version__, "transformers": _version("transformers"), "python": platform.python_version()},
        "model": model_info,
        "tokenizer": {
            "name_or_path": getattr(tokenizer, "name_or_path", name),
            "vocab_size": len(tokenizer),
            "padding_side": tokenizer.padding_side,
        },
        "capture": capture_info,
        "input": asdict(dataset.summary),
    }
    fp = fingerprint({"model": model_info, "capture": capture_info, "input_sha256": dataset.summary.sha256})
    writer = TraceWriter(out, header, fp, shard_rows=run.shard_rows, overwrite=overwrite)
    if writer.complete:
        return writer.manifest

    recorder = Recorder(model, tokenizer=tokenizer, options=options)
    texts = TokenTexts(tokenizer)
    total = len(dataset)
    done = writer.input_done
    tokens_seen = 0
    pending: list[Future] = []
    n_truncated = 0

    def write(groups: list, input_end: int, n_seq: int) -> None:
        tables: dict[str, list] = {}
        for group in groups:
            for key, table in assemble_group(group, recorder, texts).items():
                if table is not None:
                    tables.setdefault(key, []).append(table)
        import pyarrow as pa

        merged = {k: pa.concat_tables(v, promote_options="default") for k, v in tables.items()}
        writer.add(merged, input_end=input_end, n_sequences=n_seq)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moescope-writer") as pool, recorder, torch.inference_mode():
        for batch in _batches(dataset.iter_from(done), run.batch_size):
            enc, offsets, truncated = _tokenize(tokenizer, batch, max_length, run.on_long)
            n_truncated += truncated
            recorder.expect([r.index for r in batch], texts=[r.text for r in batch],
                            metadata=[r.metadata for r in batch], offsets=offsets)
            device = _input_device(model)
            input_ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            if run.generate:
                torch.manual_seed(run.seed * 1_000_003 + batch[0].index)
                model.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=run.generate,
                    do_sample=run.do_sample, temperature=run.temperature if run.do_sample else None,
                    top_p=run.top_p if run.do_sample else None, top_k=None if not run.do_sample else 0,
                    pad_token_id=tokenizer.pad_token_id,
                )
            elif getattr(model.config, "is_encoder_decoder", False):
                model.get_encoder()(input_ids=input_ids, attention_mask=mask)
            else:
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            groups = recorder.take()
            done = batch[-1].index + 1
            while len(pending) >= 2:  # at most two batches in flight: memory stays bounded
                pending.pop(0).result()
            pending.append(pool.submit(write, groups, done, len(batch)))
            tokens_seen += int(mask.sum()) + run.generate * len(batch)
            if progress:
                progress(done, total, tokens_seen)
        for fut in pending:
            fut.result()
    if n_truncated:
        warnings.warn(f"{n_truncated} text(s) were longer than {max_length} tokens and were truncated")
    return writer.finish({"run": {"truncated_texts": n_truncated}})


def _tokenize(tokenizer: Any, batch: list[Record], max_length: int, on_long: str) -> tuple[dict, list, int]:
    """Tokenized batch, per-row char offsets of the real tokens, and how many were truncated."""
    texts = [r.text for r in batch]
    full = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    too_long = [r for r, ids in zip(batch, full) if len(ids) > max_length]
    if too_long and on_long == "refuse":
        r = too_long[0]
        raise DataError(
            f"record {r.index} is {len(full[batch.index(r)])} tokens, longer than --max-length {max_length}; "
            "raise --max-length, shorten it, or pass --on-long truncate"
        )
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                    return_offsets_mapping=getattr(tokenizer, "is_fast", False))
    offsets = None
    if "offset_mapping" in enc:
        om, mask = enc.pop("offset_mapping").tolist(), enc["attention_mask"].tolist()
        offsets = [[tuple(span) for span, m in zip(row, mrow) if m] for row, mrow in zip(om, mask)]
    return enc, offsets, len(too_long)


def _input_device(model: Any) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except Exception:
        return next(model.parameters()).device


def _version(package: str) -> str:
    from importlib.metadata import version

    try:
        return version(package)
    except Exception:
        return "unknown"
