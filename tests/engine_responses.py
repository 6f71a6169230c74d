"""Engine-shaped responses for the importer tests, written as each engine's code writes them.

Which engine code each writer follows (vLLM-project/vllm and sgl-project/sglang, main as of
2026; vLLM 0.21.x for the split form):

- :func:`engine_array`: the capture buffers, ``vllm/model_executor/layers/fused_moe/
  routed_experts_capturer.py`` (and SGLang's ``srt/layers/moe/routed_experts_capturer.py``):
  int32 ``[tokens, num_hidden_layers, num_experts_per_tok]``, zeros where nothing wrote
  (dense layers); ``vllm/v1/core/sched/scheduler.py::_get_routed_experts`` returns
  ``request.num_tokens - 1`` rows (the last generated token is never fed).
- :func:`vllm_line`: the OpenAI server (``vllm/entrypoints/openai/chat_completion/protocol.py``,
  ``completion/protocol.py``, 0.22+): ``choices[i].routed_experts`` as base64 of ``np.save``
  bytes ("shape (num_tokens - 1, num_layers, num_experts_per_tok), dtype uint8/uint16" in the
  newest protocol comment), or nested lists (``.tolist()``, older servers and the offline ``CompletionOutput``);
  chat puts ``prompt_token_ids`` on the response, completions on each choice.
- :func:`vllm_split_line`: vLLM 0.21.x, ``RequestOutput.prompt_routed_experts`` (int16, one row
  per prompt token, -1 at prefix-cache hits) plus the completion's rows on the choice.
- :func:`sglang_generate_line`: SGLang ``/generate`` with ``return_routed_experts`` —
  ``meta_info.routed_experts`` = base64 of the raw int32 bytes of
  ``[seqlen - 1 - routed_experts_start_len, num_hidden_layers, k]`` (detokenizer_manager
  ``_extract_routed_experts``; ``extract_routed_experts_from_meta_info`` decodes it with
  ``np.frombuffer(..., np.int32)``), ``meta_info.id``, ``prompt_tokens``, ``completion_tokens``;
  ``input_ids`` is the request's, saved by the client with the response.
"""
from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np


def b64_npy(arr: np.ndarray) -> str:
    """vLLM server encoding: base64 of np.save bytes."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def b64_raw_int32(arr: np.ndarray) -> str:
    """SGLang encoding: base64 of the flat int32 bytes (no shape)."""
    return base64.b64encode(np.ascontiguousarray(arr, dtype=np.int32).tobytes()).decode("ascii")


def engine_array(moe_rows: np.ndarray, n_layers: int, moe_layers: list[int]) -> np.ndarray:
    """(T, len(moe_layers), k) routing -> the engine buffer (T, n_layers, k) int32, dense layers 0."""
    out = np.zeros((moe_rows.shape[0], n_layers, moe_rows.shape[2]), np.int32)
    out[:, moe_layers, :] = moe_rows
    return out


def trace_sequences(trace: Any) -> list[dict[str, Any]]:
    """Per sequence of a captured trace: prompt / completion ids and the (N, MoE layers, k) routing."""
    layers = trace.moe_layers
    index = {layer: i for i, layer in enumerate(layers)}
    toks = trace.rows("SELECT seq_id, pos, token_id, phase FROM tokens ORDER BY seq_id, pos")
    routes = trace.rows("SELECT seq_id, pos, layer, experts FROM routes")
    seqs: dict[int, dict[str, Any]] = {}
    for s, _p, t, ph in toks:
        seqs.setdefault(s, {"prompt": [], "output": []})["prompt" if ph == "prompt" else "output"].append(int(t))
    for s, d in seqs.items():
        d["routing"] = np.full((len(d["prompt"]) + len(d["output"]), len(layers), trace.top_k), -1, np.int64)
    for s, p, layer, e in routes:
        seqs[s]["routing"][p, index[layer], :len(e)] = e
    return [seqs[s] for s in sorted(seqs)]


def vllm_line(rid: str, prompt: list[int], choices: list[tuple[list[int], np.ndarray]], *, form: str = "chat",
              encoding: str = "npy", prompt_start: int | None = None, dtype: Any = np.int32) -> dict[str, Any]:
    """A vLLM response. choices: (completion ids, engine array over all layers incl. the last token's row,
    cut here to num_tokens - 1 rows and from prompt_start). Newer servers compact the ids to
    uint8 / uint16 before np.save (``# dtype uint8/uint16`` on ``routed_experts`` in the protocol)."""
    out_choices = []
    for i, (output, full) in enumerate(choices):
        rows = full[: len(prompt) + len(output) - 1][prompt_start or 0:].astype(dtype)
        payload = b64_npy(rows) if encoding == "npy" else rows.tolist()
        choice = {"index": i, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                  "token_ids": output, "routed_experts": payload}
        if form == "chat":
            choice["message"] = {"role": "assistant", "content": "x"}
        else:
            choice.update(text="x", prompt_token_ids=prompt)
        out_choices.append(choice)
    line = {"id": rid, "object": "chat.completion" if form == "chat" else "text_completion", "model": "m",
            "choices": out_choices, "usage": {"prompt_tokens": len(prompt)}}
    if form == "chat":
        line["prompt_token_ids"] = prompt
    if prompt_start is not None:
        line["routed_experts_prompt_start"] = prompt_start  # the request's sampling param, saved with it
    return line


def vllm_split_line(rid: str, prompt: list[int], output: list[int], full: np.ndarray, cached: int = 0) -> dict[str, Any]:
    """vLLM 0.21.x: prompt_routed_experts (int16, -1 at the first `cached` prefix-cache hits) + the completion's rows."""
    prompt_rows = full[: len(prompt)].astype(np.int16)
    prompt_rows[:cached] = -1
    completion_rows = full[len(prompt): len(prompt) + len(output) - 1].astype(np.int16)
    return {"id": rid, "prompt_token_ids": prompt, "prompt_routed_experts": prompt_rows.tolist(),
            "choices": [{"index": 0, "token_ids": output, "routed_experts": completion_rows.tolist(),
                         "finish_reason": "length"}]}


def sglang_generate_line(rid: str, prompt: list[int], output: list[int], full: np.ndarray,
                         start_len: int = 0) -> dict[str, Any]:
    """SGLang /generate response (+ the request's input_ids)."""
    rows = full[start_len: len(prompt) + len(output) - 1]
    meta = {"id": rid, "finish_reason": {"type": "length", "length": len(output)}, "prompt_tokens": len(prompt),
            "completion_tokens": len(output), "cached_tokens": 0, "routed_experts": b64_raw_int32(rows)}
    if start_len:
        meta["routed_experts_start_len"] = start_len
    return {"text": "x", "output_ids": output, "meta_info": meta, "input_ids": prompt}
