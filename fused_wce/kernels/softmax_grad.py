"""``dlogits = coef * (softmax - onehot)`` over a chunk's stored logit tiles, in place."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def softmax_grad_kernel(
    logits_ptr, part_max_ptr, lse_ptr, target_ptr, coef_ptr, entropy_ptr, entropy_coef_ptr,
    M, V, num_classes, stride_logits_m, label_smoothing, z_loss, softcap, logit_scale,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
):
    """Overwrite one ``[BLOCK_SIZE_M, BLOCK_SIZE_N]`` tile of tile-relative logits with ``dlogits``.

    Pointers:
        logits_ptr: ``[M, V]`` fp32/fp16/bf16, row stride stride_logits_m, column stride 1; holds ``z - m_tile``
            as written by vocab_partials_kernel(STORE_LOGITS) with the same BLOCK_SIZE_N; overwritten with
            the gradient with respect to the raw logits (fused_wce.loss_math.softmax_grad_):
            ``coef * (p (1 + 2 z_loss lse) - (1 - eps) [v == target] - eps / V) * dz/dr``, each variant's term
            only under its HAS_* flag; with HAS_ENTROPY_GRAD minus ``e p (z - lse + entropy) * dz/dr`` (the
            gradient of ``e * entropy``).
        part_max_ptr: ``[cdiv(V, BLOCK_SIZE_N), M]`` fp32: ``m_tile`` of each (tile, row).
        lse_ptr, coef_ptr: ``[M]`` fp32 (coef includes DFT's factor). target_ptr: ``[M]`` int64, relative to
            the first column of ``logits`` (a target outside ``[0, V)`` lies in another vocabulary slab).
        entropy_ptr, entropy_coef_ptr: ``[M]`` fp32 whole-row entropy and its coefficient ``e``; read only if
            HAS_ENTROPY_GRAD.
    ``V`` is the number of columns of ``logits`` (the whole vocabulary, or one slab of it in lean mode);
    ``num_classes`` is the whole vocabulary's size (label smoothing's ``eps / num_classes``).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    row_mask = offs_m < M
    mask = row_mask[:, None] & (offs_n[None, :] < V)
    offs_m64 = offs_m.to(tl.int64)

    lse = tl.load(lse_ptr + offs_m, mask=row_mask, other=0.0)
    tile_max = tl.load(part_max_ptr + pid_n.to(tl.int64) * M + offs_m64, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + offs_m, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + offs_m, mask=row_mask, other=-1)

    ptrs = logits_ptr + offs_m64[:, None] * stride_logits_m + offs_n[None, :].to(tl.int64)
    relative_logits = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    # exp(z - lse) = exp((z - m_tile) + (m_tile - lse)); the per-row term first keeps fp32 precision.
    probs = tl.exp(relative_logits + (tile_max - lse)[:, None])
    scaled_probs = probs
    if HAS_Z_LOSS:
        scaled_probs = probs * (1.0 + 2.0 * z_loss * lse)[:, None]
    if HAS_SMOOTHING:
        grad = scaled_probs - tl.where(offs_n[None, :] == target[:, None], 1.0 - label_smoothing, 0.0) \
            - label_smoothing / num_classes
    else:
        grad = scaled_probs - tl.where(offs_n[None, :] == target[:, None], 1.0, 0.0)
    grad = coef[:, None] * grad
    if HAS_ENTROPY_GRAD:  # log p + entropy = (z - m_tile) + (m_tile - lse + entropy); p = 0: no term
        entropy = tl.load(entropy_ptr + offs_m, mask=row_mask, other=0.0)
        entropy_coef = tl.load(entropy_coef_ptr + offs_m, mask=row_mask, other=0.0)
        log_p_plus_entropy = relative_logits + (tile_max - lse + entropy)[:, None]
        grad -= entropy_coef[:, None] * tl.where(probs > 0.0, probs * log_p_plus_entropy, 0.0)
    if HAS_SOFTCAP:
        capped = (relative_logits + tile_max[:, None]) / softcap  # tanh(r / cap) = z / cap
        grad = grad * (1.0 - capped * capped)
    if HAS_LOGIT_SCALE:
        grad = grad * logit_scale
    tl.store(ptrs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def softmax_grad(logits: torch.Tensor, tile_max: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                 coef: torch.Tensor, config, block_n: int, *, options, num_classes: int,
                 entropy: torch.Tensor | None = None, entropy_coef: torch.Tensor | None = None) -> None:
    """Launch :func:`softmax_grad_kernel` over ``logits`` ``[M, V]`` (in place); ``block_n`` is the vocabulary
    tile width the logits were written with; ``options`` (:class:`fused_wce.options.LossOptions`) selects the
    loss variant. For one slab of the vocabulary, ``target`` is relative to the slab and ``num_classes`` is
    the whole vocabulary's size. ``entropy_coef`` (with the rows' whole-row ``entropy``, ``[M]`` fp32 each)
    adds the entropy's gradient."""
    num_tokens, vocab_size = logits.shape
    assert logits.stride(1) == 1
    assert tile_max.shape == (triton.cdiv(vocab_size, block_n), num_tokens)
    has_entropy_grad = entropy_coef is not None
    if has_entropy_grad:
        assert entropy is not None and entropy.shape == entropy_coef.shape == (num_tokens,)
    grid = (triton.cdiv(num_tokens, config.block_m), triton.cdiv(vocab_size, block_n))
    softmax_grad_kernel[grid](logits, tile_max, lse, target, coef, entropy if has_entropy_grad else lse,
                              entropy_coef if has_entropy_grad else coef, num_tokens, vocab_size, num_classes,
                              logits.stride(0), options.label_smoothing, options.z_loss,
                              float(options.softcap or 1.0), options.logit_scale,
                              HAS_SMOOTHING=options.has_smoothing, HAS_Z_LOSS=options.has_z_loss,
                              HAS_SOFTCAP=options.has_softcap, HAS_LOGIT_SCALE=options.has_logit_scale,
                              BLOCK_SIZE_M=config.block_m, BLOCK_SIZE_N=block_n, HAS_ENTROPY_GRAD=has_entropy_grad,
                              num_warps=config.num_warps)
