"""The Triton path: drives the kernels of :mod:`fused_wce.kernels` over the counted tokens.

**Statistics only** (no gradient wanted, and the forward of ``reduction="none"`` and of the log-probs): by
default (``logits_gemm`` "auto" or "triton") one ``vocab_partials`` launch over all counted tokens with the
vocabulary split across programs (grouped program order, so programs that read the same weight tiles run
together), then ``combine``. Logit tiles live only in registers; memory is three ``[splits, M]`` fp32
summaries. ``2 M H V`` FLOPs. With ``logits_gemm="cublas"`` the statistics pass runs the cuBLAS plan's chunk
loop without gradients instead: per chunk, cuBLAS writes fp32 ``[C, V]`` logits (the budget's bytes in fp32)
and ``logit_rows`` reads each row once for every per-token output (cuBLAS's GEMM rate, for one fp32 write and
read of the logits).

**With gradients**, per chunk of ``C`` tokens, one of two plans (``LossOptions.logits_gemm``) produces the
chunk's ``dlogits`` ``[C, V]`` in the compute dtype:

- ``"cublas"``: ``torch.mm(x, W.T, out_dtype=float32)`` writes the chunk's raw logits into an fp32 ``[C, V]``
  buffer (cuBLAS's GEMM rate, fp32-accurate logits), then ``logit_rows`` reads each row twice: the online
  logsumexp and every per-token output, then ``dlogits`` written in place (a 2-byte ``dlogits`` row occupies the
  first half of its fp32 row, so no second buffer exists);
- ``"triton"``: ``vocab_partials`` stores tile-relative logits in the compute dtype with one summary per
  vocabulary tile, ``combine`` gives lse and the stats, ``softmax_grad`` turns the buffer into ``dlogits`` in
  place.

Then two cuBLAS GEMMs fold ``dlogits`` into ``grad_hidden`` (``dlogits @ W``) and the fp32 ``grad_weight``
(``dlogits.T @ X``, fp32 output accumulated over chunks; the first chunk writes it, no memset). ``6 M H V``
FLOPs; the buffer is bounded by the chunk budget, independent of ``M``.

**Lean memory** (``request.lean``): the chunk loop computes everything but ``grad_weight``; then per vocabulary
slab ``[v0, v1)`` of all ``M`` tokens the plan recomputes the slab's ``dlogits`` with the lse the chunks found,
and ``grad_weight[v0:v1] = dlogits.T @ X`` is one GEMM with fp32 output, rounded once into the weight's dtype.
No fp32 ``[V, H]`` exists; ``8 M H V`` FLOPs. Both loops spend a quarter of the chunk budget.

**One vocabulary slice** (a rank of the vocabulary-parallel loss, :mod:`fused_wce.vocab_parallel`):
``slice_summaries`` is the statistics pass without ``combine`` (the splits' summaries merged in PyTorch, left
unfinished for the other slices); ``slice_gradients`` is the slab loop with every row's lse known, giving
``grad_weight`` and ``grad_bias`` of the slice's rows and its part of ``grad_hidden`` (fp32).

**Known statistics** (``request.known``, the log-prob backward): the same loops, with each chunk's ``dlogits``
formed from the given lse and entropy (``logit_rows`` in its known-lse mode reads each fp32 row once; the tiled
plan skips ``combine``), and no per-token outputs. An entropy coefficient (``request.entropy_coef``) adds the
entropy's gradient in either kernel (their ``HAS_ENTROPY_GRAD`` specialisation).
"""
from __future__ import annotations

import dataclasses

import triton
import torch

from .. import budget, passes
from ..kernels import combine, configs_for, logit_rows, softmax_grad, vocab_partials
from ..kernels.configs import multiprocessor_count
from ..loss_math import SliceSummary, dft_factor, merge_stacked_summaries
from ..passes import Gradients, PassRequest, PassResult, TokenStatBuffers, allocate_gradients
from .gemm import matmul_into

# The plan "auto" selects for the gradient pass (benchmarks/NOTES.md has the measurement behind it) and for the
# statistics-only pass (the register-tiled kernel, which writes no logits).
DEFAULT_LOGITS_GEMM = "cublas"
DEFAULT_STATS_GEMM = "triton"


def run_pass(request: PassRequest) -> PassResult:
    hidden, weight, bias = _kernel_inputs(request)
    if not request.wants_gradients:
        stats = TokenStatBuffers.allocate(request, torch.int8)
        stats_pass = _cublas_stats_pass if _plan_name(request, DEFAULT_STATS_GEMM) == "cublas" else _stats_pass
        stats_pass(request, hidden, weight, bias, stats)
        return PassResult(stats.finish(), allocate_gradients(request))
    plan = _plan_class(request)(request, hidden, weight, bias)
    gradients = allocate_gradients(request)
    if request.known is not None:  # gradients only, from the known lse and entropy
        known = request.known
        if not (request.lean and gradients.hidden is None and gradients.bias is None):  # (lean: dW from slabs)
            _chunk_loop(plan, request, request.coef, None, gradients)
        if request.lean:
            _slab_loop(plan, request, known.lse, request.coef, gradients.weight, entropy=known.entropy)
        return PassResult(None, gradients)
    stats = TokenStatBuffers.allocate(request, torch.int8)
    # The plans scale each chunk's coefficients by DFT's factor in place; lean mode's slabs read them again.
    coef = request.coef.clone() if request.options.dft else request.coef
    _chunk_loop(plan, request, coef, stats, gradients)
    if request.lean:
        _slab_loop(plan, request, stats.lse, coef, gradients.weight, entropy=stats.entropy)
    return PassResult(stats.finish(), gradients)


def _kernel_inputs(request: PassRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hidden, weight and bias as the kernels read them: rows of H (and the bias) with unit stride; a
    transposed or sliced weight is copied once."""
    hidden = request.hidden if request.hidden.stride(1) == 1 else request.hidden.contiguous()
    weight = request.weight if request.weight.stride(1) == 1 else request.weight.contiguous()
    bias = None if request.bias is None else request.bias.contiguous()
    return hidden, weight, bias


def _plan_class(request: PassRequest):
    return PLANS[_plan_name(request, DEFAULT_LOGITS_GEMM)]


def _plan_name(request: PassRequest, auto: str) -> str:
    """The request's ``logits_gemm``, with ``auto`` for "auto"."""
    plan_name = request.options.logits_gemm
    return auto if plan_name == "auto" else plan_name


# ------------------------------------------------------------------------------------------- statistics only
def _stats_pass(request: PassRequest, hidden, weight, bias, stats: TokenStatBuffers) -> None:
    options = request.options
    target_logit = passes.uninitialized(request.num_tokens, dtype=torch.float32, device=hidden.device)
    partials, configs = _split_partials(request, hidden, weight, bias, target_logit)
    combine(partials, target_logit, stats, configs.combine, options=options, vocab_size=request.vocab_size)
    if options.dft:
        _apply_dft(stats, dft_factor(stats.lse, target_logit))


def _cublas_stats_pass(request: PassRequest, hidden, weight, bias, stats: TokenStatBuffers) -> None:
    """The statistics through cuBLAS: per chunk of rows (the budget's ``[C, V]`` in fp32), the raw fp32 logits
    from one GEMM, then ``logit_rows`` without a gradient (one read of each row: lse, loss, entropy, top-1,
    z term, DFT's factor)."""
    vocab_size, num_tokens, device = request.vocab_size, request.num_tokens, hidden.device
    spend = budget.budget_bytes(cpu=False, lean=request.lean)
    rows = request.options.chunk_size or budget.chunk_rows(vocab_size, 4, budget=spend,
                                                           multiple=CublasPlan.row_multiple)
    rows = max(1, min(rows, num_tokens))
    buffer = passes.uninitialized(rows * vocab_size, dtype=torch.float32, device=device)
    config = configs_for(device, hidden.dtype).logit_rows
    for start in range(0, num_tokens, rows):
        chunk = slice(start, min(start + rows, num_tokens))
        logits = buffer[: (chunk.stop - start) * vocab_size].view(-1, vocab_size)
        matmul_into(hidden[chunk], weight.T, logits, accumulate=False)
        chunk_stats = stats.rows(chunk)
        logit_rows(logits, None, bias, request.target[chunk], None, chunk_stats.lse, config,
                   options=request.options, num_classes=vocab_size, stats=chunk_stats)


def _split_partials(request: PassRequest, hidden, weight, bias, target_logit: torch.Tensor):
    """One ``vocab_partials`` launch over all rows, the vocabulary split so that the programs fill the device:
    ``([S, M] fp32 summaries, one per options.num_summaries), configs``; ``target_logit`` is written where a
    row's target lies in ``[0, V)``."""
    options, device = request.options, hidden.device
    configs = configs_for(device, hidden.dtype)
    config = configs.vocab_config(softcap=options.has_softcap, label_smoothing=options.has_smoothing)
    num_tiles = triton.cdiv(request.vocab_size, config.block_n)
    row_blocks = triton.cdiv(request.num_tokens, config.block_m)
    wanted_splits = triton.cdiv(configs.target_programs_per_sm * multiprocessor_count(device), row_blocks)
    tiles_per_split = triton.cdiv(num_tiles, max(1, min(num_tiles, wanted_splits)))
    num_splits = triton.cdiv(num_tiles, tiles_per_split)
    partials = tuple(passes.uninitialized(num_splits, request.num_tokens, dtype=torch.float32, device=device)
                     for _ in range(options.num_summaries))
    vocab_partials(hidden, weight, bias, request.target, partials, target_logit, None, tiles_per_split, config,
                   options=options)
    return partials, configs


# ------------------------------------------------------------------------------------- one vocabulary slice
def slice_summaries(request: PassRequest) -> SliceSummary:
    """The raw summaries of the request's rows over its weight's vocabulary slice (the statistics pass without
    ``combine``): the splits' summaries merged in PyTorch. ``request.target`` is relative to the slice's first
    row (outside ``[0, rows)``: another slice holds it, and the target logit is 0). ``request.coef`` is not
    read."""
    hidden, weight, bias = _kernel_inputs(request)
    target_logit = torch.zeros(request.num_tokens, dtype=torch.float32, device=hidden.device)
    # vocab_partials writes the target logit of any target inside a tile, also past the slice's last column
    # (a masked -inf): a target in another slice becomes -1, which no tile holds.
    target = request.target
    outside = (target < 0) | (target >= request.vocab_size)
    request = dataclasses.replace(request, target=target.masked_fill(outside, -1))
    partials, _ = _split_partials(request, hidden, weight, bias, target_logit)
    sum_logits = partials[3].sum(0) if request.options.has_smoothing else None
    return SliceSummary(*merge_stacked_summaries(*partials[:3]), target_logit, sum_logits)


def slice_gradients(request: PassRequest, lse: torch.Tensor, num_classes: int) -> Gradients:
    """The gradients of the request's vocabulary slice given each row's whole-row ``lse`` and final
    coefficient ``request.coef`` (DFT's factor included); ``num_classes`` is the whole vocabulary's size.
    With ``request.entropy_coef`` the entropy's gradient too, from the whole-row entropy in ``request.known``.

    Vocabulary slabs ``[M, S]`` of all rows (the lean slab loop, with the rows' lse known): each slab's
    ``dlogits`` give its rows of ``grad_weight`` (written once: fp32, or the weight's dtype in lean mode) and
    of ``grad_bias``, and are folded into the fp32-accumulated ``grad_hidden`` (``6 M H S`` FLOPs a slab)."""
    hidden, weight, bias = _kernel_inputs(request)
    plan = _plan_class(request)(request, hidden, weight, bias, num_classes=num_classes, slabs=True)
    gradients = allocate_gradients(request)
    entropy = None if request.known is None else request.known.entropy
    _slab_loop(plan, request, lse, request.coef, gradients.weight, gradients.hidden, gradients.bias, entropy=entropy)
    return gradients


def _apply_dft(stats: TokenStatBuffers, factor: torch.Tensor) -> None:
    """DFT: scale the rows' loss (and z term) by the detached ``p(target)``."""
    stats.token_loss.mul_(factor)
    if stats.z_term is not None:
        stats.z_term.mul_(factor)


# ------------------------------------------------------------------------------------------ gradient loops
def _chunk_loop(plan, request: PassRequest, coef: torch.Tensor, stats: TokenStatBuffers | None,
                gradients: Gradients) -> None:
    """Per chunk: the plan's ``dlogits`` (and the chunk's stats, unless they are known: ``stats`` None), folded
    into the gradients."""
    hidden, num_tokens = plan.hidden, request.num_tokens
    for start in range(0, num_tokens, plan.rows):
        chunk = slice(start, min(start + plan.rows, num_tokens))
        dlogits = plan.chunk_dlogits(chunk, None if stats is None else stats.rows(chunk), coef[chunk])
        first = start == 0  # the first chunk writes the accumulators: no memset
        if gradients.hidden is not None:
            matmul_into(dlogits, plan.weight, gradients.hidden[chunk], accumulate=False)
        if gradients.weight is not None and not request.lean:
            matmul_into(dlogits.T, hidden[chunk], gradients.weight, accumulate=not first)
        if gradients.bias is not None:
            if first:
                torch.sum(dlogits, 0, dtype=torch.float32, out=gradients.bias)
            else:
                gradients.bias.add_(dlogits.sum(0, dtype=torch.float32))


def _slab_loop(plan, request: PassRequest, lse: torch.Tensor, coef: torch.Tensor, grad_weight: torch.Tensor | None,
               grad_hidden: torch.Tensor | None = None, grad_bias: torch.Tensor | None = None, *,
               entropy: torch.Tensor | None = None) -> None:
    """``grad_weight`` from vocabulary slabs ``[M, S]`` of all ``M`` tokens, given their ``lse`` (lean mode,
    and one vocabulary slice's whole gradient pass): each slab's rows are one fp32-output GEMM over every token,
    rounded once into the weight's dtype; with ``grad_hidden`` (fp32 ``[M, H]``) and ``grad_bias``, the slabs'
    ``dlogits @ weight[slab]`` and column sums go there too. ``entropy`` (the rows' whole-row entropy) serves
    the request's entropy coefficients."""
    vocab_size, width = request.vocab_size, plan.slab_width
    product = None
    if grad_weight is not None and grad_weight.dtype != torch.float32:
        product = passes.uninitialized(min(width, vocab_size), plan.hidden.shape[1], dtype=torch.float32,
                                       device=plan.hidden.device)
    for first in range(0, vocab_size, width):
        slab = slice(first, min(first + width, vocab_size))
        dlogits = plan.slab_dlogits(slab, lse, coef, entropy)
        if grad_weight is not None:
            rows = grad_weight[slab] if product is None else product[: slab.stop - slab.start]
            matmul_into(dlogits.T, plan.hidden, rows, accumulate=False)
            if product is not None:
                grad_weight[slab].copy_(rows)
        if grad_hidden is not None:
            matmul_into(dlogits, plan.weight[slab], grad_hidden, accumulate=first > 0)
        if grad_bias is not None:
            torch.sum(dlogits, 0, dtype=torch.float32, out=grad_bias[slab])


class _Plan:
    """What both gradient plans share: the inputs, configs and the chunk size.

    Both plans take the same rows per chunk: the budget's ``[C, V]`` logits in the compute dtype (the cuBLAS
    plan holds them in fp32, twice the bytes for 2-byte inputs: its ``dW`` GEMM needs ~1024 rows per chunk to
    stay compute-bound, since each chunk reads and writes the fp32 ``[V, H]`` accumulator once). Lean mode
    has no such accumulator: its chunks and slabs hold the (quarter) budget's bytes in the buffer's own dtype.
    """

    row_multiple = 128
    slab_multiple = 1
    buffer_bytes = 0  # bytes per element of the [C, V] buffer (0: the compute dtype's)

    def __init__(self, request: PassRequest, hidden, weight, bias, *, num_classes: int | None = None,
                 slabs: bool | None = None):
        self.request, self.options = request, request.options
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.device = hidden.device
        self.configs = configs_for(self.device, hidden.dtype)
        self.vocab_size = request.vocab_size
        # The whole vocabulary's size (label smoothing's eps / V): the weight's rows unless they are one slice.
        self.num_classes = num_classes or self.vocab_size
        slabs = request.lean if slabs is None else slabs  # whether vocabulary slabs [M, S] are computed
        spend = budget.budget_bytes(cpu=False, lean=request.lean)
        bytes_per_row_element = (self.buffer_bytes or hidden.element_size()) if request.lean else hidden.element_size()
        rows = request.options.chunk_size or budget.chunk_rows(self.vocab_size, bytes_per_row_element, budget=spend,
                                                               multiple=self.row_multiple)
        self.rows = max(1, min(rows, request.num_tokens))
        # Lean mode's vocabulary slabs [M, S] reuse the chunk buffers: about the same elements, more when S is
        # rounded up to a whole vocabulary tile.
        # (the slab's fp32 [S, H] weight-gradient block counts against the same elements)
        extra_rows = 4 * hidden.shape[1] // (self.buffer_bytes or hidden.element_size())
        self.slab_width = budget.slab_columns(request.num_tokens, self.vocab_size, self.rows,
                                              multiple=self.slab_multiple, extra_rows=extra_rows) if slabs else 0
        self.buffer_rows = max(self.rows, -(-request.num_tokens * self.slab_width // self.vocab_size))

    def entropy_coef(self, rows: slice) -> torch.Tensor | None:
        """The rows' entropy coefficients, or None when the request has none."""
        entropy_coef = self.request.entropy_coef
        return None if entropy_coef is None else entropy_coef[rows]


class CublasPlan(_Plan):
    """cuBLAS logits into an fp32 chunk buffer, one ``logit_rows`` kernel for everything per row."""

    buffer_bytes = 4

    def __init__(self, request: PassRequest, hidden, weight, bias, **plan_options):
        super().__init__(request, hidden, weight, bias, **plan_options)
        self.config = self.configs.logit_rows
        self.buffer = passes.uninitialized(self.buffer_rows * self.vocab_size, dtype=torch.float32,
                                           device=self.device)

    def _logits(self, x: torch.Tensor, weight: torch.Tensor, storage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw fp32 logits ``x @ weight.T`` in ``storage``, and the ``dlogits`` view of the same storage in the
        compute dtype (a 2-byte row in the first half of its fp32 row)."""
        rows, columns = x.shape[0], weight.shape[0]
        logits = storage[: rows * columns].view(rows, columns)
        matmul_into(x, weight.T, logits, accumulate=False)
        if x.dtype == torch.float32:
            return logits, logits
        return logits, logits.view(x.dtype)[:, :columns]

    def chunk_dlogits(self, chunk: slice, stats: TokenStatBuffers | None, coef: torch.Tensor) -> torch.Tensor:
        logits, dlogits = self._logits(self.hidden[chunk], self.weight, self.buffer)
        target, entropy_coef = self.request.target[chunk], self.entropy_coef(chunk)
        if stats is None:  # known statistics: one read of each row
            known = self.request.known
            logit_rows(logits, dlogits, self.bias, target, coef, known.lse[chunk], self.config, options=self.options,
                       num_classes=self.num_classes, entropy_coef=entropy_coef, entropy=known.entropy[chunk])
            return dlogits
        logit_rows(logits, dlogits, self.bias, target, coef, stats.lse, self.config,
                   options=self.options, num_classes=self.num_classes, stats=stats,
                   coef_out=coef if self.options.dft else None, entropy_coef=entropy_coef)
        return dlogits

    def slab_dlogits(self, slab: slice, lse: torch.Tensor, coef: torch.Tensor,
                     entropy: torch.Tensor | None = None) -> torch.Tensor:
        # The chunk buffer: a slab [M, S] spends the elements of a chunk (budget.slab_columns).
        logits, dlogits = self._logits(self.hidden, self.weight[slab], self.buffer)
        logit_rows(logits, dlogits, None if self.bias is None else self.bias[slab], self.request.target - slab.start,
                   coef, lse, self.config, options=self.options, num_classes=self.num_classes,
                   entropy_coef=self.request.entropy_coef, entropy=entropy)
        return dlogits


class TritonPlan(_Plan):
    """``vocab_partials`` stores tile-relative logits in the compute dtype; ``combine``; ``softmax_grad``."""

    def __init__(self, request: PassRequest, hidden, weight, bias, **plan_options):
        options = request.options
        configs = configs_for(hidden.device, hidden.dtype)
        self.vocab_config = configs.vocab_config(softcap=options.has_softcap, label_smoothing=options.has_smoothing)
        self.row_multiple = self.vocab_config.block_m
        self.slab_multiple = self.vocab_config.block_n
        super().__init__(request, hidden, weight, bias, **plan_options)
        self.num_tiles = triton.cdiv(self.vocab_size, self.vocab_config.block_n)
        self.buffer = passes.uninitialized(self.buffer_rows * self.vocab_size, dtype=hidden.dtype, device=self.device)
        self.summaries = passes.uninitialized(options.num_summaries, self.num_tiles * self.buffer_rows,
                                              dtype=torch.float32, device=self.device)
        self.target_logit = passes.uninitialized(request.num_tokens, dtype=torch.float32, device=self.device)

    def _store_logits(self, x, weight, bias, target, target_logit):
        """Tile-relative logits of ``x`` against ``weight`` (and their per-tile summaries)."""
        rows, columns = x.shape[0], weight.shape[0]
        tiles = triton.cdiv(columns, self.vocab_config.block_n)
        logits = self.buffer[: rows * columns].view(rows, columns)
        partials = tuple(s[: tiles * rows].view(tiles, rows) for s in self.summaries)
        vocab_partials(x, weight, bias, target, partials, target_logit, logits, 1, self.vocab_config,
                       options=self.options)
        return logits, partials

    def _softmax_grad(self, logits, partials, lse, target, coef, entropy=None, entropy_coef=None):
        softmax_grad(logits, partials[0], lse, target, coef, self.configs.softmax_grad, self.vocab_config.block_n,
                     options=self.options, num_classes=self.num_classes, entropy=entropy, entropy_coef=entropy_coef)
        return logits

    def chunk_dlogits(self, chunk: slice, stats: TokenStatBuffers | None, coef: torch.Tensor) -> torch.Tensor:
        target, target_logit = self.request.target[chunk], self.target_logit[chunk]
        logits, partials = self._store_logits(self.hidden[chunk], self.weight, self.bias, target, target_logit)
        if stats is None:  # known statistics: no combine
            known = self.request.known
            return self._softmax_grad(logits, partials, known.lse[chunk], target, coef, known.entropy[chunk],
                                      self.entropy_coef(chunk))
        combine(partials, target_logit, stats, self.configs.combine, options=self.options,
                vocab_size=self.num_classes)
        if self.options.dft:
            factor = dft_factor(stats.lse, target_logit)
            _apply_dft(stats, factor)
            coef.mul_(factor)
        return self._softmax_grad(logits, partials, stats.lse, target, coef, stats.entropy, self.entropy_coef(chunk))

    def slab_dlogits(self, slab: slice, lse: torch.Tensor, coef: torch.Tensor,
                     entropy: torch.Tensor | None = None) -> torch.Tensor:
        target = self.request.target - slab.start
        scratch = torch.empty_like(self.target_logit)  # the slab's target logits are not needed again
        logits, partials = self._store_logits(self.hidden, self.weight[slab],
                                              None if self.bias is None else self.bias[slab], target, scratch)
        return self._softmax_grad(logits, partials, lse, target, coef, entropy, self.request.entropy_coef)


PLANS = {"cublas": CublasPlan, "triton": TritonPlan}
