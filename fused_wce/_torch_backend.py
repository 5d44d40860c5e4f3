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
from .loss_math import TokenStats, finish_token_stats, softmax_grad_, tile_summary_

# Two fp32 [C, V] buffers are alive at once (z - m and exp(z - m)).
_BYTES_PER_LOGIT = 2 * 4


def run_pass(request: PassRequest) -> PassResult:
    hidden, target, coef = request.hidden, request.target, request.coef
    weight32 = request.weight.float()
    bias32 = None if request.bias is None else request.bias.float()
    result = allocate_gradients(request)
    num_tokens = hidden.shape[0]
    stats = [_passes.uninitialized(num_tokens, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    is_top1 = _passes.uninitialized(num_tokens, dtype=torch.bool, device=hidden.device)
    rows = chunk_rows(request, _BYTES_PER_LOGIT)

    for start in range(0, num_tokens, rows):
        end = min(start + rows, num_tokens)
        hidden_chunk = hidden[start:end].float()
        target_chunk = target[start:end]
        if bias32 is None:
            logits = hidden_chunk @ weight32.T
        else:
            logits = torch.addmm(bias32, hidden_chunk, weight32.T)
        target_logit = logits.gather(1, target_chunk[:, None]).view(-1)
        summary, exp_shifted = tile_summary_(logits)
        del logits  # now holds z - m; exp_shifted is all the gradient needs
        chunk_stats = finish_token_stats(summary, target_logit)
        for out, value in zip(stats, chunk_stats[:3]):
            out[start:end] = value
        is_top1[start:end] = chunk_stats.is_top1
        if coef is None:
            continue
        dlogits = softmax_grad_(exp_shifted, summary[1], target_chunk, coef[start:end])
        if result.grad_hidden is not None:
            result.grad_hidden[start:end] = dlogits @ weight32
        if result.grad_weight is not None:
            result.grad_weight.addmm_(dlogits.T, hidden_chunk)
        if result.grad_bias is not None:
            result.grad_bias += dlogits.sum(0)

    result.stats = TokenStats(*stats, is_top1)
    return result
