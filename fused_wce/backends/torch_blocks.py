"""The PyTorch path (CPU tensors, or ``backend="torch"``): logit blocks ``[C, B]``, two passes.

A pass over ``M`` counted tokens never holds more than two fp32 ``[C, B]`` blocks of logits (``C`` tokens by
``B`` vocabulary columns, sized by :mod:`fused_wce.budget`), however large ``V`` is:

1. **Statistics** (token chunks outer, vocabulary blocks inner): each block's logits ``z`` are summarised as
   ``(m, s, e)`` and merged into the chunk's running summary (:func:`fused_wce.loss_math.merge_tile_summaries`,
   the same online logsumexp the Triton kernels use), with the target's logit and, for label smoothing,
   ``sum z``. This gives every per-token output and, with DFT, the final gradient coefficients.
   ``2 M H V`` FLOPs; it is the whole pass when no gradient is wanted.
2. **Gradients** (vocabulary blocks outer, token chunks inner): each block's logits are recomputed, turned
   into ``dlogits = c (p - onehot) ...`` with the ``lse`` of pass 1, and folded into ``grad_hidden``
   (accumulated over blocks in fp32) and the block's rows of ``grad_weight``, which are complete after the
   block, so they are written once: in fp32, or straight in the weight's dtype with ``lean_memory`` (no
   ``[V, H]`` fp32 accumulator, at no extra cost on this path). ``6 M H V`` more FLOPs, ``8 M H V`` in all.

Recomputing the logits costs a third more FLOPs than keeping ``[C, V]`` rows, and buys two things on a CPU:
the temporaries stay a few MiB, and ``grad_weight`` is never read back and rewritten per token chunk (with
small chunks that read-modify-write of ``V H`` floats dominated the time). Reduced-precision inputs are
multiplied in fp32, upcast one chunk or block at a time (no fp32 copy of the weight).

For one slice of a larger vocabulary (:mod:`fused_wce.vocab_parallel`), ``slice_summaries`` is pass 1 without
finishing the statistics and ``slice_gradients`` is pass 2 given the whole rows' lse.

A request with known row statistics (``request.known``: the log-prob backward, whose forward found them) skips
pass 1. With an entropy coefficient (``request.entropy_coef``) pass 2 also adds the entropy's gradient; with a
softcap as well it holds a third ``[C, B]`` block (the softcap's derivative reads ``z`` after that term).
"""
from __future__ import annotations

import torch

from .. import budget, passes
from ..loss_math import (SliceSummary, apply_dft, dft_factor, finish_token_stats, merge_tile_summaries,
                         softmax_grad_, tile_summary_, transform_logits_)
from ..passes import Gradients, PassRequest, PassResult, TokenStatBuffers, allocate_gradients


class BlockPlan:
    """The inputs and the block geometry of one pass; blocks of the inputs are upcast to fp32 on use.

    ``C`` (``rows``) and ``B`` (``columns``) come from :func:`fused_wce.budget.block_shape` (lean mode gets a
    quarter budget).
    """

    def __init__(self, request: PassRequest, num_classes: int | None = None):
        self.options = request.options
        self.hidden, self.weight, self.bias = request.hidden, request.weight, request.bias
        self.target = request.target
        num_tokens, vocab_size = request.num_tokens, request.vocab_size
        self.vocab_size = vocab_size
        # The whole vocabulary's size (label smoothing's eps / V): the weight's rows unless they are one slice.
        self.num_classes = num_classes or vocab_size
        # The entropy's gradient under a softcap needs a third block (loss_math.softmax_grad_'s scratch).
        third_block = request.entropy_coef is not None and request.options.has_softcap
        spend = budget.budget_bytes(cpu=request.hidden.device.type == "cpu", lean=request.lean)
        self.rows, self.columns = budget.block_shape(
            num_tokens, vocab_size, request.hidden.shape[1], budget=spend, chunk_size=request.options.chunk_size,
            weight_upcast=request.weight.dtype != torch.float32, lean=request.lean, blocks=3 if third_block else 2)
        device = request.hidden.device
        # Flat storage: a partial chunk or block is a contiguous view ([r, c] with row stride c), so the GEMMs
        # write it directly.
        self._logits = passes.uninitialized(self.rows * self.columns, dtype=torch.float32, device=device)
        self._exps = passes.uninitialized(self.rows * self.columns, dtype=torch.float32, device=device)
        self._scratch = (passes.uninitialized(self.rows * self.columns, dtype=torch.float32, device=device)
                         if third_block else None)

    def chunks(self):
        for start in range(0, self.hidden.shape[0], self.rows):
            yield slice(start, min(start + self.rows, self.hidden.shape[0]))

    def blocks(self):
        for start in range(0, self.vocab_size, self.columns):
            yield slice(start, min(start + self.columns, self.vocab_size))

    def hidden32(self, rows: slice) -> torch.Tensor:
        return self.hidden[rows].float()

    def weight32(self, block: slice) -> torch.Tensor:
        return self.weight[block].float()

    def block_logits(self, hidden32: torch.Tensor, weight32: torch.Tensor, block: slice) -> torch.Tensor:
        """``z = transform(hidden32 @ weight32.T + bias[block])`` (fp32 rows of a chunk and of a block) in the
        first buffer."""
        shape = (hidden32.shape[0], weight32.shape[0])
        out = self._logits[: shape[0] * shape[1]].view(shape)
        if self.bias is None:
            torch.mm(hidden32, weight32.T, out=out)
        else:
            torch.addmm(self.bias[block].float(), hidden32, weight32.T, out=out)
        return transform_logits_(out, self.options)

    def exps_like(self, logits: torch.Tensor) -> torch.Tensor:
        return self._exps[: logits.numel()].view(logits.shape)

    def scratch_like(self, logits: torch.Tensor) -> torch.Tensor | None:
        return None if self._scratch is None else self._scratch[: logits.numel()].view(logits.shape)


def run_pass(request: PassRequest) -> PassResult:
    plan = BlockPlan(request)
    gradients = allocate_gradients(request)
    if request.known is not None:  # gradients only, from the known lse and entropy
        _gradients(plan, request.known.lse, request.coef, gradients, entropy=request.known.entropy,
                   entropy_coef=request.entropy_coef)
        return PassResult(None, gradients)
    stats = TokenStatBuffers.allocate(request, torch.bool)
    coef = None if request.coef is None else request.coef.clone() if request.options.dft else request.coef
    for rows in plan.chunks():
        _chunk_statistics(plan, rows, stats.rows(rows), None if coef is None else coef[rows])
    if request.wants_gradients:
        _gradients(plan, stats.lse, coef, gradients, entropy=stats.entropy, entropy_coef=request.entropy_coef)
    return PassResult(stats.finish(), gradients)


def slice_summaries(request: PassRequest) -> SliceSummary:
    """The raw summaries of the request's rows over its weight's vocabulary slice (pass 1 without finishing the
    statistics): ``request.target`` is relative to the slice's first row (outside ``[0, rows)``: another slice
    holds it). ``request.coef`` is not read."""
    plan = BlockPlan(request)
    parts = [_chunk_summary(plan, rows) for rows in plan.chunks()]
    return SliceSummary(*(None if first is None else torch.cat([part[i] for part in parts])
                          for i, first in enumerate(parts[0])))


def slice_gradients(request: PassRequest, lse: torch.Tensor, num_classes: int) -> Gradients:
    """Pass 2 alone for the request's vocabulary slice: the gradients given each row's whole-row ``lse`` and
    final coefficient ``request.coef`` (DFT's factor included); ``num_classes`` is the whole vocabulary's
    size. ``grad_hidden`` is this slice's part of the hidden gradient. With ``request.entropy_coef`` the
    entropy's gradient too, from the whole-row entropy in ``request.known``."""
    plan = BlockPlan(request, num_classes=num_classes)
    gradients = allocate_gradients(request)
    entropy = None if request.known is None else request.known.entropy
    _gradients(plan, lse, request.coef, gradients, entropy=entropy, entropy_coef=request.entropy_coef)
    return gradients


def _chunk_statistics(plan: BlockPlan, rows: slice, out: TokenStatBuffers, coef: torch.Tensor | None) -> None:
    """Pass 1 for one token chunk: the online summary over vocabulary blocks, then the per-token outputs; with
    DFT, scales the chunk's ``coef`` (in place) by the detached ``p(target)``."""
    options = plan.options
    summary = _chunk_summary(plan, rows)
    token_stats = finish_token_stats(summary[:3], summary.target_logit, options, summary.sum_logits,
                                     plan.num_classes)
    if options.dft:
        factor = dft_factor(token_stats.lse, summary.target_logit)
        token_stats = apply_dft(token_stats, factor)
        if coef is not None:
            coef.mul_(factor)
    for name, value in token_stats._asdict().items():
        if value is not None:
            getattr(out, name).copy_(value)


def _chunk_summary(plan: BlockPlan, rows: slice) -> SliceSummary:
    """The online summary of one token chunk's rows over the plan's vocabulary blocks."""
    target = plan.target[rows]
    hidden32 = plan.hidden32(rows)
    summary = target_logit = sum_logits = None
    for block in plan.blocks():
        z = plan.block_logits(hidden32, plan.weight32(block), block)
        if plan.options.has_smoothing:
            block_sum = z.sum(-1)
            sum_logits = block_sum if sum_logits is None else sum_logits + block_sum
        picked = _pick_targets(z, target - block.start)
        target_logit = picked if target_logit is None else target_logit + picked
        block_summary, _ = tile_summary_(z, plan.exps_like(z))
        summary = block_summary if summary is None else merge_tile_summaries(summary, block_summary)
    return SliceSummary(*summary, target_logit, sum_logits)


def _pick_targets(z: torch.Tensor, block_target: torch.Tensor) -> torch.Tensor:
    """Each row's logit at ``block_target`` where that lies in ``[0, z.shape[1])``, else 0."""
    inside = (block_target >= 0) & (block_target < z.shape[1])
    picked = z.gather(1, block_target.clamp(0, z.shape[1] - 1)[:, None]).view(-1)
    return torch.where(inside, picked, torch.zeros_like(picked))


def _gradients(plan: BlockPlan, lse: torch.Tensor, coef: torch.Tensor, gradients: Gradients, *,
               entropy: torch.Tensor | None = None, entropy_coef: torch.Tensor | None = None) -> None:
    """Pass 2: per vocabulary block, ``dlogits`` of every chunk folded into the three gradients; with
    ``entropy_coef`` (and the rows' ``entropy``) the entropy's gradient too."""
    grad_hidden32 = None
    if gradients.hidden is not None:
        grad_hidden32 = (gradients.hidden if gradients.hidden.dtype == torch.float32
                         else torch.empty(gradients.hidden.shape, dtype=torch.float32,
                                          device=gradients.hidden.device))
    for block_index, block in enumerate(plan.blocks()):
        _block_gradients(plan, block, lse, coef, gradients, grad_hidden32, first_block=block_index == 0,
                         entropy=entropy, entropy_coef=entropy_coef)
    if grad_hidden32 is not None and grad_hidden32 is not gradients.hidden:
        gradients.hidden.copy_(grad_hidden32)


def _block_gradients(plan: BlockPlan, block: slice, lse: torch.Tensor, coef: torch.Tensor, gradients: Gradients,
                     grad_hidden32: torch.Tensor | None, *, first_block: bool, entropy: torch.Tensor | None,
                     entropy_coef: torch.Tensor | None) -> None:
    """Pass 2 for one vocabulary block: every chunk's ``dlogits`` folded into the gradients; the block's fp32
    weight copy and weight-gradient rows die on return, before the next block's are made."""
    weight32 = plan.weight32(block)
    weight_block = _weight_block_buffer(gradients.weight, block)
    for chunk_index, rows in enumerate(plan.chunks()):
        hidden32 = plan.hidden32(rows)
        dlogits = _block_dlogits(plan, hidden32, weight32, rows, block, lse[rows], coef[rows],
                                 None if entropy_coef is None else (entropy[rows], entropy_coef[rows]))
        if grad_hidden32 is not None:
            _fold(grad_hidden32[rows], dlogits, weight32, first=first_block)
        if weight_block is not None:
            _fold(weight_block, dlogits.T, hidden32, first=chunk_index == 0)
        if gradients.bias is not None:
            _sum_into(gradients.bias[block], dlogits, first=chunk_index == 0)
        del hidden32, dlogits  # before the next chunk's copy is made
    if weight_block is not None and weight_block.data_ptr() != gradients.weight[block].data_ptr():
        gradients.weight[block].copy_(weight_block)  # lean: one rounding to the weight's dtype


def _weight_block_buffer(grad_weight: torch.Tensor | None, block: slice) -> torch.Tensor | None:
    """Where a block's fp32 weight-gradient rows accumulate: the fp32 gradient itself, or (lean mode, a
    reduced-precision gradient) a ``[B, H]`` fp32 block written into it once complete."""
    if grad_weight is None:
        return None
    rows = grad_weight[block]
    if rows.dtype == torch.float32:
        return rows
    return torch.empty(rows.shape, dtype=torch.float32, device=rows.device)


def _block_dlogits(plan: BlockPlan, hidden32: torch.Tensor, weight32: torch.Tensor, rows: slice, block: slice,
                   lse: torch.Tensor, coef: torch.Tensor,
                   entropy_term: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One block's ``dlogits`` of a chunk; ``entropy_term``: the chunk's (entropy, entropy coefficient)."""
    z = plan.block_logits(hidden32, weight32, block)
    probs = torch.sub(z, lse[:, None], out=plan.exps_like(z)).exp_()
    entropy, entropy_coef = entropy_term if entropy_term is not None else (None, None)
    needs_z = plan.options.has_softcap or entropy_coef is not None
    return softmax_grad_(probs, z if needs_z else None, lse, plan.target[rows] - block.start, coef, plan.options,
                         plan.num_classes, entropy=entropy, entropy_coef=entropy_coef, scratch=plan.scratch_like(z))


def _fold(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool) -> None:
    """``out = a @ b`` when ``first``, else ``out += a @ b``."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def _sum_into(out: torch.Tensor, dlogits: torch.Tensor, *, first: bool) -> None:
    if first:
        torch.sum(dlogits, 0, out=out)
    else:
        out += dlogits.sum(0)
