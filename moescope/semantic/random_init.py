"""Randomly initialised copies of a model: the control of the semantic study.

A copy has the model's config and tokenizer and fresh weights drawn with ``torch.manual_seed(seed)``
(transformers' own initialisation of that architecture), saved as safetensors. Running the same
probe sentences through it shows what the probe design alone gives (similar contexts route
alike even in an untrained router); see :mod:`moescope.analysis.semantic_control`.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

__all__ = ["random_init_copy"]


def random_init_copy(source: str | None, seed: int, out: Path, load: Any) -> Path:
    """Write (or reuse) a randomly initialised copy of `source` (None: the built-in model) at `out`.

    `load` is a :class:`moescope.capture.loading.LoadOptions` (revision, remote code). The copy is
    written to a temporary sibling and renamed into place, so a directory at `out` is complete.
    Returns `out`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from moescope.capture.loading import default_model_path, load_config, load_tokenizer

    out = Path(out)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    name = str(source) if source is not None else str(default_model_path())
    config = load_config(name, load)
    tokenizer = load_tokenizer(name, load)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=load.trust_remote_code)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
