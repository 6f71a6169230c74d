"""Training-time routing telemetry, per layer.

The auxiliary loss transformers reports pools every layer, so one layer can collapse while
the pooled value looks healthy. :class:`RoutingMeter` counts, per MoE layer, what the
experts actually received (the same hooks as capture) and summarises:

- ``load``: share of the layer's expert assignments each expert received (sums to 1);
- ``load_entropy``: entropy of ``load`` divided by log E (1 = perfectly balanced);
- ``max_over_fair``: the busiest expert's load divided by the fair share 1/E;
- ``dead``: experts that received nothing in the window;
- ``aux_loss``: Switch-style balance loss E * sum_i f_i * P_i of this layer alone, with
  f_i the fraction of tokens sent to expert i and P_i its mean router probability
  (balanced value: k, as in transformers);
- ``z_loss``: mean squared logsumexp of the layer's router logits.

:class:`RoutingTelemetryCallback` offers the same to users of the HF ``Trainer``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moescope.adapters.base import MoELayer
from moescope.adapters.registry import family_for_model


class RoutingMeter:
    """Accumulates per-layer expert counts and router statistics while attached.

    Counting happens on the model's device without host synchronisation; call
    :meth:`summary` (which syncs once) to read and reset the window.
    """

    def __init__(self, model: nn.Module, *, keep_logits_for_loss: bool = False) -> None:
        self.model = model
        self.family = family_for_model(model)
        self.layers: list[MoELayer] = self.family.find_layers(model)
        self.keep_logits_for_loss = keep_logits_for_loss
        self._handles: list[Any] = []
        # The last forward's grad-carrying router logits, and its expert counts with the number
        # of tokens they cover, per layer (training losses).
        self.live_logits: dict[int, torch.Tensor] = {}
        self.live_counts: dict[int, tuple[torch.Tensor, int]] = {}
        self.reset()

    def reset(self) -> None:
        self._counts: dict[int, torch.Tensor] = {}
        self._prob_sums: dict[int, torch.Tensor] = {}
        self._z_sums: dict[int, torch.Tensor] = {}
        self._rows: dict[int, int] = {}
        self._logit_rows: dict[int, int] = {}

    def attach(self) -> "RoutingMeter":
        if not self._handles:
            for layer in self.layers:
                self._handles += self.family.attach(self.model, layer, self, logits=True, hidden=False)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "RoutingMeter":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # -- sink interface (see moescope.adapters.base.RoutingSink) ---------------------------
    def routes(self, layer: MoELayer, ids: torch.Tensor, weights: Any, dropped: Any = None) -> None:
        tokens = ids.numel() // max(ids.shape[-1], 1)
        ids = ids.detach().reshape(-1)
        counts = torch.bincount(ids.clamp(max=layer.n_experts - 1), minlength=layer.n_experts)
        if self.keep_logits_for_loss:
            self.live_counts[layer.layer] = (counts, tokens)
        prev = self._counts.get(layer.layer)
        self._counts[layer.layer] = counts if prev is None else prev + counts
        self._rows[layer.layer] = self._rows.get(layer.layer, 0) + ids.numel() // max(layer.top_k, 1)

    def router_logits(self, layer: MoELayer, logits: torch.Tensor) -> None:
        if self.keep_logits_for_loss and logits.requires_grad:
            self.live_logits[layer.layer] = logits
        logits = logits.detach().float().reshape(-1, logits.shape[-1])
        probs = self.family.probs_from_logits(logits).sum(dim=0)
        z = torch.logsumexp(logits, dim=-1).pow(2).sum()
        key = layer.layer
        self._prob_sums[key] = probs if key not in self._prob_sums else self._prob_sums[key] + probs
        self._z_sums[key] = z if key not in self._z_sums else self._z_sums[key] + z
        self._logit_rows[key] = self._logit_rows.get(key, 0) + logits.shape[0]

    def router_input(self, layer: MoELayer, hidden: torch.Tensor) -> None:  # pragma: no cover - not requested
        pass

    def router_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(balance, z) losses of the last training forward, each a mean over MoE layers; clears it.

        balance: per layer, E * sum_i f_i * P_i with f_i the fraction of tokens sent to expert i
        (from the experts the model used; sums to k) and P_i its mean router probability (carries
        the gradient); balanced value k, the scale of transformers' aux loss. Unlike that loss,
        which pools every layer's tokens before counting, each layer is balanced on its own.
        z: mean squared logsumexp of the router logits (Zoph et al. 2022).
        """
        balance, z = [], []
        for layer in self.layers:
            logits = self.live_logits.get(layer.layer)
            if logits is None:
                continue
            logits = logits.float().reshape(-1, logits.shape[-1])
            probs = self.family.probs_from_logits(logits)
            if layer.layer in self.live_counts:
                counts, tokens = self.live_counts[layer.layer]
                f = counts.float() / max(tokens, 1)
                balance.append(layer.n_experts * (f * probs.mean(dim=0)).sum())
            z.append(torch.logsumexp(logits, dim=-1).pow(2).mean())
        self.live_logits, self.live_counts = {}, {}
        zero = torch.zeros(())
        return (torch.stack(balance).mean() if balance else zero, torch.stack(z).mean() if z else zero)

    # -- reading -------------------------------------------------------------------------
    def summary(self, reset: bool = True) -> dict[str, dict[str, Any]]:
        """Per-layer telemetry of the window since the last reset, keyed by layer index (str)."""
        out: dict[str, dict[str, Any]] = {}
        for layer in self.layers:
            key = layer.layer
            if key not in self._counts:
                continue
            e = layer.n_experts
            counts = self._counts[key].double().cpu()
            total = counts.sum().item()
            load = (counts / max(total, 1)).tolist()
            entropy = -sum(p * math.log(p) for p in load if p > 0) / math.log(e)
            row = {
                "load": [round(x, 6) for x in load],
                "load_entropy": round(entropy, 6),
                "max_over_fair": round(max(load) * e, 4),
                "dead": [i for i, c in enumerate(counts.tolist()) if c == 0],
                "tokens": self._rows.get(key, 0),
            }
            if key in self._prob_sums and self._logit_rows.get(key):
                mean_p = (self._prob_sums[key].double().cpu() / self._logit_rows[key])
                f = counts / max(self._rows.get(key, 1), 1)  # fraction of tokens per expert (sums to k)
                row["aux_loss"] = round(float(e * (f * mean_p).sum()), 6)
                row["z_loss"] = round(float(self._z_sums[key].cpu()) / self._logit_rows[key], 6)
            out[str(key)] = row
        if reset:
            self.reset()
        return out


def flatten_telemetry(summary: dict[str, dict[str, Any]], prefix: str = "routing") -> dict[str, float]:
    """Scalar telemetry as flat log keys, e.g. ``routing/layer3/max_over_fair``."""
    flat: dict[str, float] = {}
    for layer, row in summary.items():
        for key in ("load_entropy", "max_over_fair", "aux_loss", "z_loss"):
            if key in row:
                flat[f"{prefix}/layer{layer}/{key}"] = row[key]
        flat[f"{prefix}/layer{layer}/dead"] = len(row["dead"])
    return flat


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[misc,assignment]


class RoutingTelemetryCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that logs per-layer routing telemetry.

    At every logging step it adds flat scalars (``routing/layer{i}/max_over_fair`` ...) to
    the Trainer's logs, and appends the full per-layer summary (loads included) to
    `output_file` (JSON lines) when given.

        trainer = Trainer(model=model, ...)
        RoutingTelemetryCallback.install(trainer, "routing.jsonl")

    `install` puts the callback first, so that reporting integrations (wandb, tensorboard), which
    the Trainer registers before user callbacks, receive the routing scalars too. Passed through
    ``Trainer(callbacks=[...])`` instead, the scalars still reach ``trainer.state.log_history``
    and the JSON-lines file.
    """

    @classmethod
    def install(cls, trainer: Any, output_file: str | Path | None = None) -> "RoutingTelemetryCallback":
        """Create the callback and register it ahead of the Trainer's other callbacks."""
        callback = cls(output_file)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def __init__(self, output_file: str | Path | None = None) -> None:
        self.output_file = Path(output_file) if output_file else None
        self.meter: RoutingMeter | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> None:
        if model is not None and self.meter is None:
            self.meter = RoutingMeter(model).attach()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if self.meter is None:
            return
        summary = self.meter.summary()
        if not summary:
            return
        flat = flatten_telemetry(summary)
        if logs is not None:
            logs.update(flat)  # seen by the callbacks after this one
        if state.log_history:
            state.log_history[-1].update(flat)  # the Trainer copied `logs` there before callbacks ran
        if self.output_file is not None:
            with open(self.output_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "layers": summary}) + "\n")

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.meter is not None:
            self.meter.detach()
            self.meter = None
