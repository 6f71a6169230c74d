"""What makes two captures the same capture: weights, tokenizer, input and content options.

A trace's manifest keeps this identity field by field (``manifest["identity"]``) and its hash
(``manifest["fingerprint"]``). Resuming into a directory compares them, so a trace never mixes
two models, inputs or option sets, and a refusal names the field that differs.

The weights are identified by their content, not by the path they were loaded from (so
``./m``, ``./m/`` and ``/abs/m`` are the same model, and new weights at the same path are
not):

* parameters totalling at most :data:`FULL_HASH_BYTES`: SHA-256 of every parameter and
  buffer as loaded (names, dtypes, shapes and bytes), exact;
* larger models (hashing every byte would take minutes): SHA-256 of a strided sample of every
  tensor (names, dtypes, shapes and up to :data:`SAMPLE_VALUES` values each), plus, when the
  model came from files, each safetensors file's name, size, modification time and header
  (tensor names, dtypes, offsets), and, for hub models, the commit hash and the content hashes
  of the cached blobs.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FULL_HASH_BYTES = 1 << 30  # 1 GiB: about a second of SHA-256 on one core
SAMPLE_VALUES = 4096  # values per tensor in the sampled hash of larger models
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _tensors(model: Any) -> list[tuple[str, Any]]:
    """(name, tensor) of every parameter and buffer, tied tensors once, in a stable order."""
    seen: set[tuple[int, int]] = set()
    out = []
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        key = (tensor.data_ptr(), tensor.numel()) if tensor.numel() else (id(tensor), 0)
        if key in seen:
            continue
        seen.add(key)
        out.append((name, tensor))
    return out


def _tensor_bytes(tensor: Any) -> bytes:
    """The tensor's bytes as stored (any dtype, including bfloat16), on the host."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def parameters_digest(model: Any, *, sample: int | None = None) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes); with `sample`, of
    at most `sample` evenly strided values per tensor instead of all of them."""
    h = hashlib.sha256()
    for name, tensor in _tensors(model):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if sample is not None and tensor.numel() > sample:
            stride = tensor.numel() // sample
            tensor = tensor.detach().reshape(-1)[::stride][:sample]
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return f.read(min(size, 1 << 26))


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint files of a model directory (weights and their index), sorted."""
    return sorted(p for p in directory.iterdir()
                  if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"))


def files_digest(directory: Path) -> str:
    """SHA-256 over each checkpoint file's name, size, modification time and (safetensors)
    header; a hub cache blob is named by the SHA-256 of its content, which is used instead."""
    h = hashlib.sha256()
    for path in weight_files(directory):
        real = path.resolve()
        stat = real.stat()
        if len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
            h.update(f"{path.name}|blob:{real.name}|".encode())  # the hub's content address
            continue
        h.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        if path.suffix == ".safetensors":
            h.update(_safetensors_header(real))
    return h.hexdigest()


def model_directory(model: Any, name_or_path: str | None) -> Path | None:
    """The local directory the model's weights were read from: the path given, or the hub
    cache snapshot of its commit; None for a model built in memory."""
    if name_or_path and Path(name_or_path).is_dir():
        return Path(name_or_path).resolve()
    commit = getattr(model.config, "_commit_hash", None)
    if not name_or_path or not commit:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(name_or_path), "config.json", revision=commit)
    except Exception:
        return None
    return Path(found).parent if isinstance(found, str) else None


def weights_identity(model: Any, name_or_path: str | None = None) -> dict[str, Any]:
    """What identifies the loaded weights (see the module docstring): {"method", "digest", ...}."""
    size = sum(t.numel() * t.element_size() for _, t in _tensors(model))
    commit = getattr(model.config, "_commit_hash", None)
    out: dict[str, Any] = {"bytes": size}
    if commit and not (name_or_path and Path(name_or_path).is_dir()):
        out["commit"] = commit
    directory = model_directory(model, name_or_path)
    try:
        if size <= FULL_HASH_BYTES:
            out.update(method="sha256 of all parameters", digest=parameters_digest(model))
            return out
        out.update(method=f"sha256 of {SAMPLE_VALUES} sampled values per tensor",
                   digest=parameters_digest(model, sample=SAMPLE_VALUES))
    except (NotImplementedError, RuntimeError):  # weights offloaded to disk ("meta" tensors): files only
        out.update(method="checkpoint files only (parameters offloaded)", digest=None)
    if directory is not None and weight_files(directory):
        out["files"] = files_digest(directory)
    return out


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's vocabulary, merges and normalisation (SHA-256), and its padding side."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the padding / truncation state a previous call left on the backend.
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        text = json.dumps(state, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return {"vocab_size": len(tokenizer), "padding_side": getattr(tokenizer, "padding_side", None),
            "digest": hashlib.sha256((text + special).encode("utf-8")).hexdigest()}


def normalised_path(name: str | os.PathLike | None) -> str | None:
    """An absolute, normalised path for a local path (so `m`, `m/` and `/abs/m` agree); a hub
    id or None unchanged."""
    if name is None:
        return None
    path = Path(name)
    return str(path.resolve()) if path.exists() else str(name)
