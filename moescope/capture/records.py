"""What a capture records: the options, and per step and MoE layer the host copies of what the
experts received (filled by :class:`moescope.capture.recorder.Recorder`, turned into Arrow
tables by :mod:`moescope.capture.assemble`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moescope.errors import MoescopeError

PROMPT, GENERATED = "prompt", "generated"


@dataclass(frozen=True)
class CaptureOptions:
    """What to record besides expert ids and weights.

    Attributes:
        router_scores: None, "logits" (all E router logits) or "probs" (the family's score
            function applied to them), stored as float16.
        hidden_rate: fraction of tokens (chosen by a seeded hash of seq_id and pos) whose
            router input vector is stored; 0 disables hidden-state capture.
        hidden_positions: store router inputs at exactly these token positions instead.
        hidden_layers: restrict hidden-state capture to these layer indices (None: all).
        weights_dtype: "float16" (default; the information bound) or "float32".
        seed: seed of the hidden-state sampling hash.
        layers: record only these MoE layer indices (None: every MoE layer). The manifest
            lists the layers captured, so analyses never read a missing layer as unused.
    """

    router_scores: str | None = None
    hidden_rate: float = 0.0
    hidden_positions: tuple[int, ...] | None = None
    hidden_layers: tuple[int, ...] | None = None
    weights_dtype: str = "float16"
    seed: int = 0
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience (record(model, layers=[0, 7])); stored as tuples
        # so the options stay hashable and serialise the same way.
        for name in ("layers", "hidden_layers", "hidden_positions"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(int(x) for x in value))
        if self.router_scores not in (None, "logits", "probs"):
            raise MoescopeError(f"router_scores must be 'logits' or 'probs', not {self.router_scores!r}")
        if not 0.0 <= self.hidden_rate <= 1.0:
            raise MoescopeError(f"hidden_rate must be between 0 and 1, not {self.hidden_rate}")
        if self.weights_dtype not in ("float16", "float32"):
            raise MoescopeError(f"weights_dtype must be float16 or float32, not {self.weights_dtype!r}")

    @property
    def wants_hidden(self) -> bool:
        return self.hidden_rate > 0 or bool(self.hidden_positions)


@dataclass
class LayerRecord:
    """What one MoE layer saw in one step; tensors are host copies (rows = B*T, row-major)."""

    ids: torch.Tensor | None = None  # (N, k) int
    weights: torch.Tensor | None = None  # (N, k) float
    dropped: torch.Tensor | None = None  # (N, k) bool
    scores: torch.Tensor | None = None  # (N, E) float16
    hidden: torch.Tensor | None = None  # (n_sampled, H) float16
    hidden_rows: torch.Tensor | None = None  # (n_sampled,) flat row indices


@dataclass
class Step:
    """One forward of a stack: B sequences x T new columns."""

    stack: str
    batch: int
    width: int
    mask: torch.Tensor  # (B, T) bool, True at real tokens
    token_ids: torch.Tensor | None  # (B, T) or None when the stack got embeddings
    phase: str
    first_new_col: int = 0  # columns before this were recorded by an earlier step (no-cache generate)
    layers: dict[int, LayerRecord] = field(default_factory=dict)


@dataclass
class Group:
    """A batch of sequences and every step that ran on it."""

    seq_ids: np.ndarray  # (B,) uint32
    steps: list[Step] = field(default_factory=list)
    texts: list[str] | None = None
    metadata: list[dict[str, Any]] | None = None
    offsets: list[list[tuple[int, int]]] | None = None  # per row, char spans of the real prompt tokens
    generated: torch.Tensor | None = None  # (B, G) token ids generate() returned after the prompt
    generated_lengths: np.ndarray | None = None  # (B,) real generated tokens per row (up to EOS)
    events: list[Any] = field(default_factory=list)  # CUDA events to wait on before reading

    @property
    def batch(self) -> int:
        return len(self.seq_ids)

    def wait(self) -> None:
        """Block until asynchronous device-to-host copies of this group have landed."""
        for event in self.events:
            event.synchronize()
        self.events = []
