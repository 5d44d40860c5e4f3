"""Merge the vocabulary splits' summaries into per-token loss, lse, entropy and top-1."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    part_max_ptr, part_sumexp_ptr, part_sumexp_shifted_ptr, part_sum_logits_ptr, target_logit_ptr,
    token_loss_ptr, lse_ptr, entropy_ptr, is_top1_ptr, z_term_ptr,
    M, V, num_splits, label_smoothing, z_loss,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
):
    """Per-token outputs of BLOCK_SIZE_M rows from their ``num_splits`` summaries (fused_wce.loss_math).

    Pointers:
        part_max_ptr, part_sumexp_ptr, part_sumexp_shifted_ptr: ``[num_splits, M]`` fp32, contiguous.
        part_sum_logits_ptr: ``[num_splits, M]`` fp32 ``sum z``; read only if HAS_SMOOTHING.
        target_logit_ptr: ``[M]`` fp32.
        token_loss_ptr, lse_ptr, entropy_ptr: ``[M]`` fp32 outputs; is_top1_ptr: ``[M]`` int8 output.
        z_term_ptr: ``[M]`` fp32 output ``z_loss * lse**2``; written only if HAS_Z_LOSS.
    token_loss is ``(1 - label_smoothing) nll + label_smoothing (lse - sum z / V) + z_loss lse**2`` with each
    term present only under its flag (loss_math.finish_token_stats); DFT's factor is applied by the caller.
    Splits are merged BLOCK_SIZE_S at a time as a ``[BLOCK_SIZE_S, BLOCK_SIZE_M]`` tile, so a thousand vocabulary
    tiles take a few dozen loop iterations.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    row_mask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)

    running_max = tl.full([BLOCK_SIZE_M], -3.0e38, tl.float32)
    running_sumexp = tl.zeros([BLOCK_SIZE_M], tl.float32)
    running_sumexp_shifted = tl.zeros([BLOCK_SIZE_M], tl.float32)
    sum_logits = tl.zeros([BLOCK_SIZE_M], tl.float32)
    for split_start in range(0, num_splits, BLOCK_SIZE_S):
        offs_s = split_start + tl.arange(0, BLOCK_SIZE_S)
        mask = (offs_s[:, None] < num_splits) & row_mask[None, :]
        offs = offs_s[:, None].to(tl.int64) * M + offs_m64[None, :]
        part_max = tl.load(part_max_ptr + offs, mask=mask, other=-3.0e38)
        part_sumexp = tl.load(part_sumexp_ptr + offs, mask=mask, other=0.0)
        part_sumexp_shifted = tl.load(part_sumexp_shifted_ptr + offs, mask=mask, other=0.0)

        new_max = tl.maximum(running_max, tl.max(part_max, axis=0))
        part_scale = tl.exp(part_max - new_max[None, :])
        part_offset = part_max - new_max[None, :]
        scale = tl.exp(running_max - new_max)
        running_sumexp_shifted = scale * (running_sumexp_shifted + (running_max - new_max) * running_sumexp) \
            + tl.sum(part_scale * (part_sumexp_shifted + part_offset * part_sumexp), axis=0)
        running_sumexp = scale * running_sumexp + tl.sum(part_scale * part_sumexp, axis=0)
        running_max = new_max
        if HAS_SMOOTHING:
            sum_logits += tl.sum(tl.load(part_sum_logits_ptr + offs, mask=mask, other=0.0), axis=0)

    target_logit = tl.load(target_logit_ptr + offs_m, mask=row_mask, other=0.0)
    # rows past M: keep their (unstored) math finite
    running_sumexp = tl.where(row_mask, running_sumexp, 1.0)
    running_max = tl.where(row_mask, running_max, 0.0)
    log_sumexp = tl.log(running_sumexp)
    lse = running_max + log_sumexp
    tl.store(lse_ptr + offs_m, lse, mask=row_mask)
    token_loss = lse - target_logit
    if HAS_SMOOTHING:
        token_loss = (1.0 - label_smoothing) * token_loss + label_smoothing * (lse - sum_logits / V)
    if HAS_Z_LOSS:
        z_term = z_loss * lse * lse
        token_loss += z_term
        tl.store(z_term_ptr + offs_m, z_term, mask=row_mask)
    tl.store(token_loss_ptr + offs_m, token_loss, mask=row_mask)
    tl.store(entropy_ptr + offs_m, log_sumexp - running_sumexp_shifted / running_sumexp, mask=row_mask)
    tl.store(is_top1_ptr + offs_m, (target_logit >= running_max).to(tl.int8), mask=row_mask)


def combine(partials: tuple[torch.Tensor, ...], target_logit: torch.Tensor, stats, config, *, options,
            vocab_size: int) -> None:
    """Launch :func:`combine_kernel`: ``partials`` three (four with label smoothing) ``[S, M]`` fp32;
    ``stats`` (a :class:`fused_wce.passes.TokenStatBuffers` of ``[M]`` rows, is_top1 int8) receives the outputs
    (``z_term`` with z-loss); ``options`` (:class:`fused_wce.options.LossOptions`) selects the variant."""
    num_splits, num_tokens = partials[0].shape
    assert len(partials) == options.num_summaries and (stats.z_term is not None) == options.has_z_loss
    for out in (target_logit, stats.token_loss, stats.lse, stats.entropy):
        assert out.shape == (num_tokens,) and out.dtype == torch.float32
    assert stats.is_top1.shape == (num_tokens,) and stats.is_top1.dtype == torch.int8
    grid = (triton.cdiv(num_tokens, config.block_m),)
    combine_kernel[grid](*partials[:3], partials[3] if options.has_smoothing else partials[0], target_logit,
                         stats.token_loss, stats.lse, stats.entropy, stats.is_top1,
                         stats.z_term if stats.z_term is not None else stats.token_loss,
                         num_tokens, vocab_size, num_splits, options.label_smoothing, options.z_loss,
                         HAS_SMOOTHING=options.has_smoothing, HAS_Z_LOSS=options.has_z_loss,
                         BLOCK_SIZE_M=config.block_m, BLOCK_SIZE_S=config.block_s, num_warps=config.num_warps)
