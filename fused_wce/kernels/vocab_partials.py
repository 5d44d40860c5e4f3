"""Logit tiles and their online-logsumexp summaries: the matmul that replaces the ``[N, V]`` logits."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Running max before any tile: finite (not -inf) so that merging into an empty summary never makes 0 * inf.
_EMPTY_MAX = tl.constexpr(-3.0e38)


@triton.jit
def tanh(x):
    """tanh in fp32, within a few ulp everywhere.

    ``|x| >= 0.25``: ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)``, one exp of a non-positive number (no
    overflow; saturates to +-1). Below 0.25 that formula cancels (``1 - e`` loses ``log2(1 / |x|)`` bits, so a
    small logit / softcap came out with ~1e-6 relative error), so there the odd Taylor polynomial to ``x**9``
    is used: its truncation error ``(1382 / 155925) x**11`` is below 1e-8 relative at ``|x| = 0.25``.
    """
    magnitude = tl.abs(x)
    decay = tl.exp(-2.0 * magnitude)
    x2 = x * x
    series = magnitude * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    magnitude = tl.where(magnitude < 0.25, series, (1.0 - decay) / (1.0 + decay))
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def transform_logits(raw, logit_scale, softcap, HAS_LOGIT_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``z = softcap * tanh(logit_scale * raw / softcap)`` (loss_math.transform_logits_), each step optional."""
    z = raw
    if HAS_LOGIT_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def vocab_partials_kernel(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr,
    logits_ptr, part_max_ptr, part_sumexp_ptr, part_sumexp_shifted_ptr, part_sum_logits_ptr, target_logit_ptr,
    M, V, H,
    stride_hidden_m, stride_weight_v, stride_logits_m,
    tiles_per_split, logit_scale, softcap,
    HAS_BIAS: tl.constexpr, STORE_LOGITS: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SUM_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    """Summaries ``(max, sum exp, sum exp * shifted)`` of one split of the vocabulary for BLOCK_SIZE_M tokens.

    Programs run in grouped order (Triton's matmul tutorial): consecutive program ids walk GROUP_SIZE_M row
    blocks of one vocabulary split before the next split, so the weight tiles of a split are read from L2 by
    the row blocks that run together. Program ``(pid_m, pid_split)`` computes the logit tiles ``z = transform(hidden @ weight.T + bias)`` of rows
    ``pid_m * BLOCK_SIZE_M + [0, BLOCK_SIZE_M)`` over vocabulary tiles ``[pid_split * tiles_per_split, ...)``
    of BLOCK_SIZE_N columns, in fp32 registers, and folds them into a running summary (fused_wce.loss_math).

    Pointers:
        hidden_ptr: ``[M, H]`` fp32/fp16/bf16, row stride stride_hidden_m, unit column stride.
        weight_ptr: ``[V, H]`` hidden's dtype, row stride stride_weight_v, unit column stride.
        bias_ptr: ``[V]`` hidden's dtype, contiguous; read only if HAS_BIAS.
        target_ptr: ``[M]`` int64 in ``[0, V)``.
        logits_ptr: ``[M, V]`` hidden's dtype, row stride stride_logits_m, column stride 1; written only if
            STORE_LOGITS, with ``z - max`` of the tile (tile-relative: near-maximal logits, the ones whose
            probabilities matter, keep their precision in bf16). Requires ``tiles_per_split == 1``.
        part_max_ptr, part_sumexp_ptr, part_sumexp_shifted_ptr: ``[num_splits, M]`` fp32, contiguous.
        part_sum_logits_ptr: ``[num_splits, M]`` fp32, ``sum z`` of the split; written only if HAS_SUM_LOGITS
            (label smoothing needs the mean logit).
        target_logit_ptr: ``[M]`` fp32; written by the one program whose split holds the row's target.
    The logit transform (logit_scale, softcap: floats) applies only where its HAS_* flag is set.
    """
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(M, BLOCK_SIZE_M)
    num_splits = tl.cdiv(tl.cdiv(V, BLOCK_SIZE_N), tiles_per_split)
    programs_per_group = GROUP_SIZE_M * num_splits
    group = pid // programs_per_group
    first_row_block = group * GROUP_SIZE_M
    group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_SIZE_M)
    pid_m = first_row_block + (pid % programs_per_group) % group_rows
    pid_split = (pid % programs_per_group) // group_rows
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    row_mask = offs_m < M
    # int64 offsets: M * H, V * H and M * V can exceed 2**31 for large vocabularies and chunks.
    offs_m64 = offs_m.to(tl.int64)
    target = tl.load(target_ptr + offs_m, mask=row_mask, other=-1)

    running_max = tl.full([BLOCK_SIZE_M], _EMPTY_MAX, tl.float32)
    running_sumexp = tl.zeros([BLOCK_SIZE_M], tl.float32)
    running_sumexp_shifted = tl.zeros([BLOCK_SIZE_M], tl.float32)
    running_sum_logits = tl.zeros([BLOCK_SIZE_M], tl.float32)

    num_tiles = tl.cdiv(V, BLOCK_SIZE_N)
    first_tile = pid_split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, num_tiles)
    for tile in range(first_tile, last_tile):
        offs_n = tile * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
        col_mask = offs_n < V
        offs_n64 = offs_n.to(tl.int64)

        acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        for k_start in range(0, H, BLOCK_SIZE_K):
            offs_k = k_start + tl.arange(0, BLOCK_SIZE_K)
            k_mask = offs_k < H
            a = tl.load(hidden_ptr + offs_m64[:, None] * stride_hidden_m + offs_k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(weight_ptr + offs_k[:, None] + offs_n64[None, :] * stride_weight_v,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc = transform_logits(acc, logit_scale, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
        if HAS_SUM_LOGITS:
            running_sum_logits += tl.sum(tl.where(col_mask[None, :], acc, 0.0), axis=1)
        logits = tl.where(col_mask[None, :], acc, float("-inf"))

        # The target's logit, from the fp32 accumulator (exactly the value the max below sees).
        is_target = offs_n[None, :] == target[:, None]
        target_in_tile = (target >= tile * BLOCK_SIZE_N) & (target < tile * BLOCK_SIZE_N + BLOCK_SIZE_N)
        tl.store(target_logit_ptr + offs_m, tl.sum(tl.where(is_target, logits, 0.0), axis=1),
                 mask=row_mask & target_in_tile)

        # Online merge of this tile into the running summary (loss_math.merge_tile_summaries).
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        shifted = logits - new_max[:, None]
        exp_shifted = tl.exp(shifted)
        scale = tl.exp(running_max - new_max)
        running_sumexp_shifted = scale * (running_sumexp_shifted + (running_max - new_max) * running_sumexp) \
            + tl.sum(tl.where(exp_shifted > 0.0, exp_shifted * shifted, 0.0), axis=1)  # -inf z: p = 0, not NaN
        running_sumexp = scale * running_sumexp + tl.sum(exp_shifted, axis=1)
        running_max = new_max

        if STORE_LOGITS:
            tl.store(logits_ptr + offs_m64[:, None] * stride_logits_m + offs_n64[None, :],
                     shifted.to(logits_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    part_offs = pid_split.to(tl.int64) * M + offs_m64
    tl.store(part_max_ptr + part_offs, running_max, mask=row_mask)
    tl.store(part_sumexp_ptr + part_offs, running_sumexp, mask=row_mask)
    tl.store(part_sumexp_shifted_ptr + part_offs, running_sumexp_shifted, mask=row_mask)
    if HAS_SUM_LOGITS:
        tl.store(part_sum_logits_ptr + part_offs, running_sum_logits, mask=row_mask)


def vocab_partials(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                   partials: tuple[torch.Tensor, ...], target_logit: torch.Tensor,
                   logits: torch.Tensor | None, tiles_per_split: int, config, *, options) -> None:
    """Launch :func:`vocab_partials_kernel` over ``hidden`` ``[M, H]``; see its docstring for every tensor.

    ``partials`` are three (four with label smoothing: ``sum z``) ``[num_splits, M]`` fp32 tensors with
    ``num_splits = cdiv(cdiv(V, BLOCK_SIZE_N), tiles_per_split)``; ``logits`` (``[M, V]``, unit column
    stride) is written when given. ``options`` (:class:`fused_wce.options.LossOptions`) selects the logit
    transform (logit_scale, softcap).
    """
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    num_tiles = triton.cdiv(vocab_size, config.block_n)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)
    assert len(partials) in (3, 4)
    has_sum_logits = len(partials) == 4
    for part in partials:
        assert part.shape == (num_splits, num_tokens) and part.is_contiguous() and part.dtype == torch.float32
    assert target.shape == (num_tokens,) and target_logit.shape == (num_tokens,)
    # Unit stride along H lets the loads vectorise (a strided H would need a pointer per element).
    assert hidden.stride(1) == 1 and weight.stride(1) == 1, "hidden and weight need unit stride along H"
    if logits is not None:
        assert tiles_per_split == 1, "tile-relative logits need one tile per split"
        assert logits.shape == (num_tokens, vocab_size) and logits.stride(1) == 1
    grid = (triton.cdiv(num_tokens, config.block_m) * num_splits,)
    vocab_partials_kernel[grid](
        hidden, weight, bias if bias is not None else weight, target,
        logits if logits is not None else hidden, *partials[:3], partials[3] if has_sum_logits else partials[0],
        target_logit, num_tokens, vocab_size, hidden_size,
        hidden.stride(0), weight.stride(0),
        logits.stride(0) if logits is not None else 0,
        tiles_per_split, options.logit_scale, float(options.softcap or 1.0),
        HAS_BIAS=bias is not None, STORE_LOGITS=logits is not None, HAS_LOGIT_SCALE=options.has_logit_scale,
        HAS_SOFTCAP=options.has_softcap, HAS_SUM_LOGITS=has_sum_logits,
        DOT_PRECISION=config.dot_precision(hidden.dtype),
        BLOCK_SIZE_M=config.block_m, BLOCK_SIZE_N=config.block_n, BLOCK_SIZE_K=config.block_k,
        GROUP_SIZE_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
