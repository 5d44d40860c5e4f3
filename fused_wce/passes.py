"""What one pass over the counted tokens is asked to compute, and what it returns, whatever the backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .loss_math import TokenStats
from .options import LossOptions


class KnownRowStats(NamedTuple):
    """Whole-row statistics of the counted rows from an earlier pass over the same inputs, ``[M]`` fp32 each:
    ``lse`` and ``entropy`` (of the transformed logits). A gradient pass given them skips its statistics."""

    lse: torch.Tensor
    entropy: torch.Tensor


@dataclass(frozen=True)
class PassRequest:
    """One pass over ``M`` counted tokens, gathered and contiguous.

    ``hidden`` ``[M, H]`` and ``weight`` ``[V, H]`` (and ``bias`` ``[V]``) share the compute dtype; ``target``
    is int64 ``[M]`` in ``[0, V)`` (for the backends' ``slice_*`` functions, where ``weight`` is one slice of a
    larger vocabulary, relative to the slice's first row and possibly outside it). ``coef`` (float32 ``[M]``) is the per-token gradient coefficient (see
    :mod:`fused_wce.loss_math`), divided by the power-of-two scale the caller applies to the gradients
    afterwards; None means stats only, no gradients. ``need_*`` select which gradients.

    ``grad_hidden_dtype`` / ``grad_weight_dtype``: the dtypes of the caller's hidden and weight before the cast
    to the compute dtype (fp32 master weights under autocast get their fp32 gradient straight from the pass).

    ``entropy_coef`` (float32 ``[M]``, scaled like ``coef``; needs ``coef``) adds the gradient of
    ``sum_i entropy_coef_i * entropy_i`` (:func:`fused_wce.loss_math.softmax_grad_`). ``known``: the rows'
    lse and entropy from an earlier pass (the log-prob backward): the pass computes gradients only, without
    statistics (its result's ``stats`` is None); not with DFT, whose factor needs the target's logit.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    target: torch.Tensor
    options: LossOptions
    grad_hidden_dtype: torch.dtype
    grad_weight_dtype: torch.dtype
    coef: torch.Tensor | None = None
    need_grad_hidden: bool = False
    need_grad_weight: bool = False
    need_grad_bias: bool = False
    entropy_coef: torch.Tensor | None = None
    known: KnownRowStats | None = None

    def __post_init__(self):
        if self.entropy_coef is not None and self.coef is None:
            raise ValueError("a pass with entropy_coef needs coef (zeros when only the entropy has a gradient)")
        if self.known is not None and (self.coef is None or self.options.dft):
            raise ValueError("known row statistics serve a gradient pass without DFT")

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def wants_gradients(self) -> bool:
        return self.coef is not None

    @property
    def lean(self) -> bool:
        """Whether ``grad_weight`` comes from vocabulary slabs (``lean_memory`` with a non-fp32 weight)."""
        return (self.wants_gradients and self.need_grad_weight
                and self.options.lean_applies(self.grad_weight_dtype))


class Gradients(NamedTuple):
    """``grad_hidden`` ``[M, H]`` in ``grad_hidden_dtype``; ``grad_weight`` ``[V, H]`` in float32 (accumulated
    over token chunks), or in ``grad_weight_dtype`` in lean mode; ``grad_bias`` ``[V]`` float32. None when not
    requested. All in the units of the request's scaled ``coef``."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass(frozen=True)
class PassResult:
    """Per-token stats ``[M]`` of the counted tokens (None when the request's were known) and the requested
    gradients."""

    stats: TokenStats | None
    gradients: Gradients


def uninitialized(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for buffers a pass must write in full; the tests swap in a NaN-filled allocation
    (poison) so that an element a kernel forgot to write shows up as a wrong result."""
    return torch.empty(*shape, dtype=dtype, device=device)


def allocate_gradients(request: PassRequest, *, zero: bool = False) -> Gradients:
    """The requested gradient buffers: uninitialised (a backend's first token chunk or vocabulary slab writes
    them without a memset) unless ``zero`` (a pass over zero tokens returns zero gradients)."""
    allocate = torch.zeros if zero else uninitialized
    device = request.hidden.device
    m, h = request.hidden.shape
    v = request.vocab_size
    wants = request.wants_gradients

    def buffer(needed: bool, *shape: int, dtype: torch.dtype) -> torch.Tensor | None:
        return allocate(*shape, dtype=dtype, device=device) if wants and needed else None

    return Gradients(
        hidden=buffer(request.need_grad_hidden, m, h, dtype=request.grad_hidden_dtype),
        weight=buffer(request.need_grad_weight, v, h,
                      dtype=request.options.weight_grad_dtype(request.grad_weight_dtype)),
        bias=buffer(request.need_grad_bias and request.bias is not None, v, dtype=torch.float32),
    )


def empty_pass(request: PassRequest) -> PassResult:
    """A pass over zero tokens: empty stats, zero gradients (the loss stays connected to the graph)."""
    def empty(dtype=torch.float32):  # distinct tensors: the op's outputs must not alias one another
        return request.hidden.new_zeros(0, dtype=dtype)

    stats = None if request.known is not None else TokenStats(
        empty(), empty(), empty(), empty(torch.bool), empty() if request.options.has_z_loss else None)
    return PassResult(stats, allocate_gradients(request, zero=True))


class TokenStatBuffers(NamedTuple):
    """The per-token outputs a backend fills, ``[M]`` each: fp32 except ``is_top1`` (``top1_dtype``)."""

    token_loss: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor
    z_term: torch.Tensor | None

    @classmethod
    def allocate(cls, request: PassRequest, top1_dtype: torch.dtype) -> TokenStatBuffers:
        m, device = request.num_tokens, request.hidden.device
        token_loss, lse, entropy = (uninitialized(m, dtype=torch.float32, device=device) for _ in range(3))
        z_term = uninitialized(m, dtype=torch.float32, device=device) if request.options.has_z_loss else None
        return cls(token_loss, lse, entropy, uninitialized(m, dtype=top1_dtype, device=device), z_term)

    def rows(self, rows: slice) -> TokenStatBuffers:
        return TokenStatBuffers(*(None if t is None else t[rows] for t in self))

    def finish(self) -> TokenStats:
        return TokenStats(self.token_loss, self.lse, self.entropy, self.is_top1.bool(), self.z_term)
