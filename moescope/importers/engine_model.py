"""What an importer needs to know about the served model, from its config and tokenizer only.

Engines return one routing row per token with a layer axis of ``num_hidden_layers`` (every
decoder layer; dense layers hold zeros) and ``num_experts_per_tok`` columns. Which decoder
layers are MoE layers is the adapters' knowledge (``first_k_dense_replace``,
``mlp_only_layers``, ``decoder_sparse_step``, ``moe_layer_freq`` ...): rather than re-deriving
it from config fields, the model is built on the ``meta`` device (no weights, no memory) and
the family's :meth:`~moescope.adapters.base.Family.find_layers` names its MoE layers, exactly
as in a capture.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import DataError, MoescopeError


@dataclass
class EngineModel:
    """The served model as an importer sees it.

    Attributes:
        name: the --model argument.
        n_layers: num_hidden_layers (the engine's layer axis).
        moe_layers: decoder-layer ids of the MoE layers, increasing.
        n_experts: routed experts per layer, E.
        top_k: experts per token, k (the engine's last axis).
        description: the manifest's `model` section.
        tokenizer: the model's tokenizer (None when not loaded), for token texts.
    """

    name: str
    n_layers: int
    moe_layers: list[int]
    n_experts: int
    top_k: int
    description: dict[str, Any]
    tokenizer: Any = None

    def select_layers(self, where: str, arr: np.ndarray) -> np.ndarray:
        """(T, L, k) routing with L = num_hidden_layers (engine form) or L = number of MoE
        layers -> (T, MoE layers, k); DataError naming `where` for any other shape."""
        if arr.ndim != 3:
            raise DataError(f"{where}: routed experts have shape {arr.shape}; expected [tokens, layers, top_k]")
        if arr.shape[2] != self.top_k:
            raise DataError(f"{where}: routed experts have {arr.shape[2]} experts per token but {self.name} "
                            f"routes to top_k = {self.top_k}; is this the served model?")
        if arr.shape[1] == self.n_layers:
            return arr[:, self.moe_layers, :]
        if arr.shape[1] == len(self.moe_layers):
            return arr
        raise DataError(f"{where}: routed experts have {arr.shape[1]} layers but {self.name} has "
                        f"{self.n_layers} decoder layers ({len(self.moe_layers)} MoE); is this the served model?")


def describe_engine_model(name: str, *, revision: str | None = None, trust_remote_code: bool = False,
                          with_tokenizer: bool = True) -> EngineModel:
    """An :class:`EngineModel` for a local model directory or hub id (config + tokenizer only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from moescope.adapters.registry import family_for_config
    from moescope.capture.loading import LoadOptions, describe_model, load_config, load_tokenizer

    options = LoadOptions(revision=revision, trust_remote_code=trust_remote_code)
    local = Path(name)
    if local.exists() and not local.is_dir():
        raise MoescopeError(f"--model {name} is a file; pass the model's directory (with config.json) or a hub id")
    config = load_config(name, options)
    family_for_config(config)  # unsupported or dense: one clear line before anything else
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):  # structure only: no weights are read or allocated
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    desc = describe_model(model, name, revision)
    for key in ("dtype", "n_parameters"):
        desc.pop(key, None)  # properties of loaded weights, which an import never has
    if desc.get("n_layers") is None:
        raise MoescopeError(f"{name}: the config has no num_hidden_layers; engines' routing cannot be laid out")
    tokenizer = load_tokenizer(name, options) if with_tokenizer else None
    return EngineModel(name=name, n_layers=int(desc["n_layers"]), moe_layers=list(desc["moe_layers"]),
                       n_experts=int(desc["n_experts"]), top_k=int(desc["top_k"]), description=desc,
                       tokenizer=tokenizer)
