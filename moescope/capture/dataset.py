"""Run a text dataset through a model into a trace directory: batched, streaming, resumable.

The main thread only tokenizes and runs the model; a single writer thread assembles the
Arrow tables and writes shards, with at most two batches in flight (bounded memory).
Killed at any moment, the same call resumes with the records that no committed shard holds.
"""
from __future__ import annotations

import platform
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import torch

import moescope
from moescope.capture.assemble import TokenTexts, assemble_group
from moescope.capture.data import TRUNCATED, Record, TextDataset
from moescope.capture.loading import describe_model
from moescope.capture.recorder import CaptureOptions, Recorder
from moescope.capture.recording import check_layers, merge_options
from moescope.errors import DataError, MoescopeError
from moescope.capture.identity import model_directory, normalised_path, tokenizer_identity, weights_identity
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
        add_special_tokens: let the tokenizer add its special tokens (BOS...); turn off for
            texts that already carry them, e.g. rendered with a chat template.
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
    add_special_tokens: bool = True
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


def batches_in(dataset: TextDataset, ranges: list[tuple[int, int]], size: int) -> Iterator[list[Record]]:
    """Batches of `size` records of `dataset` within each [start, end) of `ranges` (sorted,
    disjoint), reading the file once. A batch never crosses a range end, so ranges that start
    at multiples of `size` give exactly the batches of an uninterrupted run."""
    if not ranges:
        return
    records = dataset.iter_from(ranges[0][0])
    for start, end in ranges:
        for record in records:  # skip to the range's start (records between ranges are done)
            if record.index >= start:
                break
        else:
            return
        batch = [record]
        for record in islice(records, end - start - 1):
            if len(batch) == size:
                yield batch
                batch = []
            batch.append(record)
        yield batch


def _max_length(tokenizer: Any, model: Any, requested: int | None) -> int:
    limits = [getattr(tokenizer, "model_max_length", None), getattr(model.config, "max_position_embeddings", None)]
    limit = min([int(x) for x in limits if isinstance(x, int) and 0 < x < 10**8] or [4096])
    if requested is not None:
        if requested > limit:
            raise MoescopeError(f"--max-length {requested} exceeds the model's context of {limit} tokens")
        return requested
    return limit


# Options that change how a capture runs, not what it records: a resume may change them.
RESUMABLE_OPTIONS = ("batch_size",)


@dataclass(frozen=True)
class TraceIdentity:
    """What a capture writes into the manifest header, and its fingerprint (the resume check).

    The same model, tokenizer, data and options give the same identity whatever runs the
    capture (one process or a Ray cluster of any size), so either can resume the other.
    """

    header: dict[str, Any]
    fingerprint: str
    max_length: int


def trace_identity(model: Any, tokenizer: Any, dataset: TextDataset, options: CaptureOptions, run: RunOptions,
                   model_name: str | None = None) -> TraceIdentity:
    """The manifest header and fingerprint of capturing `dataset` with this model and options.

    Sets the tokenizer's padding side to left when generating (generate() appends on the
    right: prompts must end aligned), as the capture itself needs it.
    """
    name = model_name or getattr(model, "name_or_path", None) or model.config._name_or_path
    if run.generate and getattr(tokenizer, "padding_side", "left") != "left" and not model.config.is_encoder_decoder:
        tokenizer.padding_side = "left"
    max_length = _max_length(tokenizer, model, run.max_length)
    model_info = describe_model(model, name)
    model_info["path"] = normalised_path(name)
    snapshot = model_directory(model, name)
    if snapshot is not None and not Path(str(name)).is_dir():  # a hub id: where its files really are
        model_info["snapshot"] = str(snapshot)
    weights = weights_identity(model, name)
    model_info["weights"] = weights

    captured = check_layers(model_info["moe_layers"], options.layers)
    capture_info = {
        "mode": "generate" if run.generate else "forward",
        **{k: v for k, v in asdict(run).items() if k != "shard_rows"},
        "max_length": max_length,
        **{f"option_{k}": v for k, v in asdict(options).items()},
        "has_weights": True,
        "layers": captured,  # the MoE layers recorded (all of them unless `layers` chose some)
    }
    tokenizer_info = tokenizer_identity(tokenizer)
    header = {
        "moescope_version": moescope.__version__,
        "software": {"torch": torch.__version__, "transformers": _version("transformers"), "python": platform.python_version()},
        "model": model_info,
        "tokenizer": {
            "name_or_path": getattr(tokenizer, "name_or_path", name),
            "vocab_size": len(tokenizer),
            "padding_side": tokenizer.padding_side,
            "digest": tokenizer_info["digest"],
        },
        "capture": capture_info,
        "input": {**asdict(dataset.summary), "text_field": dataset.text_field},
    }
    # What the recorded content depends on. Paths are not part of it (the weights' content is),
    # nor is the batch size unless sampling seeds depend on it: a resume may change it, and each
    # shard records the batch size it was captured with.
    content_options = {k: v for k, v in capture_info.items() if k not in RESUMABLE_OPTIONS}
    if run.generate and run.do_sample:
        content_options["batch_size"] = run.batch_size
    identity = {
        "model": {k: v for k, v in model_info.items() if k not in ("name_or_path", "path", "snapshot", "revision")},
        "tokenizer": tokenizer_info,
        "input": {"sha256": dataset.summary.sha256, "text_field": dataset.text_field,
                  "n_records": dataset.summary.n_records},
        "capture": content_options,
    }
    header["identity"] = identity
    fp = fingerprint(identity)
    return TraceIdentity(header, fp, max_length)


class BatchCapture:
    """Runs batches of records through a model under a Recorder and assembles their tables.

    The one code path of every capture engine: the single-process loop below and each
    distributed worker (moescope.capture.distributed) call exactly this, so the same
    batches give the same tables. Use inside ``with recorder, torch.inference_mode():``.
    """

    def __init__(self, model: Any, tokenizer: Any, options: CaptureOptions, run: RunOptions, max_length: int) -> None:
        self.model, self.tokenizer, self.run, self.max_length = model, tokenizer, run, max_length
        self.recorder = Recorder(model, tokenizer=tokenizer, options=options)
        self.texts = TokenTexts(tokenizer)

    def forward(self, batch: list[Record]) -> tuple[list, int, int]:
        """Run one batch; returns (recorded groups, texts truncated, tokens processed)."""
        model, run = self.model, self.run
        enc, offsets, too_long = _tokenize(self.tokenizer, batch, self.max_length, run.on_long,
                                           add_special_tokens=run.add_special_tokens)
        metadata = [{**r.metadata, TRUNCATED: flag} for r, flag in zip(batch, too_long)]
        self.recorder.expect([r.seq_id for r in batch], texts=[r.text for r in batch],
                             metadata=metadata, offsets=offsets)
        device = input_device(model)
        input_ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        if run.generate:
            torch.manual_seed(run.seed * 1_000_003 + batch[0].index)
            model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=run.generate,
                do_sample=run.do_sample, temperature=run.temperature if run.do_sample else None,
                top_p=run.top_p if run.do_sample else None, top_k=None if not run.do_sample else 0,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        elif getattr(model.config, "is_encoder_decoder", False):
            model.get_encoder()(input_ids=input_ids, attention_mask=mask)
        else:
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        return self.recorder.take(), sum(too_long), int(mask.sum()) + run.generate * len(batch)

    def assemble(self, groups: list) -> dict[str, pa.Table]:
        """The Arrow tables (sequences, tokens, routes, hidden) of recorded groups."""
        tables: dict[str, list] = {}
        for group in groups:
            for key, table in assemble_group(group, self.recorder, self.texts).items():
                if table is not None:
                    tables.setdefault(key, []).append(table)
        return {k: pa.concat_tables(v, promote_options="default") for k, v in tables.items()}


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

    notify: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Capture the routing of every record of `data` into the trace directory `out`.

    Options are keywords, as for :func:`moescope.record`:

    - what to record (:class:`CaptureOptions`): ``layers``, ``router_scores``,
      ``hidden_rate``, ``hidden_positions``, ``hidden_layers``, ``weights_dtype``;
    - how to run (:class:`RunOptions`): ``batch_size``, ``max_length``, ``on_long``,
      ``generate``, ``do_sample``, ``temperature``, ``top_p``, ``add_special_tokens``,
      ``shard_rows``;
    - ``seed`` seeds both sampling and the hidden-state sampler.

    The option objects (``options=CaptureOptions(...)``, ``run=RunOptions(...)``) are still
    accepted; keywords override their fields. Returns the finished manifest.
    `progress(done_sequences, total_sequences, tokens)` is called after each batch.
    Rerunning with the same arguments resumes an interrupted run (also one started by the
    distributed engine: every input range not yet committed is done).
    `notify(line)` receives one-line notes (already complete, where a resume starts, renamed
    fields, truncated texts); without it, truncation is a warning.
    """
    options, run = capture_options(options, run, kwargs)
    dataset = data if isinstance(data, TextDataset) else TextDataset(data)
    say = notify or (lambda line: None)
    ident = trace_identity(model, tokenizer, dataset, options, run, model_name)
    total = len(dataset)
    with open_capture_writer(out, ident, run, overwrite, dataset, say) as writer:
        if writer.complete:
            return writer.manifest
        pending_ranges = writer.pending(total)
        n_truncated = _capture_into(writer, model, tokenizer, dataset, options, run, ident, pending_ranges, progress)
        report_truncation(n_truncated, ident.max_length, notify)
        return writer.finish({"run": {"truncated_texts": n_truncated}})


def open_capture_writer(out: str | Path, ident: TraceIdentity, run: RunOptions, overwrite: bool,
                        dataset: TextDataset, say: Callable[[str], None]) -> TraceWriter:
    """The trace writer of a capture of `dataset` (locked, resumed or new), having told `say` the
    dataset's notes and whether the trace is already complete or where the capture starts. Shared
    by the single-process and the Ray capture, so both resume and announce alike."""
    for line in dataset.notes():
        say(line)
    total = len(dataset)
    writer = TraceWriter(out, ident.header, ident.fingerprint, shard_rows=run.shard_rows, overwrite=overwrite,
                         shard_info={"batch_size": run.batch_size})
    if writer.complete:
        say(f"{out} is already complete ({total:,} sequences); nothing to do")
    else:
        say(resume_note(writer.pending(total), total))
    return writer


def resume_note(pending: list[tuple[int, int]], total: int) -> str:
    """"capturing N sequences" for a new trace, or where a resume starts."""
    todo = sum(end - start for start, end in pending)
    if todo == total:
        return f"capturing {total:,} sequences"
    return (f"resuming at sequence {pending[0][0]:,} of {total:,}: {total - todo:,} already committed, "
            f"{todo:,} to capture")


def report_truncation(n_truncated: int, max_length: int, notify: Callable[[str], None] | None) -> None:
    """Tell `notify` how many texts were truncated (a warning without it); nothing when none were."""
    if n_truncated:
        (notify or warnings.warn)(truncation_note(n_truncated, max_length))


def truncation_note(n_truncated: int, max_length: int) -> str:
    """The one-line note on truncated texts (each is flagged in the sequences table)."""
    return (f"note: {n_truncated:,} text(s) were longer than {max_length} tokens and were truncated "
            "(column `truncated` in sequences; --on-long refuse to stop instead)")


def _capture_into(writer: TraceWriter, model: Any, tokenizer: Any, dataset: TextDataset, options: CaptureOptions,
                  run: RunOptions, ident: TraceIdentity, pending_ranges: list[tuple[int, int]],
                  progress: Callable[[int, int, int], None] | None) -> int:
    """Capture the pending ranges into `writer`; returns how many texts were truncated."""
    capture = BatchCapture(model, tokenizer, options, run, ident.max_length)
    total = len(dataset)
    done = total - sum(end - start for start, end in pending_ranges)
    tokens_seen = 0
    pending: list[Future] = []
    n_truncated = 0

    def write(groups: list, input_start: int, input_end: int, n_seq: int) -> None:
        writer.add(capture.assemble(groups), input_end=input_end, n_sequences=n_seq, input_start=input_start)

    # On an exception (Ctrl-C included) the pool's exit waits for the writes in flight: what
    # was computed is committed, and the same call resumes after it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moescope-writer") as pool, capture.recorder, \
            torch.inference_mode():
        for batch in batches_in(dataset, pending_ranges, run.batch_size):
            groups, truncated, n_tokens = capture.forward(batch)
            n_truncated += truncated
            done += len(batch)
            while len(pending) >= 2:  # at most two batches in flight: memory stays bounded
                pending.pop(0).result()
            pending.append(pool.submit(write, groups, batch[0].index, batch[-1].index + 1, len(batch)))
            tokens_seen += n_tokens
            if progress:
                progress(done, total, tokens_seen)
        for fut in pending:
            fut.result()
    return n_truncated


def capture_options(options: CaptureOptions | None, run: RunOptions | None,
                    kwargs: dict[str, Any]) -> tuple[CaptureOptions, RunOptions]:
    """(CaptureOptions, RunOptions) from the option objects given (or defaults) with the
    keyword arguments applied to whichever has the field (``seed`` to both). TypeError
    naming every accepted keyword for an unknown one."""
    from dataclasses import fields

    known = {f.name for f in fields(CaptureOptions)} | {f.name for f in fields(RunOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"capture_dataset() got unexpected keyword(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(sorted(known))}")
    run = merge_options(RunOptions, run, kwargs, strict=False)
    if options is None and "seed" not in kwargs:
        kwargs = {**kwargs, "seed": run.seed}  # one seed for sampling and the hidden sampler
    options = merge_options(CaptureOptions, options, kwargs, strict=False)
    return options, run


def _tokenize(tokenizer: Any, batch: list[Record], max_length: int, on_long: str, *,
              add_special_tokens: bool = True) -> tuple[dict, list, list[bool]]:
    """Tokenized batch, per-row char offsets of the real tokens, and per row whether it was truncated."""
    texts = [r.text for r in batch]
    full = tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    too_long = [r for r, ids in zip(batch, full) if len(ids) > max_length]
    if too_long and on_long == "refuse":
        r = too_long[0]
        raise DataError(
            f"record {r.index} is {len(full[batch.index(r)])} tokens, longer than --max-length {max_length}; "
            "raise --max-length, shorten it, or pass --on-long truncate"
        )
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                    add_special_tokens=add_special_tokens,
                    return_offsets_mapping=getattr(tokenizer, "is_fast", False))
    offsets = None
    if "offset_mapping" in enc:
        om, mask = enc.pop("offset_mapping").tolist(), enc["attention_mask"].tolist()
        offsets = [[tuple(span) for span, m in zip(row, mrow) if m] for row, mrow in zip(om, mask)]
    return enc, offsets, [len(ids) > max_length for ids in full]


def input_device(model: Any) -> torch.device:
    """Where a model's input ids go: its input embeddings' device (the first parameter's when it has none)."""
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
