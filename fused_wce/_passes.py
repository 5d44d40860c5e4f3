"""What one pass over the counted tokens computes, independent of the backend that runs it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .loss_math import PLAIN, LossVariant, TokenStats

# Memory budget of a pass's [chunk, V] temporaries: chunk_size = budget // (V * bytes per logit row element).
# On a GPU, 256 MiB keeps Llama-3's V=128256 at 1024 bf16 rows per chunk (enough rows for the grad_hidden GEMM
# to fill the machine) while staying far below the N * V logits the pass replaces (16384 tokens: 4 GiB in bf16).
DEFAULT_CHUNK_BUDGET_BYTES = 256 * 2**20
# lean_memory trades FLOPs for memory; its chunks and vocabulary slabs get a quarter of the budget, so that at
# Llama-3-8B (16384 tokens) its peak stays at or below Liger-Kernel's default (see benchmarks/NOTES.md).
LEAN_BUDGET_DIVISOR = 4
# CPU GEMMs reach their rate with ~100 rows, and host memory is what CPU users run out of (docs/design.md has
# the measured peak RSS per budget).
CPU_CHUNK_BUDGET_BYTES = 32 * 2**20


@dataclass
class PassRequest:
    """One pass over ``M`` counted tokens, gathered and contiguous.

    ``hidden`` ``[M, H]`` and ``weight`` ``[V, H]`` (and ``bias`` ``[V]``) share a float dtype; ``target`` is
    int64 ``[M]`` in ``[0, V)``. ``coef`` (float32 ``[M]``) is the per-token gradient coefficient (see
    :mod:`fused_wce.loss_math`); None means stats only, no gradients. ``need_*`` select which gradients.
    ``variant`` selects the loss (label smoothing, z-loss, softcap, logit scale, DFT).

    ``grad_hidden_dtype`` / ``grad_weight_dtype``: the dtypes of the caller's hidden and weight before the cast
    to the compute dtype (fp32 master weights under autocast get their fp32 gradient straight from the pass).
    ``lean_memory``: compute ``grad_weight`` one vocabulary slab at a time over all tokens, written straight in
    ``grad_weight_dtype``, instead of accumulating an fp32 ``[V, H]`` over token chunks (see docs/design.md).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    target: torch.Tensor
    coef: torch.Tensor | None = None
    need_grad_hidden: bool = False
    need_grad_weight: bool = False
    need_grad_bias: bool = False
    chunk_size: int | None = None
    variant: LossVariant = PLAIN
    grad_hidden_dtype: torch.dtype | None = None
    grad_weight_dtype: torch.dtype | None = None
    lean_memory: bool = False

    def __post_init__(self):
        if self.grad_hidden_dtype is None:
            self.grad_hidden_dtype = self.hidden.dtype
        if self.grad_weight_dtype is None:
            self.grad_weight_dtype = self.weight.dtype


@dataclass
class PassResult:
    """Outputs of a pass: per-token stats ``[M]``; ``grad_hidden`` ``[M, H]`` in ``grad_hidden_dtype``;
    ``grad_weight`` ``[V, H]`` in float32 (accumulated over token chunks), or in ``grad_weight_dtype`` with
    ``lean_memory``; ``grad_bias`` ``[V]`` float32; None when not requested."""

    stats: TokenStats
    grad_hidden: torch.Tensor | None = None
    grad_weight: torch.Tensor | None = None
    grad_bias: torch.Tensor | None = None


def uninitialized(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for buffers a pass must write in full; the tests swap in a NaN-filled allocation
    (poison) so that an element a kernel forgot to write shows up as a wrong result."""
    return torch.empty(*shape, dtype=dtype, device=device)


def weight_grad_dtype(request: PassRequest) -> torch.dtype:
    """The dtype a pass forms ``grad_weight`` in: float32, or the weight's own dtype in lean mode."""
    return request.grad_weight_dtype if request.lean_memory else torch.float32


def allocate_gradients(request: PassRequest, *, zero: bool = False) -> PassResult:
    """The result's gradient buffers (stats are filled by the backend).

    Uninitialised (a backend's first token chunk or vocabulary slab writes them without a memset) unless
    ``zero``: a pass over zero tokens returns zero gradients.
    """
    m, h = request.hidden.shape
    v = request.weight.shape[0]
    device = request.hidden.device
    wants = request.coef is not None
    allocate = torch.zeros if zero else uninitialized
    return PassResult(
        stats=None,  # type: ignore[arg-type]
        grad_hidden=allocate(m, h, dtype=request.grad_hidden_dtype, device=device)
        if wants and request.need_grad_hidden else None,
        grad_weight=allocate(v, h, dtype=weight_grad_dtype(request), device=device)
        if wants and request.need_grad_weight else None,
        grad_bias=allocate(v, dtype=torch.float32, device=device)
        if wants and request.need_grad_bias and request.bias is not None else None,
    )


def chunk_rows(request: PassRequest, bytes_per_element: int, multiple: int = 1, *, cpu_budget: bool = False,
               lean: bool = False) -> int:
    """Tokens per chunk: the request's, or the budget's, rounded down to ``multiple``, at least 1.

    The budget is ``DEFAULT_CHUNK_BUDGET_BYTES`` for the Triton path (GPU, or its interpreter) and
    ``CPU_CHUNK_BUDGET_BYTES`` for the PyTorch path on CPU tensors, divided by ``LEAN_BUDGET_DIVISOR`` in lean
    mode. (A vocabulary slab of lean mode spends the same bytes as a chunk: ``S = rows * V // M`` columns.)
    """
    if request.chunk_size is not None:
        return request.chunk_size
    vocab_size = request.weight.shape[0]
    budget = CPU_CHUNK_BUDGET_BYTES if cpu_budget else DEFAULT_CHUNK_BUDGET_BYTES
    if lean:
        budget //= LEAN_BUDGET_DIVISOR
    rows = budget // (vocab_size * bytes_per_element)
    if rows >= multiple:
        rows -= rows % multiple
    return max(1, rows)
