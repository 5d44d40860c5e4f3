"""Per-token loss, statistics and ``dlogits`` from a chunk's materialised fp32 logit rows (the cuBLAS plan)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .vocab_partials import transform_logits

_EMPTY_MAX = tl.constexpr(-3.0e38)


@triton.jit
def _load_logits(logits_row_ptr, bias_ptr, offs_n, col_mask, logit_scale, softcap,
                 HAS_BIAS: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``z = transform(raw + bias)`` for one tile of a row, fp32; masked columns are -inf."""
    raw = tl.load(logits_row_ptr + offs_n, mask=col_mask, other=0.0)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + offs_n, mask=col_mask, other=0.0).to(tl.float32)
    z = transform_logits(raw, logit_scale, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
    return tl.where(col_mask, z, float("-inf"))


@triton.jit
def logit_rows_kernel(
    logits_ptr, grad_ptr, bias_ptr, target_ptr, coef_ptr, lse_ptr,
    token_loss_ptr, entropy_ptr, is_top1_ptr, z_term_ptr, coef_out_ptr, entropy_coef_ptr,
    V, num_classes, stride_logits_m, stride_grad_m, label_smoothing, z_loss, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr, HAS_DFT: tl.constexpr, KNOWN_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    WRITE_COEF: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
):
    """One row: the online logsumexp over its ``V`` columns, the per-token outputs, then ``dlogits``.

    Program ``row`` reads the row's raw fp32 logits (``hidden @ weight.T``, written by cuBLAS) twice: pass 1
    folds ``z = transform(raw + bias)`` tile by tile into ``(max, sum exp, sum exp * shifted)`` (and ``sum z``
    with label smoothing) and picks the target's logit, giving lse, entropy, top-1 and the token's loss
    (fused_wce.loss_math.finish_token_stats, with DFT's factor when HAS_DFT); pass 2 writes
    ``dlogits = c (p (1 + 2 z_loss lse) - (1 - eps) [v == t] - eps / num_classes) dz/dr``
    (fused_wce.loss_math.softmax_grad_) in the compute dtype; with HAS_ENTROPY_GRAD minus
    ``e p (z - lse + entropy) dz/dr``, the gradient of ``e * entropy`` (the log-prob backward's second output).

    Pointers:
        logits_ptr: ``[M, V]`` fp32, row stride stride_logits_m, column stride 1: raw logits (no bias).
        grad_ptr: ``[M, V]`` fp32/fp16/bf16, row stride stride_grad_m, column stride 1; written if WRITE_GRAD.
            It may share storage with the logits: row ``i`` of a 2-byte ``grad`` then lies in the first half of
            fp32 row ``i`` (stride_grad_m == 2 * stride_logits_m), each tile is written only after every thread
            has read it (a barrier per tile), and a tile's 2-byte writes land on fp32 columns already read.
        bias_ptr: ``[V]`` in the compute dtype; read only if HAS_BIAS.
        target_ptr: ``[M]`` int64, relative to the first column (outside ``[0, V)``: in another slab).
        coef_ptr: ``[M]`` fp32 gradient coefficient (already with DFT's factor when KNOWN_LSE).
        lse_ptr: ``[M]`` fp32: written by pass 1, or read when KNOWN_LSE (a vocabulary slab of rows whose
            whole-row lse is known: pass 1 is skipped).
        token_loss_ptr, entropy_ptr, z_term_ptr: ``[M]`` fp32; is_top1_ptr: ``[M]`` int8; written unless
            KNOWN_LSE (z_term only with HAS_Z_LOSS). With KNOWN_LSE and HAS_ENTROPY_GRAD, entropy_ptr is read:
            the rows' whole-row entropy.
        coef_out_ptr: ``[M]`` fp32, the coefficient times DFT's factor; written if WRITE_COEF.
        entropy_coef_ptr: ``[M]`` fp32 coefficient ``e`` of the entropy's gradient; read only if HAS_ENTROPY_GRAD.
    ``num_classes`` is the whole vocabulary's size (label smoothing's ``eps / num_classes``).
    """
    row = tl.program_id(0).to(tl.int64)
    logits_row_ptr = logits_ptr + row * stride_logits_m
    target = tl.load(target_ptr + row)
    coef = tl.load(coef_ptr + row)
    if KNOWN_LSE:
        lse = tl.load(lse_ptr + row)
        if HAS_ENTROPY_GRAD:
            entropy = tl.load(entropy_ptr + row)
    else:
        # 0-d fp32 tensors (not Python floats): loop-carried values keep one type on every Triton version
        running_max = tl.full([], _EMPTY_MAX, tl.float32)
        running_sumexp = tl.zeros([], tl.float32)
        running_sumexp_shifted = tl.zeros([], tl.float32)
        sum_logits = tl.zeros([], tl.float32)
        target_logit = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_SIZE_N):
            offs_n = start + tl.arange(0, BLOCK_SIZE_N)
            col_mask = offs_n < V
            z = _load_logits(logits_row_ptr, bias_ptr, offs_n, col_mask, logit_scale, softcap,
                             HAS_BIAS, HAS_LOGIT_SCALE, HAS_SOFTCAP)
            if HAS_SMOOTHING:
                sum_logits += tl.sum(tl.where(col_mask, z, 0.0))
            target_logit += tl.sum(tl.where(offs_n == target, z, 0.0))
            new_max = tl.maximum(running_max, tl.max(z))
            shifted = z - new_max
            exp_shifted = tl.exp(shifted)
            scale = tl.exp(running_max - new_max)
            running_sumexp_shifted = scale * (running_sumexp_shifted + (running_max - new_max) * running_sumexp) \
                + tl.sum(tl.where(exp_shifted > 0.0, exp_shifted * shifted, 0.0))  # -inf z: p = 0, not NaN
            running_sumexp = scale * running_sumexp + tl.sum(exp_shifted)
            running_max = new_max
        log_sumexp = tl.log(running_sumexp)
        lse = running_max + log_sumexp
        token_loss = lse - target_logit
        if HAS_SMOOTHING:
            token_loss = (1.0 - label_smoothing) * token_loss + label_smoothing * (lse - sum_logits / num_classes)
        z_term = 0.0
        if HAS_Z_LOSS:
            z_term = z_loss * lse * lse
            token_loss += z_term
        if HAS_DFT:
            factor = tl.exp(target_logit - lse)
            token_loss *= factor
            z_term *= factor
            coef *= factor
        entropy = log_sumexp - running_sumexp_shifted / running_sumexp
        tl.store(lse_ptr + row, lse)
        tl.store(token_loss_ptr + row, token_loss)
        tl.store(entropy_ptr + row, entropy)
        tl.store(is_top1_ptr + row, (target_logit >= running_max).to(tl.int8))
        if HAS_Z_LOSS:
            tl.store(z_term_ptr + row, z_term)
        if WRITE_COEF:
            tl.store(coef_out_ptr + row, coef)

    if WRITE_GRAD:
        grad_row_ptr = grad_ptr + row * stride_grad_m
        row_scale = coef
        if HAS_Z_LOSS:
            row_scale = coef * (1.0 + 2.0 * z_loss * lse)
        target_step = (1.0 - label_smoothing) * coef if HAS_SMOOTHING else coef
        uniform_step = label_smoothing * coef / num_classes
        if HAS_ENTROPY_GRAD:
            entropy_coef = tl.load(entropy_coef_ptr + row)
            entropy_shift = lse - entropy  # log p + entropy = z - entropy_shift
        for start in range(0, V, BLOCK_SIZE_N):
            offs_n = start + tl.arange(0, BLOCK_SIZE_N)
            col_mask = offs_n < V
            z = _load_logits(logits_row_ptr, bias_ptr, offs_n, col_mask, logit_scale, softcap,
                             HAS_BIAS, HAS_LOGIT_SCALE, HAS_SOFTCAP)
            probs = tl.exp(z - lse)
            grad = row_scale * probs - tl.where(offs_n == target, target_step, 0.0)
            if HAS_ENTROPY_GRAD:  # p = 0 (a masked column's -inf): no term, not 0 * -inf
                grad -= entropy_coef * tl.where(probs > 0.0, probs * (z - entropy_shift), 0.0)
            if HAS_SMOOTHING:
                grad -= uniform_step
            if HAS_SOFTCAP:
                capped = z / softcap  # tanh(scale * raw / cap)
                grad = grad * (1.0 - capped * capped)
            if HAS_LOGIT_SCALE:
                grad = grad * logit_scale
            tl.debug_barrier()  # every thread has read this tile before any thread overwrites shared storage
            tl.store(grad_row_ptr + offs_n, grad.to(grad_ptr.dtype.element_ty), mask=col_mask)


def logit_rows(logits: torch.Tensor, grad: torch.Tensor | None, bias: torch.Tensor | None, target: torch.Tensor,
               coef: torch.Tensor | None, lse: torch.Tensor, config, *, options, num_classes: int,
               stats=None, coef_out: torch.Tensor | None = None, entropy_coef: torch.Tensor | None = None,
               entropy: torch.Tensor | None = None) -> None:
    """Launch :func:`logit_rows_kernel`, one program per row of ``logits`` ``[M, V]`` (fp32, unit column stride).

    ``options`` (:class:`fused_wce.options.LossOptions`) selects the loss variant. ``stats`` (a
    :class:`fused_wce.passes.TokenStatBuffers` of ``[M]`` rows, is_top1 int8) receives the per-token outputs
    and ``lse`` is written; without ``stats`` the rows' ``lse`` is given (a vocabulary slab, or rows whose
    statistics an earlier pass found). ``grad`` ``[M, V]`` (unit column stride, possibly sharing storage with
    ``logits``) receives ``dlogits`` when given; ``coef_out`` receives the coefficient with DFT's factor.
    ``entropy_coef`` ``[M]`` adds the entropy's gradient; without ``stats`` it needs the rows' ``entropy``.
    ``coef`` may be None only without ``grad`` and ``coef_out`` (statistics alone).
    """
    num_rows, vocab_size = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    if coef is None:
        assert grad is None and coef_out is None and stats is not None, "statistics alone need no coefficient"
        coef = lse  # read, never used
    assert target.shape == (num_rows,) and coef.shape == (num_rows,) and lse.shape == (num_rows,)
    if grad is not None:
        assert grad.shape == (num_rows, vocab_size) and grad.stride(1) == 1
        if grad.data_ptr() == logits.data_ptr() and grad.dtype != torch.float32:
            assert grad.stride(0) == 2 * logits.stride(0), "a 2-byte grad shares row i's fp32 storage"
    if bias is not None:
        assert bias.shape == (vocab_size,) and bias.is_contiguous()
    known_lse = stats is None
    has_entropy_grad = entropy_coef is not None
    if has_entropy_grad:
        assert grad is not None and entropy_coef.shape == (num_rows,)
        assert not known_lse or (entropy is not None and entropy.shape == (num_rows,))
    outputs = ((lse, entropy if has_entropy_grad else lse, lse, lse) if known_lse else
               (stats.token_loss, stats.entropy, stats.is_top1, stats.z_term if stats.z_term is not None else lse))
    logit_rows_kernel[(num_rows,)](
        logits, grad if grad is not None else logits, bias if bias is not None else logits, target, coef, lse,
        *outputs, coef_out if coef_out is not None else coef, entropy_coef if has_entropy_grad else coef,
        vocab_size, num_classes, logits.stride(0), grad.stride(0) if grad is not None else 0,
        options.label_smoothing, options.z_loss, float(options.softcap or 1.0), options.logit_scale,
        HAS_BIAS=bias is not None, HAS_SMOOTHING=options.has_smoothing, HAS_Z_LOSS=options.has_z_loss,
        HAS_SOFTCAP=options.has_softcap, HAS_LOGIT_SCALE=options.has_logit_scale,
        HAS_DFT=options.dft and not known_lse, KNOWN_LSE=known_lse, WRITE_GRAD=grad is not None,
        WRITE_COEF=coef_out is not None and not known_lse, BLOCK_SIZE_N=config.block_n,
        HAS_ENTROPY_GRAD=has_entropy_grad, num_warps=config.num_warps,
    )
