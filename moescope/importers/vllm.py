"""Import the routed experts that vLLM returns with ``--enable-return-routed-experts``.

**Engine responses** (``--model`` needed): a JSONL of responses exactly as vLLM returned
them, chat or completions form, any version with the output (see
:mod:`moescope.importers.responses` and docs/scale.md#importing-routing-from-serving-engines).

**moescope's older flat forms** (without ``--model``; the layer axis is the MoE layers, named
with --moe-layers):

- JSONL, one request per line: ``routed_experts`` ([tokens][MoE layers][k]), optionally
  ``prompt_routed_experts`` (vLLM 0.21's split form: the prompt's rows, then
  ``routed_experts``' rows), ``prompt_token_ids`` and ``output_token_ids`` (or
  ``token_ids``), and any scalar field (``prompt`` / ``text``, ``generated_text``,
  ``request_id``, ``label``, ...) kept as sequence columns;
- ``.npz``, one request per file, arrays with the same names (read without pickle);
- ``.npy``, one request per file: the routing array alone (no tokens table).

Row t of the routing is the token at position t of prompt + generated tokens; a row may be
missing for the last generated token (never fed to the model); a row of -1 (prefix-cache
hits in vLLM 0.21) gets no routes row. A directory is read as all its .jsonl / .npz / .npy
files in name order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moescope.errors import DataError
from moescope.importers.common import Request
from moescope.importers.engine_model import EngineModel
from moescope.importers.responses import is_response, read_jsonl, vllm_requests

SUFFIXES = (".jsonl", ".npz", ".npy")
ROUTING = ("routed_experts", "prompt_routed_experts")
TOKENS = ("prompt_token_ids", "output_token_ids", "token_ids")
TEXT = {"prompt": "text", "text": "text", "generated_text": "generated_text", "output_text": "generated_text"}


class VllmSource:
    """vLLM routed experts: engine responses (JSONL, needs the model) or the files of the
    module docstring."""

    name = "vllm"
    expert_ids = "logical"  # vLLM captures the router's choice before any EPLB mapping

    def __init__(self, inputs: list[str | Path], model: EngineModel | None = None) -> None:
        self.paths = _expand(inputs)
        self.model = model
        kinds = {p.suffix for p in self.paths}
        self.format = "+".join(sorted(k.lstrip(".") for k in kinds))

    def requests(self) -> Iterator[Request]:
        for path in self.paths:
            if path.suffix == ".jsonl":
                for where, obj in read_jsonl(path):
                    if is_response(obj):
                        if self.model is None:
                            raise DataError(f"{where}: a vLLM response; pass --model (the served model's directory "
                                            "or hub id) so its decoder layers can be told from its MoE layers")
                        yield from vllm_requests(where, obj, self.model)
                    else:
                        yield self._flat(where, obj)
            elif path.suffix == ".npz":
                yield self._with_model(_npz(path))
            else:
                yield self._with_model(_request(path.name, {"routed_experts": _load_npy(path)}))

    def _flat(self, where: str, obj: dict[str, Any]) -> Request:
        if "routed_experts" not in obj and "prompt_routed_experts" not in obj:
            raise DataError(f"{where}: no routed_experts and no 'choices' (was vLLM started with "
                            "--enable-return-routed-experts? save its responses as returned)")
        return self._with_model(_request(where, obj))

    def _with_model(self, req: Request) -> Request:
        """With --model, an array over every decoder layer keeps the MoE layers only."""
        if self.model is not None:
            req.experts = self.model.select_layers(req.where, req.experts)
        return req


def _expand(inputs: list[str | Path]) -> list[Path]:
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix in SUFFIXES)
            if not found:
                raise DataError(f"{item} holds no .jsonl, .npz or .npy files of vLLM routed experts")
            paths += found
        elif not item.exists():
            raise DataError(f"{item} does not exist")
        elif item.suffix not in SUFFIXES:
            raise DataError(f"{item}: expected .jsonl, .npz or .npy routed experts (see docs/scale.md)")
        else:
            paths.append(item)
    return paths


def _npz(path: Path) -> Request:
    try:
        with np.load(path, allow_pickle=False) as z:
            obj = {key: z[key] for key in z.files}
    except ValueError as exc:  # object arrays need pickle, which we never load
        raise DataError(f"{path}: {exc}; save plain numeric and string arrays (np.savez)") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from None
    for key, value in list(obj.items()):
        if key not in ROUTING + TOKENS and value.ndim == 0:
            obj[key] = value.item()  # 0-d arrays hold scalar metadata (a text, a request id)
    return _request(str(path), obj)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a numeric .npy array of routed experts ({exc})") from None


def _ids(where: str, name: str, value: Any, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value)
        if arr.size == 0:
            arr = arr.reshape((0,) * ndim) if arr.ndim != ndim else arr
        if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
            raise ValueError(f"values of type {arr.dtype}")
        arr = arr.astype(np.int64)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: {name} must be integers ({exc})") from None
    if arr.ndim != ndim:
        raise DataError(f"{where}: {name} has {arr.ndim} dimension(s), expected {ndim}")
    return arr


def _request(where: str, obj: dict[str, Any]) -> Request:
    if "routed_experts" not in obj:
        raise DataError(f"{where}: no routed_experts (was vLLM started with --enable-return-routed-experts?)")
    routing = _ids(where, "routed_experts", obj["routed_experts"], 3)
    n_prompt = None
    if "prompt_routed_experts" in obj:
        prompt = _ids(where, "prompt_routed_experts", obj["prompt_routed_experts"], 3)
        if len(routing) and prompt.shape[1:] != routing.shape[1:]:
            raise DataError(f"{where}: prompt_routed_experts {prompt.shape} and routed_experts {routing.shape} "
                            "differ in layers or k")
        n_prompt = len(prompt)
        routing = np.concatenate([prompt, routing]) if len(routing) else prompt
    token_ids = None
    if "prompt_token_ids" in obj:
        prompt_ids = _ids(where, "prompt_token_ids", obj["prompt_token_ids"], 1)
        output = obj.get("output_token_ids", obj.get("token_ids", []))
        out_ids = _ids(where, "output_token_ids", output, 1)
        if n_prompt is not None and n_prompt != len(prompt_ids):
            raise DataError(f"{where}: {n_prompt} rows of prompt_routed_experts for {len(prompt_ids)} prompt tokens")
        n_prompt = len(prompt_ids)
        token_ids = np.concatenate([prompt_ids, out_ids])
    metadata = {TEXT.get(k, k): _scalar(v) for k, v in obj.items() if k not in ROUTING + TOKENS}
    return Request(experts=routing, token_ids=token_ids, n_prompt=n_prompt if token_ids is not None else None,
                   metadata=metadata, where=where)


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
