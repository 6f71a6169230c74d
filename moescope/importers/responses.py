"""Responses of vLLM and SGLang, saved one JSON object a line exactly as the engine returned them.

What the engines return (read from their source; docs/scale.md#importing-routing-from-serving-engines cites the files):

vLLM (``--enable-return-routed-experts``; ``vllm/model_executor/layers/fused_moe/
routed_experts_capturer.py``, ``vllm/v1/core/sched/scheduler.py::_get_routed_experts``,
``vllm/outputs.py``): per completion one array ``[prompt + completion - 1, num_hidden_layers,
num_experts_per_tok]`` (int32 buffer; the last generated token is never fed to the model, so
it has no row; dense layers keep the buffer's zeros). Offline it is
``CompletionOutput.routed_experts``; the OpenAI server (0.22 and later) puts it on
``choices[i].routed_experts`` as base64 of ``np.save`` bytes (nested lists in some
versions). ``SamplingParams.routed_experts_prompt_start = s`` drops the first s rows. vLLM
0.21.x split it: ``prompt_routed_experts`` on the response (one row per prompt token, -1 for
prefix-cache hits) and the completion's rows on the choice.

SGLang (``--enable-return-routed-experts``, request ``return_routed_experts: true``;
``python/sglang/srt/layers/moe/routed_experts_capturer.py``, detokenizer_manager):
``meta_info["routed_experts"]`` is base64 of the raw int32 bytes of ``[seqlen - 1 -
routed_experts_start_len, num_hidden_layers, num_experts_per_tok]``, with no shape: it is
reshaped with the model's config. ``/generate`` lines carry ``output_ids`` and ``meta_info``
(``id``, ``prompt_tokens``, ``completion_tokens``); the prompt's ids are the request's
``input_ids``, saved in the same line. The OpenAI endpoints (serving_chat.py,
serving_completions.py) put the same string at the response level, ``sglext.routed_experts``,
for the first choice only (``choices[i].routed_experts`` is read too, where present).

Each completion (choice) becomes one sequence: prompt then completion tokens, phases
'prompt' / 'generated', the request id and choice index kept as sequence columns.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moescope.errors import DataError
from moescope.importers.common import Request
from moescope.importers.engine_model import EngineModel

_NPY_MAGIC = b"\x93NUMPY"
_OFFSET_KEYS = ("routed_experts_prompt_start", "routed_experts_start_len")


def is_response(obj: dict[str, Any]) -> bool:
    """Whether a JSONL object is an engine response (rather than moescope's older flat form)."""
    return "choices" in obj or "meta_info" in obj


def read_jsonl(path: Path, *, allow_lists: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for every non-blank line; DataError with the line number otherwise.
    With `allow_lists`, a line holding a list (SGLang's answer to a batch request) gives
    each of its objects."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            items = obj if allow_lists and isinstance(obj, list) else [obj]
            for j, item in enumerate(items):
                here = f"{where} item {j}" if items is obj else where
                if not isinstance(item, dict):
                    raise DataError(f"{here}: expected a JSON object (one engine response per line)")
                yield here, item


def decode_routing(where: str, value: Any, model: EngineModel, *, name: str = "routed_experts") -> np.ndarray:
    """An engine's routed-experts payload -> (rows, layers, k) int64 array.

    Accepts base64 of ``np.save`` bytes (vLLM), base64 of raw int32 (SGLang; reshaped with
    num_hidden_layers and num_experts_per_tok), nested lists, and ``{"data", "shape", "dtype"}``.
    """
    if value is None:
        raise DataError(f"{where}: {name} is null; start the engine with --enable-return-routed-experts "
                        "(SGLang: and send return_routed_experts=true)")
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise DataError(f"{where}: {name} is a string but not base64") from None
        if raw.startswith(_NPY_MAGIC):
            try:
                arr = np.load(io.BytesIO(raw), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise DataError(f"{where}: {name} holds a broken .npy payload ({exc})") from None
        else:
            arr = _raw(where, name, raw, np.int32, None, model)
    elif isinstance(value, dict) and "data" in value:
        arr = _raw(where, name, base64.b64decode(value["data"]), np.dtype(value.get("dtype") or "int32"),
                   value.get("shape"), model)
    elif isinstance(value, list):
        try:
            arr = np.asarray(value)
        except ValueError:
            raise DataError(f"{where}: {name} is a ragged list; expected [tokens][layers][top_k]") from None
        if arr.size == 0:
            arr = np.zeros((0, model.n_layers, model.top_k), np.int64)
    else:
        raise DataError(f"{where}: {name} is a {type(value).__name__}; expected base64 text or nested lists")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{where}: {name} holds {arr.dtype} values; expected integer expert ids")
    return model.select_layers(where, arr.astype(np.int64))


def _raw(where: str, name: str, raw: bytes, dtype: Any, shape: Any, model: EngineModel) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    width = model.n_layers * model.top_k
    if len(raw) % itemsize or (shape is None and (len(raw) // itemsize) % width):
        raise DataError(f"{where}: {name} has {len(raw)} bytes, not a whole number of "
                        f"[{model.n_layers} layers x {model.top_k}] int32 rows; is this the served model?")
    arr = np.frombuffer(raw, dtype=dtype)
    try:
        return arr.reshape(shape if shape is not None else (-1, model.n_layers, model.top_k))
    except ValueError:
        raise DataError(f"{where}: {name} holds {arr.size} ids, which do not fit the shape {shape}") from None


def _ints(where: str, name: str, value: Any) -> np.ndarray:
    if value is None:
        raise DataError(f"{where}: no {name}; save the token ids with each response (see docs/scale.md)")
    try:
        arr = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {name} must be a list of integer token ids") from None
    if arr.ndim != 1:
        raise DataError(f"{where}: {name} must be a flat list of token ids")
    return arr


def _offset(where: str, *objs: dict[str, Any]) -> int | None:
    for obj in objs:
        for key in _OFFSET_KEYS:
            if obj.get(key) is not None:
                value = obj[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise DataError(f"{where}: {key} must be a non-negative integer, not {value!r}")
                return value
    return None


def sequence(where: str, rows: np.ndarray, prompt: np.ndarray, output: np.ndarray, start: int | None,
             metadata: dict[str, Any]) -> Request:
    """One completion as a Request: rows cover positions [start, P + C - 1).

    Without an explicit offset, a shorter array is taken to start where the engine's
    contract puts it (the rows always end at the last fed token), with a warning.
    """
    n_fed = len(prompt) + len(output) - 1  # the last generated token is never fed
    if start is None:
        start = n_fed - len(rows)
        if start < 0:
            raise DataError(f"{where}: {len(rows)} routing rows for {len(prompt)} prompt + {len(output)} completion "
                            f"tokens; the engine returns at most {n_fed} (the last token is never fed)")
        if start:
            warnings.warn(f"{where}: routing starts at token {start} (a prompt offset); save "
                          "routed_experts_prompt_start with the response to state it")
    elif start + len(rows) != n_fed:
        raise DataError(f"{where}: {len(rows)} routing rows from offset {start} for {len(prompt)} prompt + "
                        f"{len(output)} completion tokens; expected {n_fed - start} (through the last fed token)")
    if start > len(prompt):
        raise DataError(f"{where}: routing offset {start} is past the prompt ({len(prompt)} tokens)")
    experts = np.concatenate([np.full((start, *rows.shape[1:]), -1, np.int64), rows]) if start else rows
    return Request(experts=_unrouted_as_missing(where, experts), token_ids=np.concatenate([prompt, output]),
                   n_prompt=len(prompt), metadata={**metadata, "routing_start": start}, where=where)


def _unrouted_as_missing(where: str, experts: np.ndarray) -> np.ndarray:
    """Rows whose k ids are all equal (k > 1) were never written by the engine (its buffers
    start as zeros): mark them -1 so they get no routes row instead of a fake route, and say so."""
    if experts.shape[2] < 2 or experts.size == 0:
        return experts
    blank = (experts == experts[:, :, :1]).all(axis=2) & (experts[:, :, 0] >= 0)
    if blank.any():
        warnings.warn(f"{where}: {int(blank.sum())} token-layer row(s) of an MoE layer hold {experts.shape[2]} equal "
                      "ids (an unwritten engine buffer); they are left out as not routed")
        experts = experts.copy()
        experts[blank] = -1
    return experts


# -- vLLM ------------------------------------------------------------------------------------

def vllm_requests(where: str, obj: dict[str, Any], model: EngineModel) -> Iterator[Request]:
    """The sequences of one vLLM response line (chat or completions form, any version)."""
    if "meta_info" in obj and "choices" not in obj:
        raise DataError(f"{where}: an SGLang /generate response (meta_info); import it with `moescope import sglang`")
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        raise DataError(f"{where}: 'choices' must be a non-empty list of completions")
    split_prompt = obj.get("prompt_routed_experts")  # vLLM 0.21.x only
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise DataError(f"{where}: choices[{i}] is not an object")
        here = f"{where} choice {choice.get('index', i)}"
        prompt = _ints(here, "prompt_token_ids", choice.get("prompt_token_ids", obj.get("prompt_token_ids")))
        output = _ints(here, "token_ids", choice.get("token_ids", choice.get("output_token_ids")))
        meta = {"request_id": obj.get("id", obj.get("request_id")), "choice_index": choice.get("index", i),
                "finish_reason": choice.get("finish_reason"), "generated_text": _completion_text(choice)}
        start = _offset(here, choice, obj)
        if split_prompt is not None:
            prompt_rows = decode_routing(here, split_prompt, model, name="prompt_routed_experts")
            rows = decode_routing(here, choice.get("routed_experts"), model)
            if len(prompt_rows) + (start or 0) != len(prompt):
                raise DataError(f"{here}: {len(prompt_rows)} rows of prompt_routed_experts for {len(prompt)} prompt "
                                f"tokens (offset {start or 0})")
            if len(rows) != max(len(output) - 1, 0):
                raise DataError(f"{here}: {len(rows)} rows of routed_experts for {len(output)} completion tokens; "
                                f"vLLM 0.21 returns {max(len(output) - 1, 0)} (the last token is never fed)")
            rows = np.concatenate([prompt_rows, rows])
            start = start or 0
        else:
            rows = decode_routing(here, choice.get("routed_experts"), model)
        yield sequence(here, rows, prompt, output, start, meta)


def _completion_text(choice: dict[str, Any]) -> str | None:
    message = choice.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return message["content"]
    return choice.get("text") if isinstance(choice.get("text"), str) else None


# -- SGLang ----------------------------------------------------------------------------------

def sglang_requests(where: str, obj: dict[str, Any], model: EngineModel) -> Iterator[Request]:
    """The sequences of one SGLang response line: /generate (``meta_info``; a list for a
    batch request) or the OpenAI endpoints (``choices``)."""
    if "choices" in obj:
        yield from _sglang_openai(where, obj, model)
        return
    meta = obj.get("meta_info")
    if not isinstance(meta, dict):
        raise DataError(f"{where}: no meta_info object; expected a /generate response "
                        '{"input_ids", "output_ids", "meta_info": {...}}')
    prompt = _ints(where, "input_ids (the request's, saved with the response)", obj.get("input_ids"))
    output = _ints(where, "output_ids", obj.get("output_ids"))
    _check_counts(where, meta, prompt, output)
    rows = decode_routing(where, meta.get("routed_experts"), model)
    info = {"request_id": meta.get("id"), "choice_index": obj.get("index", 0),
            "finish_reason": _finish(meta.get("finish_reason")), "generated_text": obj.get("text")}
    yield sequence(where, rows, prompt, output, _offset(where, meta, obj), info)


def _sglang_openai(where: str, obj: dict[str, Any], model: EngineModel) -> Iterator[Request]:
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        raise DataError(f"{where}: 'choices' must be a non-empty list of completions")
    for i, choice in enumerate(choices):
        here = f"{where} choice {choice.get('index', i) if isinstance(choice, dict) else i}"
        if not isinstance(choice, dict):
            raise DataError(f"{here}: not an object")
        prompt = _ints(here, "input_ids / prompt_token_ids (the request's, saved with the response)",
                       obj.get("input_ids", obj.get("prompt_token_ids", choice.get("prompt_token_ids"))))
        output = _ints(here, "token_ids / output_ids of the choice",
                       choice.get("token_ids", choice.get("output_ids", obj.get("output_ids"))))
        payload = choice.get("routed_experts")
        if payload is None and isinstance(obj.get("sglext"), dict):
            # serving_chat / serving_completions put the FIRST choice's routing on the response
            # (sglext.routed_experts, from ret[0]); later choices of n > 1 have none
            if i > 0:
                warnings.warn(f"{here}: SGLang's OpenAI endpoints return routing for the first choice only; "
                              "this choice is skipped (use /generate for n > 1)")
                continue
            payload = obj["sglext"].get("routed_experts")
        rows = decode_routing(here, payload, model)
        meta = {"request_id": obj.get("id"), "choice_index": choice.get("index", i),
                "finish_reason": _finish(choice.get("finish_reason")), "generated_text": _completion_text(choice)}
        yield sequence(here, rows, prompt, output, _offset(here, choice, obj), meta)


def _check_counts(where: str, meta: dict[str, Any], prompt: np.ndarray, output: np.ndarray) -> None:
    for key, ids in (("prompt_tokens", prompt), ("completion_tokens", output)):
        if meta.get(key) is not None and int(meta[key]) != len(ids):
            raise DataError(f"{where}: meta_info.{key} is {meta[key]} but {len(ids)} token ids were saved; "
                            "save the request's input_ids and the response's output_ids unchanged")


def _finish(value: Any) -> Any:
    return value.get("type") if isinstance(value, dict) else value
