"""Training configuration: frozen dataclasses read from a YAML file.

    model:  {architecture: olmoe, hidden_size: 256, num_layers: 8, n_experts: 16, top_k: 2, ...}
    data:   {corpus: runs/corpus, seq_len: 256}
    optim:  {lr: 0.002, batch_size: 16, max_tokens: 12000000}
    seed: 0

Unknown keys are refused with a "did you mean" hint, so a typo never silently trains the
wrong model.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moescope.errors import MoescopeError

ARCHITECTURES = ("olmoe", "mixtral")
ROUTINGS = ("token", "sequence")
ROUTERS = ("learned", "frozen")


@dataclass(frozen=True)
class ModelConfig:
    """The MoE causal LM to train (a transformers architecture, so it loads with from_pretrained).

    Attributes:
        routing: "token" (each token picks its experts) or "sequence" (one expert choice per
            sequence and layer, from the mean of the sequence's router inputs).
        router: "learned" or "frozen" (random initial router weights kept fixed).
        expert_size: intermediate size of each expert's MLP.
        aux_loss_coef: weight of the load-balancing loss (0 disables it).
        balance: "per_layer" (each MoE layer balanced on its own; default) or "pooled"
            (transformers' aux loss, which counts expert loads over all layers together, so
            opposite imbalances of two layers cancel out).
        z_loss_coef: weight of the router z-loss (mean squared logsumexp of router logits).
    """

    architecture: str = "olmoe"
    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 4
    n_experts: int = 16
    top_k: int = 2
    expert_size: int = 256
    routing: str = "token"
    router: str = "learned"
    aux_loss_coef: float = 0.01
    balance: str = "per_layer"
    z_loss_coef: float = 0.0
    norm_topk_prob: bool = False
    tie_embeddings: bool = True
    max_position: int = 1024
    rope_theta: float = 10000.0
    router_init_std: float = 0.02

    def __post_init__(self) -> None:
        _choice("model.architecture", self.architecture, ARCHITECTURES)
        _choice("model.routing", self.routing, ROUTINGS)
        _choice("model.router", self.router, ROUTERS)
        _choice("model.balance", self.balance, ("per_layer", "pooled"))
        if not 1 <= self.top_k <= self.n_experts:
            raise MoescopeError(f"model.top_k must be between 1 and n_experts ({self.n_experts}), not {self.top_k}")
        if self.hidden_size % self.num_heads:
            raise MoescopeError("model.hidden_size must be a multiple of model.num_heads")


@dataclass(frozen=True)
class DataConfig:
    """Where the training tokens come from (a directory written by `moescope data`).

    Attributes:
        seq_len: tokens per training window.
        domains: domains to train on (None: every domain of the corpus).
        mixing: "proportional" (domains sampled by their share of training tokens) or "uniform".
        eval_tokens_per_domain: validation tokens per domain at each evaluation.
    """

    corpus: str = "runs/corpus"
    seq_len: int = 256
    domains: tuple[str, ...] | None = None
    eval_tokens_per_domain: int = 32768
    mixing: str = "proportional"


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to min_lr_ratio * lr."""

    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    batch_size: int = 16
    max_tokens: int = 10_000_000
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; written next to the model for reproducibility."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    eval_every: int = 250
    checkpoint_every: int = 250
    threads: int | None = None
    name: str = "moescope-moe"

    @property
    def tokens_per_step(self) -> int:
        return self.optim.batch_size * self.data.seq_len

    @property
    def total_steps(self) -> int:
        return max(1, self.optim.max_tokens // self.tokens_per_step)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: dict[str, Any]) -> "TrainConfig":
        """A copy with fields of sections replaced, e.g. replace(model={"top_k": 1}, seed=3)."""
        updates: dict[str, Any] = {}
        for key, value in sections.items():
            current = getattr(self, key)
            updates[key] = dataclasses.replace(current, **value) if dataclasses.is_dataclass(current) else value
        return dataclasses.replace(self, **updates)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise MoescopeError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(names), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MoescopeError(f"unknown setting {where}{unknown[0]!r}{hint}; settings are {', '.join(names)}")
    kwargs = {}
    for key, value in values.items():
        sub = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig}.get(key) if cls is TrainConfig else None
        if sub is not None:
            if not isinstance(value, dict):
                raise MoescopeError(f"{where}{key} must be a mapping of settings")
            kwargs[key] = _build(sub, value, f"{key}.")
        elif key == "domains" and value is not None:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MoescopeError(f"bad settings in {where or 'config'}: {exc}") from exc


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from nested dicts (as read from YAML), validated."""
    return _build(TrainConfig, values or {}, "")


def load_config(path: str | Path) -> TrainConfig:
    """Read a training config from a YAML (or JSON) file."""
    path = Path(path)
    if not path.exists():
        raise MoescopeError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MoescopeError(f"{path} is not valid YAML: {exc}") from exc
    if values is not None and not isinstance(values, dict):
        raise MoescopeError(f"{path} must hold a mapping of settings (model:, data:, optim:, ...)")
    return config_from_dict(values or {})
