"""Hooks that observe a model's routing during forward and generate calls.

    with moescope.record(model, tokenizer=tok) as rec:
        model.generate(**batch, max_new_tokens=20)
    tables = rec.tables()            # Arrow tables: sequences, tokens, routes (, hidden)

Vocabulary used here:
- a *stack* is the module that receives input_ids and runs the layers (encoder-decoder
  models have two); every forward of a stack is a *step*;
- a *group* is the batch of sequences a step with an empty cache starts; later steps that
  continue its cache (generate's decoding, an encoder-decoder's decoder) extend it.

Hot path: a hook only keeps a reference to a host copy of what the experts received (an
asynchronous copy on GPU). Positions, padding, phases and Arrow tables are worked out
when a group is closed (:mod:`moescope.capture.assemble`), typically in a writer thread.
Hooks observe and never change a tensor: outputs with capture on equal those without.
"""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from moescope.adapters.base import Family, MoELayer
from moescope.adapters.registry import family_for_model
from moescope.capture.records import GENERATED, PROMPT, CaptureOptions, Group, LayerRecord, Step
from moescope.capture.recording import check_layers, merge_options
from moescope.errors import MoescopeError, UnsupportedModelError

def _sample_hash(seq_ids: torch.Tensor, pos: torch.Tensor, seed: int) -> torch.Tensor:
    """Deterministic uniform values in [0, 1) per (seq_id, pos): the hidden-state sampler."""
    x = (seq_ids.to(torch.int64) * 1_000_003 + pos.to(torch.int64) * 7_919 + seed * 104_729) & 0xFFFFFFFF
    x = (x * 2_654_435_761) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 2_246_822_519) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    return x.to(torch.float64) / 4294967296.0


class Recorder:
    """Records routing of every MoE layer while active (use :func:`record`)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        options: CaptureOptions | None = None,
        family: Family | None = None,
        first_seq_id: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options or CaptureOptions()
        self.family = family or family_for_model(model)
        self.layers: list[MoELayer] = self.family.find_layers(model)
        if not self.layers:
            raise UnsupportedModelError(
                f"{type(model).__name__} ({model.config.model_type}) has no MoE layers moescope can find; "
                "is this a dense model?"
            )
        chosen = set(check_layers([layer.layer for layer in self.layers], self.options.layers))
        self.layers = [layer for layer in self.layers if layer.layer in chosen]
        self._by_path = {layer.path: layer for layer in self.layers}
        self._stacks = sorted({layer.stack for layer in self.layers})
        self._encoder_stack = next((s for s in self._stacks if "encoder" in s.split(".")), None)
        self._stack_sigs = {s: inspect.signature(self._module(s).forward) for s in self._stacks}
        self._handles: list[Any] = []
        self._current: dict[str, Step] = {}
        self._group: Group | None = None
        self._closed: list[Group] = []
        self._kept: list[Group] = []  # groups tables() has assembled (it never empties the recorder)
        self._tables: dict[str, Any] | None = None
        self._next_seq_id = first_seq_id
        self._pending: dict[str, Any] | None = None
        self._in_generate = False
        self._generate_steps = 0
        self._known_width: dict[str, int] = {}  # columns seen per stack in this group
        self._original_generate: Callable | None = None
        self._warned: set[str] = set()
        self._devices: set[torch.device] = set()  # accelerators with copies in flight for the open group
        self._top_input_ids: torch.Tensor | None = None  # token ids of the model call in progress

    # -- lifecycle -----------------------------------------------------------------------
    def _host(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host copy of `t`: a clone on CPU; on an accelerator an asynchronous copy into
        pinned memory (no host sync here; the group's events are waited on when read)."""
        t = t.detach()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if t.device.type == "cpu":
            return t.clone()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        self._devices.add(t.device)
        return out

    def _module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path) if path else self.model

    def __enter__(self) -> "Recorder":
        self.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def attach(self) -> None:
        """Register every hook (idempotent)."""
        if self._handles:
            return
        opts = self.options
        for stack in self._stacks:
            self._handles.append(
                self._module(stack).register_forward_pre_hook(self._make_stack_hook(stack), with_kwargs=True)
            )
        if "" not in self._stacks:
            # Multimodal models feed their language model embeddings: keep the call's token ids.
            self._handles.append(self.model.register_forward_pre_hook(self._remember_ids, with_kwargs=True))
        for layer in self.layers:
            want_hidden = opts.wants_hidden and (opts.hidden_layers is None or layer.layer in opts.hidden_layers)
            self._handles += self.family.attach(
                self.model, layer, self, logits=opts.router_scores is not None, hidden=want_hidden
            )
        if hasattr(self.model, "generate"):
            self._original_generate = self.model.generate
            self.model.generate = self._generate  # instance attribute; removed on detach

    def detach(self) -> None:
        """Remove every hook and close the open group."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._original_generate is not None:
            del self.model.generate
            self._original_generate = None
        self._close_group()

    # -- what the caller tells us about the next batch -------------------------------------
    def expect(
        self,
        seq_ids: list[int] | np.ndarray,
        *,
        texts: list[str] | None = None,
        metadata: list[dict[str, Any]] | None = None,
        offsets: list[list[tuple[int, int]]] | None = None,
    ) -> None:
        """Name the sequences of the next batch (otherwise ids count up from `first_seq_id`)."""
        self._pending = {"seq_ids": np.asarray(seq_ids, dtype=np.uint32), "texts": texts,
                         "metadata": metadata, "offsets": offsets}

    def take(self) -> list[Group]:
        """Close the open group and return every closed group since the last call."""
        self._close_group()
        groups, self._closed = self._closed, []
        return groups

    def tables(self) -> dict[str, Any]:
        """Arrow tables of everything recorded so far: ``sequences``, ``tokens``, ``routes`` and
        ``hidden`` (None unless router inputs were sampled with hidden_rate / hidden_positions).

        Idempotent: calling it again (a rerun notebook cell) returns the same tables, plus
        whatever was recorded in between. Groups taken with :meth:`take` are not included.
        """
        from moescope.capture.assemble import assemble_groups

        self._close_group()
        if self._closed or self._tables is None:
            self._kept += self._closed
            self._closed = []
            self._tables = assemble_groups(self._kept, self)
        return dict(self._tables)

    def save(self, out: str | os.PathLike, *, model_name: str | None = None, overwrite: bool = False) -> Any:
        """Write what was recorded as a trace directory (Parquet shards + manifest) that
        :func:`moescope.open_trace` and every analysis read. Returns the opened :class:`Trace`.

        The manifest describes the model like `moescope capture` does, with capture mode
        "record" and the layers recorded.
        """
        from moescope.capture.recording import save_recording

        return save_recording(self, out, model_name=model_name, overwrite=overwrite)

    # -- groups --------------------------------------------------------------------------
    def _open_group(self, batch: int) -> Group:
        self._close_group()
        pending, self._pending = self._pending, None
        if pending is not None:
            if len(pending["seq_ids"]) != batch:
                raise MoescopeError(f"expect() named {len(pending['seq_ids'])} sequences but the batch has {batch}")
            group = Group(seq_ids=pending["seq_ids"], texts=pending["texts"], metadata=pending["metadata"],
                          offsets=pending["offsets"])
        else:
            ids = np.arange(self._next_seq_id, self._next_seq_id + batch, dtype=np.uint32)
            group = Group(seq_ids=ids)
        self._next_seq_id = max(self._next_seq_id, int(group.seq_ids.max()) + 1)
        self._group = group
        self._known_width = {}
        return group

    def _close_group(self) -> None:
        if self._group is None:
            return
        for device in self._devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._group.events.append(event)
        self._devices = set()
        self._closed.append(self._group)
        self._group = None
        self._current = {}

    # -- the stack hook: one per step ------------------------------------------------------
    def _remember_ids(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        self._top_input_ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

    def _make_stack_hook(self, stack: str) -> Callable:
        sig = self._stack_sigs[stack]

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            bound = sig.bind_partial(*args, **kwargs).arguments
            extra = bound.get("kwargs") or {}
            get = lambda name: bound.get(name, extra.get(name))  # noqa: E731
            input_ids, embeds = get("input_ids"), get("inputs_embeds")
            ref = input_ids if input_ids is not None else embeds
            if ref is None:
                return
            batch, width = int(ref.shape[0]), int(ref.shape[1])
            if input_ids is None:
                top = self._top_input_ids
                if top is not None and tuple(top.shape) == (batch, width):
                    input_ids = top
            self._begin_step(stack, batch, width, input_ids, get("attention_mask"), get("past_key_values"))

        return hook

    def _begin_step(self, stack: str, batch: int, width: int, input_ids: Any, attention_mask: Any, cache: Any) -> None:
        past = _cache_length(cache)
        is_decoder_of_encdec = self._encoder_stack is not None and stack != self._encoder_stack
        continues = (
            self._group is not None
            and self._group.batch == batch
            and (is_decoder_of_encdec or past > 0 or (self._in_generate and self._generate_steps > 0))
        )
        if stack == self._encoder_stack or not continues:
            group = self._open_group(batch)
            phase = PROMPT
        else:
            group = self._group
            phase = GENERATED if (self._in_generate or past > 0) else PROMPT
        if self._in_generate and stack != self._encoder_stack:
            self._generate_steps += 1

        # Columns already recorded for this stack in this group. A continuation normally feeds
        # only new columns; generate(use_cache=False) re-feeds them all (wider than what is
        # known). Cache length alone cannot tell: some caches (linear attention) report 0.
        known = self._known_width.get(stack, 0) if continues else 0
        rerun = continues and past == 0 and known > 0 and width > known
        first_new = known if rerun else 0
        self._known_width[stack] = width if (rerun or not continues) else known + width
        mask = _new_token_mask(attention_mask, batch, width, ref_device=_device_of(input_ids, attention_mask))
        step = Step(
            stack=stack,
            batch=batch,
            width=width,
            mask=self._host(mask),
            token_ids=self._host(input_ids) if input_ids is not None else None,
            phase=phase,
            first_new_col=first_new,
        )
        if self.options.wants_hidden:
            self._plan_hidden(step, group, mask)
        group.steps.append(step)
        self._current[stack] = step

    def _plan_hidden(self, step: Step, group: Group, device_mask: torch.Tensor) -> None:
        """Choose which rows of this step keep their router input (one host sync per step)."""
        mask = device_mask.to("cpu")
        prior = _real_tokens_before(group, step.stack)
        pos = prior[:, None] + torch.cumsum(mask.to(torch.int64), dim=1) - 1
        keep = mask.clone()
        keep[:, : step.first_new_col] = False
        if self.options.hidden_positions:
            wanted = torch.tensor(sorted(self.options.hidden_positions))
            keep &= torch.isin(pos, wanted)
        else:
            seq = torch.as_tensor(group.seq_ids.astype(np.int64))[:, None].expand_as(pos)
            keep &= _sample_hash(seq, pos, self.options.seed) < self.options.hidden_rate
        step._hidden_rows = keep.flatten().nonzero().flatten()  # type: ignore[attr-defined]

    # -- sink: called by the family's hooks --------------------------------------------------
    def _step_for(self, layer: MoELayer, n_rows: int) -> Step | None:
        step = self._current.get(layer.stack)
        if step is None:
            if "nostep" not in self._warned:
                warnings.warn("moescope: an MoE layer ran outside a model forward; its routing is not recorded")
                self._warned.add("nostep")
            return None
        if n_rows != step.batch * step.width:
            raise MoescopeError(
                f"layer {layer.layer} routed {n_rows} rows but the step has {step.batch}x{step.width} tokens; "
                f"the {self.family.name} adapter does not match this model: please report it"
            )
        return step

    def _layer_record(self, step: Step, layer: MoELayer) -> LayerRecord:
        rec = step.layers.get(layer.layer)
        if rec is None:
            rec = step.layers[layer.layer] = LayerRecord()
        return rec

    def routes(self, layer: MoELayer, ids: torch.Tensor, weights: torch.Tensor | None,
               dropped: torch.Tensor | None = None) -> None:
        if ids.shape[-1] != layer.top_k:
            raise MoescopeError(
                f"layer {layer.layer} routed to {ids.shape[-1]} experts per token, but the {self.family.name} "
                f"adapter expected top-{layer.top_k}; the adapter does not match this model: please report it"
            )
        ids = ids.reshape(-1, ids.shape[-1])
        step = self._step_for(layer, ids.shape[0])
        if step is None:
            return
        rec = self._layer_record(step, layer)
        rec.ids = self._host(ids)
        wdtype = torch.float16 if self.options.weights_dtype == "float16" else torch.float32
        rec.weights = None if weights is None else self._host(weights.reshape(ids.shape), wdtype)
        rec.dropped = None if dropped is None else self._host(dropped.reshape(ids.shape))

    def router_logits(self, layer: MoELayer, logits: torch.Tensor) -> None:
        logits = logits.reshape(-1, logits.shape[-1])
        step = self._step_for(layer, logits.shape[0])
        if step is None:
            return
        if self.options.router_scores == "probs":
            logits = self.family.probs_from_logits(logits)
        self._layer_record(step, layer).scores = self._host(logits, torch.float16)

    def router_input(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        step = self._step_for(layer, hidden.shape[0])
        if step is None:
            return
        rows = step._hidden_rows  # type: ignore[attr-defined]
        rec = self._layer_record(step, layer)
        rec.hidden_rows = rows
        rec.hidden = self._host(hidden.index_select(0, rows.to(hidden.device)), torch.float16)

    # -- generate ------------------------------------------------------------------------
    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        _refuse_unsupported_generation(self.model, kwargs)
        self._close_group()
        self._in_generate, self._generate_steps = True, 0
        try:
            out = self._original_generate(*args, **kwargs)
        finally:
            self._in_generate = False
        group, self._group = self._group, None
        if group is not None:
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            self._attach_generated(group, sequences, kwargs)
            self._group = group
            self._close_group()
        return out

    def _attach_generated(self, group: Group, sequences: torch.Tensor, kwargs: dict) -> None:
        """Record what generate() produced and where each row really ends (first EOS)."""
        if self._encoder_stack is not None:
            generated = sequences  # decoder output: the start token, then the generated tokens
        else:
            prompt_width = sum(s.width for s in group.steps if s.phase == PROMPT)
            generated = sequences[:, prompt_width:]
        generated = generated.detach().cpu()
        eos = _eos_ids(self.model, kwargs)
        lengths = np.full(generated.shape[0], generated.shape[1], dtype=np.int64)
        if eos:
            skip = 1 if self._encoder_stack is not None else 0  # the decoder start token is never EOS
            is_eos = torch.isin(generated[:, skip:], torch.tensor(eos))
            for row in range(generated.shape[0]):
                hits = is_eos[row].nonzero()
                if len(hits):
                    lengths[row] = int(hits[0]) + 1 + skip
        group.generated = generated
        group.generated_lengths = lengths


def _device_of(*tensors: Any) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _cache_length(cache: Any) -> int:
    """Tokens already in a KV cache (0 for none or empty)."""
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:  # caches of exotic families; treat as empty
        return 0


def _new_token_mask(attention_mask: Any, batch: int, width: int, ref_device: torch.device) -> torch.Tensor:
    """(B, T) bool mask of real tokens among this step's T columns."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[0] == batch:
        return attention_mask[:, -width:].to(torch.bool)
    return torch.ones(batch, width, dtype=torch.bool, device=ref_device)


def _real_tokens_before(group: Group, stack: str) -> torch.Tensor:
    """(B,) real tokens already recorded for each row of `group` (positions continue from here)."""
    counts = torch.zeros(group.batch, dtype=torch.int64)
    for step in group.steps:
        counts += step.mask.to("cpu")[:, step.first_new_col:].sum(dim=1)
    return counts


def _eos_ids(model: nn.Module, kwargs: dict) -> list[int]:
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    eos = kwargs.get("eos_token_id", getattr(cfg, "eos_token_id", None))
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _refuse_unsupported_generation(model: nn.Module, kwargs: dict) -> None:
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(cfg, "num_beams", 1)) or 1
    if beams > 1:
        raise MoescopeError(
            "beam search (num_beams > 1) reorders sequences between steps and its routing cannot be attributed to "
            "one output; capture with greedy or sampled generation (num_beams=1)"
        )
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        raise MoescopeError("speculative / assisted generation is not supported while recording; drop assistant_model")


def record(
    model: nn.Module,
    *,
    tokenizer: Any = None,
    options: CaptureOptions | None = None,
    first_seq_id: int = 0,
    **option_kwargs: Any,
) -> Recorder:
    """A recorder to use as a context manager around forward or generate calls of `model`.

    Keyword arguments not named here are :class:`CaptureOptions` fields: ``layers``,
    ``router_scores``, ``hidden_rate``, ``hidden_positions``, ``hidden_layers``,
    ``weights_dtype``, ``seed`` (the same keywords :func:`moescope.capture_dataset` takes).

    After the block, ``rec.tables()`` gives the Arrow tables and ``rec.save(dir)`` writes
    them as a trace directory.
    """
    options = merge_options(CaptureOptions, options, option_kwargs)
    return Recorder(model, tokenizer=tokenizer, options=options, first_seq_id=first_seq_id)
