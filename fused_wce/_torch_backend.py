"""The CPU path: chunked PyTorch with the same semantics and memory bound as the Triton path.

Per chunk of ``C`` counted tokens it materialises one fp32 ``[C, V]`` logit block (two, while the softmax is
formed), applies :mod:`fused_wce.loss_math` to whole rows, and, when gradients are requested, turns the block
into ``dlogits`` in place and folds it into ``grad_hidden``, ``grad_weight`` and ``grad_bias`` with three GEMMs.
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
    rows = chunk_rows(request, _BYTES_PER_LOGIT, cpu_budget=device.type == "cpu")

    for start in range(0, num_tokens, rows):
        end = min(start + rows, num_tokens)
        hidden_chunk = hidden[start:end].float()
        target_chunk = target[start:end]
        if bias32 is None:
            logits = hidden_chunk @ weight32.T
        else:
            logits = torch.addmm(bias32, hidden_chunk, weight32.T)
        transform_logits_(logits, variant)
        target_logit = logits.gather(1, target_chunk[:, None]).view(-1)
        sum_logits = logits.sum(-1) if variant.label_smoothing else None
        summary, exp_shifted = tile_summary_(logits)  # logits now holds z - m
        chunk_stats = finish_token_stats(summary, target_logit, variant, sum_logits, vocab_size)
        chunk_coef = None if coef is None else coef[start:end]
        if variant.dft:
            factor = dft_factor(chunk_stats.lse, target_logit)
            chunk_stats = apply_dft(chunk_stats, factor)
            chunk_coef = None if coef is None else chunk_coef * factor
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
        if result.grad_weight is not None:
            result.grad_weight.addmm_(dlogits.T, hidden_chunk)
        if result.grad_bias is not None:
            result.grad_bias += dlogits.sum(0)
        del dlogits, exp_shifted  # free this chunk's block before the next one is allocated

    result.stats = TokenStats(token_loss, lse, entropy, is_top1, z_term)
    return result
