"""The Triton path: drives the kernels of :mod:`fused_wce.kernels` over the counted tokens.

**Statistics only** (no gradient wanted, and the forward of ``reduction="none"``): one ``vocab_partials``
launch over all counted tokens with the vocabulary split across programs (grouped program order, so programs
that read the same weight tiles run together), then ``combine``. Logit tiles live only in registers; memory is
three ``[splits, M]`` fp32 summaries. ``2 M H V`` FLOPs.

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

**Known statistics** (``request.known``, the log-prob backward): the same loops, with each chunk's ``dlogits``
formed from the given lse and entropy (``logit_rows`` in its known-lse mode reads each fp32 row once; the tiled
plan skips ``combine``), and no per-token outputs. An entropy coefficient (``request.entropy_coef``) adds the
entropy's gradient in either kernel (their ``HAS_ENTROPY_GRAD`` specialisation).
"""
from __future__ import annotations

import triton
import torch

from .. import budget, passes
from ..kernels import combine, configs_for, logit_rows, softmax_grad, vocab_partials
from ..kernels.configs import multiprocessor_count
from ..loss_math import dft_factor
from ..passes import Gradients, KnownRowStats, PassRequest, PassResult, TokenStatBuffers, allocate_gradients
from .gemm import matmul_into

# The plan "auto" selects for the gradient pass (benchmarks/NOTES.md has the measurement behind it).
DEFAULT_LOGITS_GEMM = "cublas"


def run_pass(request: PassRequest) -> PassResult:
    hidden = request.hidden if request.hidden.stride(1) == 1 else request.hidden.contiguous()
    # The kernels read rows of H (and the bias) with unit stride; a transposed or sliced weight is copied once.
    weight = request.weight if request.weight.stride(1) == 1 else request.weight.contiguous()
    bias = None if request.bias is None else request.bias.contiguous()
    if not request.wants_gradients:
        stats = TokenStatBuffers.allocate(request, torch.int8)
        _stats_pass(request, hidden, weight, bias, stats)
        return PassResult(stats.finish(), allocate_gradients(request))
    plan_name = request.options.logits_gemm
    if plan_name == "auto":
        plan_name = DEFAULT_LOGITS_GEMM
    plan = PLANS[plan_name](request, hidden, weight, bias)
    gradients = allocate_gradients(request)
    if request.known is not None:  # gradients only, from the known lse and entropy
        if not (request.lean and gradients.hidden is None and gradients.bias is None):  # (lean: dW from slabs)
            _chunk_loop(plan, request, request.coef, None, gradients)
        if request.lean:
            _slab_loop(plan, request, request.known, request.coef, gradients.weight)
        return PassResult(None, gradients)
    stats = TokenStatBuffers.allocate(request, torch.int8)
    # The plans scale each chunk's coefficients by DFT's factor in place; lean mode's slabs read them again.
    coef = request.coef.clone() if request.options.dft else request.coef
    _chunk_loop(plan, request, coef, stats, gradients)
    if request.lean:
        _slab_loop(plan, request, KnownRowStats(stats.lse, stats.entropy), coef, gradients.weight)
    return PassResult(stats.finish(), gradients)


# ------------------------------------------------------------------------------------------- statistics only
def _stats_pass(request: PassRequest, hidden, weight, bias, stats: TokenStatBuffers) -> None:
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
    target_logit = passes.uninitialized(request.num_tokens, dtype=torch.float32, device=device)
    vocab_partials(hidden, weight, bias, request.target, partials, target_logit, None, tiles_per_split, config,
                   options=options)
    combine(partials, target_logit, stats, configs.combine, options=options, vocab_size=request.vocab_size)
    if options.dft:
        _apply_dft(stats, dft_factor(stats.lse, target_logit))


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


def _slab_loop(plan, request: PassRequest, row_stats: KnownRowStats, coef: torch.Tensor,
               grad_weight: torch.Tensor) -> None:
    """Lean mode: ``grad_weight`` from vocabulary slabs ``[M, S]`` of all ``M`` tokens, given their ``lse`` (and
    entropy);
    each slab's rows are one fp32-output GEMM over every token, rounded once into the weight's dtype."""
    vocab_size, width = request.vocab_size, plan.slab_width
    product = passes.uninitialized(min(width, vocab_size), plan.hidden.shape[1], dtype=torch.float32,
                            device=plan.hidden.device)
    for first in range(0, vocab_size, width):
        slab = slice(first, min(first + width, vocab_size))
        dlogits = plan.slab_dlogits(slab, row_stats, coef)
        rows = product[: slab.stop - slab.start]
        matmul_into(dlogits.T, plan.hidden, rows, accumulate=False)
        grad_weight[slab].copy_(rows)


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

    def __init__(self, request: PassRequest, hidden, weight, bias):
        self.request, self.options = request, request.options
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.device = hidden.device
        self.configs = configs_for(self.device, hidden.dtype)
        self.vocab_size = request.vocab_size
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
                                              multiple=self.slab_multiple, extra_rows=extra_rows) if request.lean else 0
        self.buffer_rows = max(self.rows, -(-request.num_tokens * self.slab_width // self.vocab_size))

    def entropy_coef(self, rows: slice) -> torch.Tensor | None:
        """The rows' entropy coefficients, or None when the request has none."""
        entropy_coef = self.request.entropy_coef
        return None if entropy_coef is None else entropy_coef[rows]


class CublasPlan(_Plan):
    """cuBLAS logits into an fp32 chunk buffer, one ``logit_rows`` kernel for everything per row."""

    buffer_bytes = 4

    def __init__(self, request: PassRequest, hidden, weight, bias):
        super().__init__(request, hidden, weight, bias)
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
                       num_classes=self.vocab_size, entropy_coef=entropy_coef, entropy=known.entropy[chunk])
            return dlogits
        logit_rows(logits, dlogits, self.bias, target, coef, stats.lse, self.config,
                   options=self.options, num_classes=self.vocab_size, stats=stats,
                   coef_out=coef if self.options.dft else None, entropy_coef=entropy_coef)
        return dlogits

    def slab_dlogits(self, slab: slice, row_stats: KnownRowStats, coef: torch.Tensor) -> torch.Tensor:
        # The chunk buffer: a slab [M, S] spends the elements of a chunk (budget.slab_columns).
        logits, dlogits = self._logits(self.hidden, self.weight[slab], self.buffer)
        logit_rows(logits, dlogits, None if self.bias is None else self.bias[slab], self.request.target - slab.start,
                   coef, row_stats.lse, self.config, options=self.options, num_classes=self.vocab_size,
                   entropy_coef=self.request.entropy_coef, entropy=row_stats.entropy)
        return dlogits


class TritonPlan(_Plan):
    """``vocab_partials`` stores tile-relative logits in the compute dtype; ``combine``; ``softmax_grad``."""

    def __init__(self, request: PassRequest, hidden, weight, bias):
        options = request.options
        configs = configs_for(hidden.device, hidden.dtype)
        self.vocab_config = configs.vocab_config(softcap=options.has_softcap, label_smoothing=options.has_smoothing)
        self.row_multiple = self.vocab_config.block_m
        self.slab_multiple = self.vocab_config.block_n
        super().__init__(request, hidden, weight, bias)
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

    def _softmax_grad(self, logits, partials, row_stats: KnownRowStats, target, coef, entropy_coef):
        softmax_grad(logits, partials[0], row_stats.lse, target, coef, self.configs.softmax_grad,
                     self.vocab_config.block_n, options=self.options, num_classes=self.vocab_size,
                     entropy=row_stats.entropy, entropy_coef=entropy_coef)
        return logits

    def chunk_dlogits(self, chunk: slice, stats: TokenStatBuffers | None, coef: torch.Tensor) -> torch.Tensor:
        target, target_logit = self.request.target[chunk], self.target_logit[chunk]
        logits, partials = self._store_logits(self.hidden[chunk], self.weight, self.bias, target, target_logit)
        if stats is None:  # known statistics: no combine
            known = self.request.known
            row_stats = KnownRowStats(known.lse[chunk], known.entropy[chunk])
            return self._softmax_grad(logits, partials, row_stats, target, coef, self.entropy_coef(chunk))
        combine(partials, target_logit, stats, self.configs.combine, options=self.options,
                vocab_size=self.vocab_size)
        if self.options.dft:
            factor = dft_factor(stats.lse, target_logit)
            _apply_dft(stats, factor)
            coef.mul_(factor)
        return self._softmax_grad(logits, partials, KnownRowStats(stats.lse, stats.entropy), target, coef,
                                  self.entropy_coef(chunk))

    def slab_dlogits(self, slab: slice, row_stats: KnownRowStats, coef: torch.Tensor) -> torch.Tensor:
        target = self.request.target - slab.start
        scratch = torch.empty_like(self.target_logit)  # the slab's target logits are not needed again
        logits, partials = self._store_logits(self.hidden, self.weight[slab],
                                              None if self.bias is None else self.bias[slab], target, scratch)
        return self._softmax_grad(logits, partials, row_stats, target, coef, self.request.entropy_coef)


PLANS = {"cublas": CublasPlan, "triton": TritonPlan}
