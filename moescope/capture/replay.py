"""Replay: run a model in transformers over exactly the token ids of an existing trace.

    moescope capture --replay runs/served --model Qwen/Qwen3-30B-A3B --out runs/replay

Typical use: a trace imported from a serving engine (vLLM, SGLang) is replayed so that every
token the engine routed has a transformers counterpart, and ``moescope analyze agreement``
compares the two. Each sequence (prompt and generated tokens, in order) goes through the
model in one teacher-forced forward pass. For a causal model this computes, at every
position, exactly what ``generate()`` computes when it produces the same tokens: each
token's hidden state depends only on the tokens before it, and a KV cache is an
optimisation of that same computation (numerically it may differ in the last bits, as any
change of kernel or batch shape may). Tokens keep their source phase ('prompt' or
'generated'); sequence ids and sequence columns are the source's, so the two traces align
on (seq_id, pos) and, more robustly, on their token ids.
"""
from __future__ import annotations

import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

import moescope
from moescope.capture.assemble import TokenTexts, assemble_group
from moescope.capture.dataset import input_device
from moescope.capture.identity import weights_identity
from moescope.capture.loading import describe_model
from moescope.capture.recorder import CaptureOptions, Recorder
from moescope.errors import DataError
from moescope.store.manifest import fingerprint
from moescope.store.reader import open_trace
from moescope.store.writer import DEFAULT_SHARD_ROWS, TraceWriter


@dataclass(frozen=True)
class ReplaySequence:
    """One source sequence: its id, token ids (positions 0..N-1), phases and metadata."""

    seq_id: int
    token_ids: np.ndarray
    phases: np.ndarray
    text: str | None
    metadata: dict[str, Any]


def source_sequences(path: str | Path) -> tuple[list[ReplaySequence], dict[str, Any]]:
    """The sequences of the trace at `path` in seq_id order, and its manifest.

    DataError when the trace has no tokens table (token ids are what is replayed) or a
    sequence lacks the tokens before its first position (a recorder dump's decode step:
    without its prefix, the model would see a different context).
    """
    trace = open_trace(path)
    if not trace.has("tokens"):
        raise DataError(f"{path} has no tokens table: a replay needs the token ids (import them with the routing)")
    tokens = trace.table("tokens", ["seq_id", "pos", "token_id", "phase"])
    tokens = tokens.take(pc.sort_indices(tokens, [("seq_id", "ascending"), ("pos", "ascending")]))
    seq = tokens.column("seq_id").to_numpy()
    pos = tokens.column("pos").to_numpy().astype(np.int64)
    ids = tokens.column("token_id").to_numpy()
    phase = np.asarray(tokens.column("phase").to_pylist(), dtype=object)
    meta = _sequence_rows(trace)
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    ends = np.r_[starts[1:], len(seq)]
    out = []
    for a, b in zip(starts, ends):
        sid = int(seq[a])
        if not np.array_equal(pos[a:b], np.arange(b - a)):
            raise DataError(f"{path}: sequence {sid} does not hold positions 0..{b - a - 1} in full (it starts at "
                            f"{pos[a]}); a replay needs every token before the ones it compares")
        row = meta.get(sid, {})
        out.append(ReplaySequence(sid, ids[a:b].astype(np.int64), phase[a:b], row.pop("text", None), row))
    return out, trace.manifest


def _sequence_rows(trace: Any) -> dict[int, dict[str, Any]]:
    rows = trace.table("sequences").to_pylist()
    return {int(r.pop("seq_id")): {k: v for k, v in r.items() if k != "generated_text"} for r in rows}


def _batches(seqs: list[ReplaySequence], pending: list[tuple[int, int]], size: int) -> Iterator[tuple[int, list]]:
    """(index of the first sequence, sequences) of at most `size`, within the pending ranges."""
    for start, end in pending:
        for a in range(start, end, size):
            yield a, seqs[a:min(a + size, end)]


def replay_trace(
    model: Any,
    tokenizer: Any,
    source: str | Path,
    out: str | Path,
    *,
    options: CaptureOptions | None = None,
    batch_size: int = 8,
    model_name: str | None = None,
    overwrite: bool = False,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Record `model`'s routing over the token ids of the trace `source` into `out`.

    Returns the finished manifest (resumable like a capture). Every source sequence is one
    row of a right-padded batch; padding is masked and never recorded.
    """
    options = options or CaptureOptions()
    seqs, src_manifest = source_sequences(source)
    if not seqs:
        raise DataError(f"{source} holds no tokens to replay")
    vocab = int(getattr(model.get_input_embeddings(), "num_embeddings", 0) or 0)
    top = max(int(s.token_ids.max(initial=0)) for s in seqs)
    if vocab and top >= vocab:
        raise DataError(f"{source} has token id {top} but the model's vocabulary has {vocab}; is it the same model?")
    longest = max(len(s.token_ids) for s in seqs)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and longest > context:
        raise DataError(f"{source} has a sequence of {longest} tokens but the model's context is {context}; "
                        "is it the same model?")
    name = model_name or getattr(model, "name_or_path", None) or model.config._name_or_path
    model_info = describe_model(model, name)
    model_info["weights"] = weights_identity(model, name)  # a resume must use the same weights, by content
    source_info = {"path": str(source), "fingerprint": src_manifest.get("fingerprint"),
                   "mode": src_manifest.get("capture", {}).get("mode"),
                   "source": src_manifest.get("capture", {}).get("source")}
    content = {"mode": "replay", "teacher_forced": True, **{f"option_{k}": v for k, v in asdict(options).items()}}
    header = {
        "moescope_version": moescope.__version__,
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "model": model_info,
        "capture": {**content, "has_weights": True, "expert_ids": "logical", "replay_of": source_info,
                    "batch_size": batch_size},
        "input": {"paths": [str(source)], "format": "moescope-trace", "n_records": len(seqs)},
    }
    # What the recorded content depends on: the weights' content, the source's tokens and the
    # options; not paths nor the batch size (a resume may change it).
    header["identity"] = {
        "model": {k: v for k, v in model_info.items() if k not in ("name_or_path", "revision")},
        "input": {"source_fingerprint": source_info["fingerprint"], "n_records": len(seqs)},
        "capture": content,
    }
    fp = fingerprint(header["identity"])
    with TraceWriter(out, header, fp, shard_rows=shard_rows, overwrite=overwrite) as writer:  # releases its lock
        if writer.complete:
            return writer.manifest
        _replay_into(writer, model, tokenizer, seqs, options, batch_size, progress)
        return writer.finish()


def _replay_into(writer: TraceWriter, model: Any, tokenizer: Any, seqs: list[ReplaySequence],
                 options: CaptureOptions, batch_size: int, progress: Callable[[int, int, int], None] | None) -> None:
    """Run the pending sequences through the model and add their tables to `writer`."""
    recorder = Recorder(model, tokenizer=tokenizer, options=options)
    texts = TokenTexts(tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    device = input_device(model)
    total, n_tokens = len(seqs), 0

    def write(groups: list, batch: list[ReplaySequence], first: int) -> None:
        tables = _assemble(groups, recorder, texts, batch)
        writer.add(tables, input_end=first + len(batch), n_sequences=len(batch), input_start=first)

    pending = writer.pending(total)
    done = total - sum(b - a for a, b in pending)
    futures: list = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moescope-writer") as pool, recorder, \
            torch.inference_mode():
        for first, batch in _batches(seqs, pending, batch_size):
            width = max(len(s.token_ids) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, s in enumerate(batch):
                ids[r, :len(s.token_ids)] = torch.from_numpy(s.token_ids)
                mask[r, :len(s.token_ids)] = 1
            recorder.expect([s.seq_id for s in batch], texts=[s.text or "" for s in batch],
                            metadata=[s.metadata for s in batch] if any(s.metadata for s in batch) else None)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            groups = recorder.take()
            while len(futures) >= 2:  # two batches in flight at most: bounded memory
                futures.pop(0).result()
            futures.append(pool.submit(write, groups, batch, first))
            done += len(batch)
            n_tokens += int(mask.sum())
            if progress:
                progress(done, total, n_tokens)
        for fut in futures:
            fut.result()


def _assemble(groups: list, recorder: Recorder, texts: TokenTexts, batch: list[ReplaySequence]) -> dict[str, pa.Table]:
    """The recorded tables, with each token's phase taken from the source trace."""
    parts: dict[str, list] = {}
    for group in groups:
        for key, table in assemble_group(group, recorder, texts).items():
            if table is not None:
                parts.setdefault(key, []).append(table)
    tables = {k: pa.concat_tables(v, promote_options="default") for k, v in parts.items()}
    tok = tables["tokens"]
    lookup = {s.seq_id: s.phases for s in batch}
    seq = tok.column("seq_id").to_numpy()
    pos = tok.column("pos").to_numpy().astype(np.int64)
    phases = [lookup[int(s)][p] for s, p in zip(seq, pos)]
    tables["tokens"] = tok.set_column(tok.schema.get_field_index("phase"), "phase", pa.array(phases, pa.string()))
    return tables
