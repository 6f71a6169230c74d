"""Import the dumps of SGLang's expert distribution recorder.

SGLang (``--expert-distribution-recorder-mode per_token``; ``POST /start_expert_distribution_record``,
then ``/stop_expert_distribution_record`` and ``/dump_expert_distribution_record``) writes
``expert_distribution_recorder_<time>_<rank>.pt`` into ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``
with ``torch.save``: a dict

- ``records``: one dict per forward pass, with ``forward_pass_id``, ``rank``,
  ``input_ids`` (the N tokens fed in), ``positions`` (N, each token's position in its
  request), ``extend_seq_lens`` (tokens per request in a prefill / extend pass; None in
  decode passes, where every token is a different request), ``forward_mode`` and
  ``topk_ids_of_layer``: an int tensor (decoder layers, N, 8) of *physical* expert ids,
  -1 where nothing was routed (dense layers, unused columns when k < 8);
- ``last_physical_to_logical_map``: (decoder layers, physical experts) logical expert id
  of each physical slot (EPLB may replicate experts).

moescope maps physical ids to logical ones, keeps the layers where anything was routed
(or --moe-layers), and takes k as the widest row. The dump carries no request ids (SGLang
marks them as to do), so a request cannot be followed across passes: each request segment
of a prefill pass becomes one sequence (phase 'prompt'; a chunked prefill gives one
sequence per chunk) and each token of a decode pass one sequence of one token (phase
'generated'), ``pos`` keeping SGLang's position, with ``forward_pass_id``, ``rank`` and
``segment`` as sequence columns. Under plain tensor parallelism every rank records the same
passes: give one rank's file (identical passes from several files are read once).

Only ``per_token`` dumps hold per-token routing. ``stat`` / ``stat_approx`` dumps
(``logical_count``: counts per layer and expert) and ``per_pass`` dumps (counts per pass)
are refused: counts cannot become a trace. Files are read with
``torch.load(weights_only=True)``: no pickled code is ever run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moescope.errors import DataError
from moescope.importers.common import Request
from moescope.importers.engine_model import EngineModel
from moescope.importers.responses import read_jsonl, sglang_requests

SUFFIXES = (".pt",)
RESPONSE_SUFFIXES = (".jsonl", ".json")
# sglang/srt/model_executor/forward_batch_info.py: ForwardMode (IntEnum, auto() from 1)
EXTEND, DECODE, MIXED = 1, 2, 3


class SglangSource:
    """SGLang routing: responses saved as JSONL (``/generate`` or OpenAI endpoints, with
    ``--enable-return-routed-experts``; needs the model) or expert-distribution dumps
    (per_token mode, .pt), files or directories of them."""

    name = "sglang"

    def __init__(self, inputs: list[str | Path], model: EngineModel | None = None) -> None:
        self.model = model
        self.paths: list[Path] = []
        for item in map(Path, inputs):
            if item.is_dir():
                self.paths += sorted(p for p in item.iterdir() if p.suffix in SUFFIXES + RESPONSE_SUFFIXES)
            elif not item.exists():
                raise DataError(f"{item} does not exist")
            elif item.suffix not in SUFFIXES + RESPONSE_SUFFIXES:
                raise DataError(f"{item}: expected SGLang responses (.jsonl / .json) or recorder dumps (.pt)")
            else:
                self.paths.append(item)
        if not self.paths:
            raise DataError(f"no .jsonl, .json or .pt files in {', '.join(map(str, inputs))}")
        kinds = {p.suffix in SUFFIXES for p in self.paths}
        if len(kinds) > 1:
            raise DataError("give either SGLang responses (.jsonl / .json) or recorder dumps (.pt), not both")
        self.responses = kinds == {False}
        if self.responses and model is None:
            raise DataError("SGLang responses carry no shape: pass --model (the served model's directory or hub id) "
                            "for its num_hidden_layers, num_experts_per_tok and MoE layers")
        self.format = "sglang-responses" if self.responses else "sglang-expert-distribution-per-token"
        self.expert_ids = "logical"  # responses: logical ids; dumps: mapped below, else refused when replicated

    def requests(self) -> Iterator[Request]:
        if self.responses:
            for path in self.paths:
                for where, obj in _response_objects(path):
                    yield from sglang_requests(where, obj, self.model)
            return
        seen: set[bytes] = set()
        for path in self.paths:
            dump = load_dump(path)
            mapping = _mapping(path, dump)
            if mapping is None:
                self.expert_ids = "physical"
            for i, record in enumerate(dump["records"]):
                where = f"{path} record {i}"
                ids, positions, topk = _record_arrays(where, record)
                key = hashlib.sha256(b"|".join([str(record.get("forward_pass_id")).encode(), ids.tobytes(),
                                                positions.tobytes()])).digest()
                if key in seen:  # the same pass recorded by another tensor-parallel rank
                    continue
                seen.add(key)
                if mapping is not None:
                    topk = _to_logical(where, topk, mapping)
                yield from _segments(where, record, ids, positions, topk)


def load_dump(path: Path) -> dict[str, Any]:
    """The dump's dict, loaded without unpickling code; DataError for other modes and files."""
    import pickle

    import torch

    try:
        dump = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path} holds objects that only a full unpickler can load, which could run code; "
                        "moescope reads SGLang dumps with weights_only=True only") from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise DataError(f"{path} is not a readable torch .pt dump ({str(exc).splitlines()[0]})") from exc
    if not isinstance(dump, dict):
        raise DataError(f"{path} is not an SGLang expert distribution dump (a dict)")
    if "logical_count" in dump:
        raise DataError(f"{path} is a 'stat' dump (expert counts per layer, no per-token routing); restart SGLang "
                        "with --expert-distribution-recorder-mode per_token and dump again")
    records = dump.get("records")
    if not isinstance(records, list):
        raise DataError(f"{path} has no 'records' list; is it an SGLang expert distribution dump?")
    if records and "topk_ids_of_layer" not in records[0]:
        raise DataError(f"{path} is a 'per_pass' dump (expert counts per pass, no per-token routing); "
                        "use --expert-distribution-recorder-mode per_token")
    return dump


def _mapping(path: Path, dump: dict[str, Any]) -> np.ndarray | None:
    m = dump.get("last_physical_to_logical_map")
    if m is None:
        return None
    arr = np.asarray(m.numpy() if hasattr(m, "numpy") else m, dtype=np.int64)
    if arr.ndim != 2:
        raise DataError(f"{path}: last_physical_to_logical_map has shape {arr.shape}; expected (layers, physical experts)")
    return arr


def _record_arrays(where: str, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        ids = np.asarray(record["input_ids"], np.int64)
        positions = np.asarray(record["positions"], np.int64)
        topk = record["topk_ids_of_layer"]
        topk = np.asarray(topk.numpy() if hasattr(topk, "numpy") else topk, np.int64)
    except KeyError as exc:
        raise DataError(f"{where}: missing field {exc}") from None
    if topk.ndim != 3 or topk.shape[1] != len(ids) or len(positions) != len(ids):
        raise DataError(f"{where}: topk_ids_of_layer {topk.shape} does not match {len(ids)} input_ids "
                        f"and {len(positions)} positions")
    return ids, positions, topk


def _to_logical(where: str, topk: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    if mapping.shape[0] != topk.shape[0] or topk.max(initial=-1) >= mapping.shape[1]:
        raise DataError(f"{where}: physical expert ids do not fit last_physical_to_logical_map {mapping.shape}")
    layer = np.arange(topk.shape[0])[:, None, None]
    return np.where(topk >= 0, mapping[layer, np.maximum(topk, 0)], -1)


def _segments(where: str, record: dict[str, Any], ids: np.ndarray, positions: np.ndarray,
              topk: np.ndarray) -> Iterator[Request]:
    """One Request per request segment of the pass: prefill segments by extend_seq_lens,
    decode passes (no extend_seq_lens) one token each."""
    lens = record.get("extend_seq_lens")
    if lens is not None and hasattr(lens, "tolist"):
        lens = lens.tolist()
    mode = _int(record.get("forward_mode"))
    if mode is not None and mode not in (EXTEND, DECODE, MIXED):
        raise DataError(f"{where}: forward_mode {mode} (speculative or idle pass); record with speculative "
                        "decoding off: draft and verify passes route tokens that may never be accepted")
    decode = mode == DECODE or not lens
    if decode:
        lens = [1] * len(ids)
    if sum(lens) != len(ids):
        raise DataError(f"{where}: extend_seq_lens sum to {sum(lens)} but the pass has {len(ids)} tokens")
    phases = ["generated" if decode else "prompt"] * len(lens)
    if mode == MIXED:  # SGLang appends the running decode requests after the prefill chunks, one token each
        for i in range(len(lens) - 1, -1, -1):
            if lens[i] != 1:
                break
            phases[i] = "generated"
    routing = topk.transpose(1, 0, 2)  # (N, layers, 8)
    meta = {"forward_pass_id": _int(record.get("forward_pass_id")), "rank": _int(record.get("rank")),
            "forward_mode": mode}
    start = 0
    for segment, n in enumerate(lens):
        sl = slice(start, start + n)
        yield Request(experts=routing[sl], token_ids=ids[sl], positions=positions[sl],
                      phase=phases[segment], metadata={**meta, "segment": segment},
                      where=f"{where} segment {segment}")
        start += n


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _response_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The response objects of a .jsonl (one a line; a batch /generate line is a list) or .json file."""
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        items = obj if isinstance(obj, list) else [obj]
        for j, item in enumerate(items):
            if not isinstance(item, dict):
                raise DataError(f"{path} item {j}: expected a response object")
            yield (f"{path} item {j}" if isinstance(obj, list) else str(path)), item
        return
    yield from read_jsonl(path, allow_lists=True)
