"""Make a MoE block's routed experts output known vectors, for the weight read-back proof.

The proof (:mod:`moescope.verify`) needs, for every expert e of a block, an output vector y_e
that it knows, while the block's *own* code still decides which experts run on which token
and with what weight, and combines their outputs. Then the block's output, minus what it
outputs when every routed expert outputs zero, is ``sum_e c_e y_e`` per token, and least
squares over the y_e recovers the coefficients c: which experts contributed, with what weight.

A probe never looks at the routing the adapter records; it only changes what the experts
compute, and only inside :meth:`ExpertsProbe.known_outputs` (every patched ``forward`` and
hook is restored on exit; no parameter is written). How each kind of block is probed:

* experts-contract modules (``experts(hidden, top_k_index, top_k_weights)``; most families):
  the experts' input is replaced by one fixed vector u for every token, so expert e outputs
  the constant f_e(u), computed by the model's own expert weights and code; y_e is measured by
  calling the experts module once per expert (identity/zero experts get one shared column).
* per-expert modules (``expert_0`` ... children: Switch Transformers, NLLB-MoE): each child's
  forward returns y_e.
* Llama 4 (the weight scales the expert's *input*): the experts forward returns, for expert e
  and token t, ``<input, h_t> / <h_t, h_t> * y_e`` (h_t the block's input), i.e. the scale
  that the block applied times y_e.
* JetMoE (``output_linear`` parallel experts): expert e's output rows are y_e.
* Doge (one-neuron product-key experts): ``down_embed`` returns h_t / |h_t|^2 (so every
  chosen expert's activation is act(1)) and ``up_embed`` returns y_e.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch
from torch import nn

from moescope.adapters.base import is_contract_experts

_SEED = 1234


def _fixed_vectors(n: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """n seeded random vectors of unit scale (n, width), in `like`'s dtype and device."""
    gen = torch.Generator().manual_seed(_SEED)
    return torch.randn(n, width, generator=gen).to(dtype=like.dtype, device=like.device)


@contextlib.contextmanager
def patched_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Replace `module.forward` for the duration of the block (an instance attribute, restored after)."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def first_tensor(value: Any) -> torch.Tensor:
    """The first tensor of a module's output: a tensor as is; tuples, lists and ModelOutputs
    (``to_tuple()``) by their first element, recursively."""
    while not isinstance(value, torch.Tensor):
        value = value[0] if isinstance(value, (tuple, list)) else value.to_tuple()[0]
    return value


class ExpertsProbe:
    """Base class: known expert outputs for one MoE block.

    Attributes (valid after a ``known_outputs(1.0)`` call):
        experts_output: (N, H) the routed experts' combined output in that call, when the
            probe can see it apart from the block's other paths (contract experts), else None.
    """

    zero_column = False  # whether the last basis row stands for the family's identity/zero experts

    def __init__(self, block: nn.Module, n_experts: int) -> None:
        self.block = block
        self.n_experts = n_experts
        self.experts_output: torch.Tensor | None = None
        # (N,) rows whose weights cannot show in the output (Llama 4: a token whose input is all
        # zero gives every expert a zero input, whatever its weight); None when all can.
        self.unobservable: torch.Tensor | None = None

    @contextlib.contextmanager
    def known_outputs(self, scale: float, only: torch.Tensor | None = None) -> Iterator[None]:
        """Inside: every routed expert e outputs ``scale * y_e`` (0 = all routed experts output zero);
        with `only` (expert ids), the others output zero."""
        raise NotImplementedError

    def groups(self) -> list[torch.Tensor]:
        """Expert ids to read back together: all at once, unless there are more than the output
        has dimensions to tell apart (then groups of half the width, one pass each)."""
        n = self.n_experts + (1 if self.zero_column else 0)
        y = getattr(self, "y", None)
        size = n if y is None else max(1, min(n, y.shape[1] // 2))
        return list(torch.arange(n).split(size))

    def _y(self, scale: float, only: torch.Tensor | None) -> torch.Tensor:
        """The known vectors times `scale`, zero outside `only`."""
        y = self.y * scale
        if only is not None and len(only) < len(y):
            mask = torch.zeros(len(y), 1, dtype=y.dtype, device=y.device)
            mask[only.to(y.device)] = 1
            y = y * mask
        return y

    def balance(self) -> None:
        """Adjust the known outputs' scale after a first ``known_outputs`` call (default: nothing)."""

    def basis(self) -> torch.Tensor:
        """(C, H) float64: row e is y_e (C = E, plus one row for identity experts when `zero_column`)."""
        raise NotImplementedError


class ContractProbe(ExpertsProbe):
    """Experts with the transformers-5 contract: the input becomes one fixed vector u."""

    def __init__(self, block: nn.Module, n_experts: int, experts: nn.Module, *, identity_experts: bool) -> None:
        super().__init__(block, n_experts)
        self.experts = experts
        self.zero_column = identity_experts
        self._call: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (u, ids, weights) of the last call
        self.alpha = 1.0  # length of u, see balance()

    def _u(self, hidden: torch.Tensor) -> torch.Tensor:
        return _fixed_vectors(1, hidden.shape[-1], hidden)[0] * self.alpha

    def balance(self) -> None:
        """With identity experts, scale u so routed experts' outputs are about as long as u itself.

        An identity expert outputs u; an expert MLP's output can be orders of magnitude shorter
        (untrained weights), and in bf16 the sum then rounds the short one away. Needs one
        ``known_outputs`` call first (for the call's dtypes).
        """
        if not self.zero_column:
            return
        best, best_gap = 1.0, float("inf")
        for alpha in (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0):
            self.alpha = alpha
            y = self.basis()
            lengths = y.norm(dim=1)
            gap = abs(float(torch.log(lengths[:-1].median() / lengths[-1])))
            if gap < best_gap:
                best, best_gap = alpha, gap
        self.alpha = best

    @contextlib.contextmanager
    def known_outputs(self, scale: float, only: torch.Tensor | None = None) -> Iterator[None]:
        if only is not None and len(only) < self.n_experts + (1 if self.zero_column else 0):
            raise NotImplementedError("contract experts cannot be silenced one by one")

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden, ids, weights = _contract_args(self.experts, args, kwargs)
            u = self._u(hidden).expand_as(hidden).contiguous()
            self._call = (u, ids, weights)
            return _with_hidden(self.experts, args, kwargs, u)

        def post(_m: nn.Module, _args: tuple, out: Any) -> Any:
            tensor = first_tensor(out)
            if scale == 1.0:
                self.experts_output = tensor.detach().reshape(-1, tensor.shape[-1]).clone()
            replaced = tensor * scale if scale != 0.0 else torch.zeros_like(tensor)
            return replaced if isinstance(out, torch.Tensor) else (replaced, *out[1:])

        handles = [self.experts.register_forward_pre_hook(pre, with_kwargs=True),
                   self.experts.register_forward_hook(post)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def basis(self) -> torch.Tensor:
        if self._call is None:
            raise RuntimeError("basis() needs a known_outputs() call first")
        u, ids, weights = self._call
        u = self._u(u.reshape(-1, u.shape[-1]))
        n = self.n_experts + (1 if self.zero_column else 0)
        rows = u[None].expand(n, u.shape[-1]).contiguous()
        # The call's own k (some experts squeeze a k of 1 away): every slot names expert e, the
        # first with weight 1, the others with weight 0.
        k = ids.shape[-1]
        one_each = torch.arange(n, device=ids.device, dtype=ids.dtype)[:, None].expand(n, k).contiguous()
        first = torch.zeros(n, k, device=weights.device, dtype=weights.dtype)
        first[:, 0] = 1
        out = first_tensor(self.experts(rows, one_each, first))
        return out.reshape(n, -1).double()


class FixedVectorsProbe(ExpertsProbe):
    """A probe whose expert e outputs the fixed vector ``self.y[e]`` (set by the subclass)."""

    y: torch.Tensor

    def basis(self) -> torch.Tensor:
        return self.y.double()


class PerExpertModulesProbe(FixedVectorsProbe):
    """Experts held as ``expert_0`` ... ``expert_{E-1}`` child modules: each returns y_e."""

    def __init__(self, block: nn.Module, n_experts: int, experts: nn.Module, width: int) -> None:
        super().__init__(block, n_experts)
        self.expert_modules = [getattr(experts, f"expert_{e}") for e in range(n_experts)]
        like = next(experts.parameters())
        self.y = _fixed_vectors(n_experts, width, like)

    @contextlib.contextmanager
    def known_outputs(self, scale: float, only: torch.Tensor | None = None) -> Iterator[None]:
        y = self._y(scale, only)
        with contextlib.ExitStack() as stack:
            for e, child in enumerate(self.expert_modules):
                def forward(x: torch.Tensor, *_a: Any, e: int = e, **_k: Any) -> torch.Tensor:
                    return y[e].to(x.dtype).expand(x.shape[0], -1).clone()
                stack.enter_context(patched_forward(child, forward))
            yield

class Llama4Probe(FixedVectorsProbe):
    """Llama 4: experts see ``h * weight``; expert e returns ``(<x, h> / <h, h>) * y_e``."""

    def __init__(self, block: nn.Module, n_experts: int) -> None:
        super().__init__(block, n_experts)
        self.experts = block.experts
        self.y = _fixed_vectors(n_experts, self.experts.hidden_size, self.experts.down_proj)
        self._h: torch.Tensor | None = None

    @contextlib.contextmanager
    def known_outputs(self, scale: float, only: torch.Tensor | None = None) -> Iterator[None]:
        y = self._y(scale, only).float()

        def remember(_m: nn.Module, args: tuple) -> None:
            self._h = args[0].reshape(-1, args[0].shape[-1])

        def forward(x: torch.Tensor) -> torch.Tensor:
            h = self._h.float()
            x = x.view(self.n_experts, -1, x.shape[-1]).float()
            norm = (h * h).sum(-1)
            self.unobservable = norm == 0
            s = (x * h[None]).sum(-1) / torch.where(norm > 0, norm, 1)[None]  # (E, N): the weight applied
            out = s[..., None] * y[:, None, :]
            return out.reshape(-1, out.shape[-1]).to(self.y.dtype)

        handle = self.block.register_forward_pre_hook(remember)
        try:
            with patched_forward(self.experts, forward):
                yield
        finally:
            handle.remove()

class JetMoeProbe(FixedVectorsProbe):
    """JetMoE (MLP or attention experts): ``output_linear`` returns y_e for every row of expert e."""

    def __init__(self, block: nn.Module, n_experts: int) -> None:
        super().__init__(block, n_experts)
        self.output_linear = block.output_linear
        weight = self.output_linear.weight  # (E, out, in)
        self.y = _fixed_vectors(n_experts, weight.shape[1], weight)

    @contextlib.contextmanager
    def known_outputs(self, scale: float, only: torch.Tensor | None = None) -> Iterator[None]:
        y = self._y(scale, only)

        def forward(inputs: torch.Tensor, expert_size: Any) -> torch.Tensor:
            sizes = [int(s) for s in expert_size]
            rows = [y[e].expand(n, -1) for e, n in enumerate(sizes)]
            return torch.cat(rows, dim=0).to(inputs.dtype)

        with patched_forward(self.output_linear, forward):
            yield

class DogeProbe(FixedVectorsProbe):
    """Doge: every chosen expert's activation is act(1), and its output vector is y_e."""

    def __init__(self, block: nn.Module, n_experts: int) -> None:
        super().__init__(block, n_experts)
        weight = block.up_embed.weight  # (E, H)
        self.y = _fixed_vectors(n_experts, weight.shape[1], weight)
        self._h: torch.Tensor | None = None

    @contextlib.contextmanager
    def known_outputs(self, scale: float, only: torch.Tensor | None = None) -> Iterator[None]:
        y = self._y(scale, only)

        def remember(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._h = hidden.reshape(-1, hidden.shape[-1])

        def down(indices: torch.Tensor) -> torch.Tensor:
            h = self._h.float()
            unit = h / (h * h).sum(-1, keepdim=True)  # <unit, h> = 1
            return unit[:, None, :].expand(*indices.shape, -1).to(self._h.dtype)

        def up(indices: torch.Tensor) -> torch.Tensor:
            return y[indices]

        handle = self.block.register_forward_pre_hook(remember, with_kwargs=True)
        try:
            with patched_forward(self.block.down_embed, down), patched_forward(self.block.up_embed, up):
                yield
        finally:
            handle.remove()

    def basis(self) -> torch.Tensor:
        one = torch.ones((), dtype=self.y.dtype, device=self.y.device)
        return self.y.double() * float(self.block.act_fn(one))


def _contract_args(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, ids, weights) of a contract experts call, by position then by parameter name."""
    names = _param_names(experts)
    values = list(args) + [kwargs[n] for n in names[len(args):3] if n in kwargs]
    return values[0], values[1], values[2]


def _with_hidden(experts: nn.Module, args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, _param_names(experts)[0]: hidden}


def _param_names(experts: nn.Module) -> list[str]:
    forward = inspect.unwrap(type(experts).forward)
    return list(inspect.signature(forward).parameters)[1:]


def watched_module(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """The module whose output the block's experts feed: the block, or for JetMoE's attention
    experts (a block that is never called itself) the attention module holding it."""
    block = model.get_submodule(path)
    if type(block).__name__ == "JetMoeMoA":
        parent = path.rsplit(".", 1)[0]
        return parent, model.get_submodule(parent)
    return path, block


def probe_for(block: nn.Module, n_experts: int, *, identity_experts: bool = False) -> ExpertsProbe:
    """The probe for a MoE block, chosen by the block's structure (not by the family's adapter)."""
    experts = getattr(block, "experts", None)
    if type(experts).__name__ == "Llama4TextExperts":
        return Llama4Probe(block, n_experts)
    if isinstance(getattr(block, "output_linear", None), nn.Module) and hasattr(block, "router"):
        return JetMoeProbe(block, n_experts)
    if isinstance(getattr(block, "up_embed", None), nn.Embedding) and isinstance(getattr(block, "down_embed", None), nn.Embedding):
        return DogeProbe(block, n_experts)
    if isinstance(experts, nn.Module) and hasattr(experts, "expert_0"):
        return PerExpertModulesProbe(block, n_experts, experts, _output_width(experts.expert_0))
    if isinstance(experts, nn.Module) and (is_contract_experts(experts) or len(_param_names(experts)) >= 3):
        return ContractProbe(block, n_experts, experts, identity_experts=identity_experts)
    raise NotImplementedError(f"no read-back probe for MoE block {type(block).__name__}")


def _output_width(expert: nn.Module) -> int:
    """Output width of a dense expert MLP (its last Linear's out_features)."""
    linears = [m for m in expert.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NotImplementedError(f"no read-back probe for expert {type(expert).__name__} (no Linear layer)")
    return linears[-1].out_features
