"""Load a model and tokenizer safely: safetensors only, no remote code, unless asked.

The built-in default model loads through exactly this path, like any user's model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError, UnsupportedModelError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "default_model"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model.

    Attributes:
        device: "cpu", "cuda", "cuda:1", "mps", or "auto" (spread over devices with device_map).
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        revision: hub revision (branch, tag or commit).
        trust_remote_code: run the model repository's own Python code (only if you trust it).
        allow_pickle: accept pickle (.bin/.pt) checkpoints, which can run code when loaded.
    """

    device: str = "cpu"
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False


def default_model_path() -> Path:
    """The built-in default model's directory (trained by `moescope train`, see docs/default-model.md)."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise MoescopeError(
            f"the built-in default model is missing from {DEFAULT_MODEL_DIR}; reinstall moescope or pass --model"
        )
    return DEFAULT_MODEL_DIR


def _check_local_weights(path: Path, allow_pickle: bool) -> None:
    has_safetensors = any(path.glob("*.safetensors"))
    pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if has_safetensors:
        return
    if pickled and not allow_pickle:
        raise MoescopeError(
            f"{path} holds only pickle weights ({pickled[0]}), which can run arbitrary code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust their source"
        )
    if not pickled:
        raise MoescopeError(f"{path} has no model weights (*.safetensors); is this a model directory?")


def load_config(name_or_path: str, options: LoadOptions) -> Any:
    """The model's transformers config, with a one-line error for the usual failures."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            name_or_path, revision=options.revision, trust_remote_code=options.trust_remote_code
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise MoescopeError(
                f"{name_or_path} needs its own Python code to load; pass --trust-remote-code if you trust it"
            ) from exc
        if "Unrecognized model" in str(exc) or "does not recognize this architecture" in str(exc):
            raise UnsupportedModelError(
                f"transformers does not know the architecture of {name_or_path}; upgrade transformers or "
                "pass --trust-remote-code if the repository ships its own code"
            ) from exc
        raise MoescopeError(f"cannot load the config of {name_or_path}: {exc}") from exc
    except OSError as exc:
        raise MoescopeError(
            f"cannot find a model at {name_or_path!r} (not a local directory with config.json, and not reachable "
            "on the hub); check the path or hub id"
        ) from exc


def load_model(name_or_path: str | Path | None, options: LoadOptions | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a local directory or hub id; None means the default model.

    The tokenizer is ready for batched generation: it has a padding token (EOS when it had
    none) and pads on the left (decoder-only models)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from moescope.adapters.registry import family_for_config

    options = options or LoadOptions()
    if options.dtype not in DTYPES:
        raise MoescopeError(f"--dtype must be one of {', '.join(DTYPES)}, not {options.dtype!r}")
    name = str(name_or_path) if name_or_path is not None else str(default_model_path())
    local = Path(name)
    if local.exists():
        if not local.is_dir():
            raise MoescopeError(f"--model {name} is a file; pass the model's directory (with config.json)")
        _check_local_weights(local, options.allow_pickle)
    config = load_config(name, options)
    family_for_config(config)  # refuse unsupported or dense models before loading weights

    kwargs: dict[str, Any] = dict(
        revision=options.revision,
        trust_remote_code=options.trust_remote_code,
        use_safetensors=None if options.allow_pickle else True,
        dtype="auto" if options.dtype == "auto" else getattr(torch, options.dtype),
    )
    if options.device == "auto":
        kwargs["device_map"] = "auto"
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(name, **kwargs)
    except (OSError, EnvironmentError) as exc:
        if "safetensors" in str(exc).lower():
            raise MoescopeError(
                f"{name} has no safetensors weights; pass --allow-pickle to accept pickle weights if you trust them"
            ) from exc
        raise MoescopeError(f"cannot load {name}: {exc}") from exc
    if options.device != "auto":
        try:
            model.to(options.device)
        except (RuntimeError, AssertionError) as exc:
            raise MoescopeError(f"cannot move the model to device {options.device!r}: {exc}") from exc
    model.eval()
    tokenizer = load_tokenizer(name, options)
    if not getattr(config, "is_encoder_decoder", False):
        # Ready for batched generate(): prompts must end aligned, so pad on the left.
        # moescope counts positions from the attention mask, whichever side pads.
        tokenizer.padding_side = "left"
    return model, tokenizer


def load_tokenizer(name: str, options: LoadOptions) -> Any:
    """The model's tokenizer, with a padding token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, revision=options.revision, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MoescopeError(f"cannot load the tokenizer of {name}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def describe_model(model: Any, name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The manifest's `model` section for a loaded model."""
    from moescope.adapters.base import text_config
    from moescope.adapters.registry import family_for_model
    from moescope.router_settings import router_settings

    family = family_for_model(model)
    layers = family.find_layers(model)
    cfg = text_config(model.config)
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None)
    return {
        "name_or_path": name_or_path,
        "revision": revision,
        "model_type": model.config.model_type,
        "family": family.name,
        "router": family.router,
        "score_function": family.score_function,
        "router_settings": router_settings(cfg, family),
        "n_layers": n_layers,
        "moe_layers": [layer.layer for layer in layers],
        "layer_paths": {str(layer.layer): layer.path for layer in layers},
        "n_experts": max(layer.n_experts for layer in layers),
        "top_k": max(layer.top_k for layer in layers),
        "shared_experts": max(layer.n_shared for layer in layers),
        "zero_experts": family.zero_experts,
        "capacity_drops": family.capacity,
        "is_encoder_decoder": bool(getattr(model.config, "is_encoder_decoder", False)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
