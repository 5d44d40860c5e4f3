"""The CPU path: chunked PyTorch with the same semantics and memory bound as the Triton path.

Per chunk of ``C`` counted tokens it materialises one fp32 ``[C, V]`` logit block (two, while the softmax is
formed), applies :mod:`fused_wce.loss_math` to whole rows, and, when gradients are requested, turns the block
into ``dlogits`` in place and folds it into ``grad_hidden``, ``grad_weight`` and ``grad_bias`` with three GEMMs.
With ``lean_memory`` the chunks compute everything but ``grad_weight``, which then comes from vocabulary
slabs ``[M, S]`` over all counted tokens, each slab's rows written once in the weight's dtype.
The math is fp32 whatever the input dtype: reduced-precision weights are upcast once per pass (``V * H``).
"""
from __future__ import annotations

import torch

from . import _passes
from ._passes import PassRequest, PassResult, allocate_gradients, chunk_rows
from .loss_math import (TokenStats, apply_dft, dft_factor, finish_token_stats, softmax_grad_, tile_summary_,
                        transform_logits_)

# Two fp32 [C, V] buffers are alive at once (z - m and exp(z - m)).
_BYTES_PER_LOGIT = 2 * 4


def _logits(hidden32: torch.Tensor, weight32: torch.Tensor, bias32: torch.Tensor | None) -> torch.Tensor:
    """Raw fp32 logits ``hidden32 @ weight32.T + bias32``."""
    return hidden32 @ weight32.T if bias32 is None else torch.addmm(bias32, hidden32, weight32.T)


def run_pass(request: PassRequest) -> PassResult:
    hidden, target, coef, variant = request.hidden, request.target, request.coef, request.variant
    weight32 = request.weight.float()
    bias32 = None if request.bias is None else request.bias.float()
    vocab_size = weight32.shape[0]
    result = allocate_gradients(request)
    num_tokens = hidden.shape[0]
    device = hidden.device
    token_loss, lse, entropy = (_passes.uninitialized(num_tokens, dtype=torch.float32, device=device)
                                for _ in range(3))
    is_top1 = _passes.uninitialized(num_tokens, dtype=torch.bool, device=device)
    z_term = _passes.uninitialized(num_tokens, dtype=torch.float32, device=device) if variant.z_loss else None
    # fp32 weights: the fp32 accumulator is the gradient itself; lean mode would only cost FLOPs.
    lean = (coef is not None and request.lean_memory and result.grad_weight is not None
            and request.grad_weight_dtype != torch.float32)
    rows = chunk_rows(request, _BYTES_PER_LOGIT, cpu_budget=device.type == "cpu", lean=lean)
    # Lean mode: the DFT factor scales each token's coefficient; the slabs read the scaled copy.
    lean_coef = coef.clone() if lean and variant.dft else coef

    for start in range(0, num_tokens, rows):
        end = min(start + rows, num_tokens)
        hidden_chunk = hidden[start:end].float()
        target_chunk = target[start:end]
        logits = transform_logits_(_logits(hidden_chunk, weight32, bias32), variant)
        target_logit = logits.gather(1, target_chunk[:, None]).view(-1)
        sum_logits = logits.sum(-1) if variant.label_smoothing else None
        summary, exp_shifted = tile_summary_(logits)  # logits now holds z - m
        chunk_stats = finish_token_stats(summary, target_logit, variant, sum_logits, vocab_size)
        chunk_coef = None if coef is None else coef[start:end]
        if variant.dft:
            factor = dft_factor(chunk_stats.lse, target_logit)
            chunk_stats = apply_dft(chunk_stats, factor)
            chunk_coef = None if coef is None else chunk_coef * factor
            if lean:
                lean_coef[start:end] = chunk_coef
        token_loss[start:end] = chunk_stats.token_loss
        lse[start:end] = chunk_stats.lse
        entropy[start:end] = chunk_stats.entropy
        is_top1[start:end] = chunk_stats.is_top1
        if z_term is not None:
            z_term[start:end] = chunk_stats.z_term
        if chunk_coef is None:
            del logits, exp_shifted
            continue
        dlogits = softmax_grad_(exp_shifted, logits if variant.has_softcap else None, summary[0], summary[1],
                                chunk_stats.lse, target_chunk, chunk_coef, variant)
        del logits
        if result.grad_hidden is not None:
            result.grad_hidden[start:end] = dlogits @ weight32
        if result.grad_weight is not None and not lean:
            if start == 0:  # the first chunk writes the accumulator: no memset
                torch.mm(dlogits.T, hidden_chunk, out=result.grad_weight)
            else:
                result.grad_weight.addmm_(dlogits.T, hidden_chunk)
        if result.grad_bias is not None:
            if start == 0:
                torch.sum(dlogits, 0, out=result.grad_bias)
            else:
                result.grad_bias += dlogits.sum(0)
        del dlogits, exp_shifted  # free this chunk's block before the next one is allocated

    if lean and num_tokens:
        _vocab_slab_weight_gradient(request, weight32, bias32, lse, lean_coef, result.grad_weight)
    result.stats = TokenStats(token_loss, lse, entropy, is_top1, z_term)
    return result


def _vocab_slab_weight_gradient(request: PassRequest, weight32: torch.Tensor, bias32: torch.Tensor | None,
                                lse: torch.Tensor, coef: torch.Tensor, grad_weight: torch.Tensor) -> None:
    """Lean mode: ``grad_weight`` from vocabulary slabs ``[M, S]`` of all counted tokens, given their ``lse``.

    Each slab's ``grad_weight`` rows are complete after one GEMM over every token, so they are written once,
    in the weight's dtype.
    """
    variant = request.variant
    hidden32 = request.hidden.float()
    num_tokens, vocab_size = hidden32.shape[0], weight32.shape[0]
    budget_rows = chunk_rows(request, _BYTES_PER_LOGIT, cpu_budget=request.hidden.device.type == "cpu", lean=True)
    slab = max(1, min(vocab_size, budget_rows * vocab_size // num_tokens))  # the chunk budget, spent on [M, S]
    for first in range(0, vocab_size, slab):
        last = min(first + slab, vocab_size)
        logits = transform_logits_(_logits(hidden32, weight32[first:last],
                                           None if bias32 is None else bias32[first:last]), variant)
        (slab_max, _, _), exp_shifted = tile_summary_(logits)
        dlogits = softmax_grad_(exp_shifted, logits if variant.has_softcap else None, slab_max,
                                (lse - slab_max).exp(), lse, request.target - first, coef, variant, vocab_size)
        del logits
        grad_weight[first:last] = dlogits.T @ hidden32
        del dlogits, exp_shifted
