"""The Triton path: drives the kernels of :mod:`fused_wce.kernels` over the counted tokens.

Stats only (no gradients wanted, or reduction="none" before its backward): one ``vocab_partials`` launch over
all counted tokens with the vocabulary split across programs, then ``combine``. Logit tiles live only in
registers; memory is three ``[splits, M]`` fp32 summaries. ``2 * M * H * V`` FLOPs.

With gradients: per chunk of ``C`` tokens, ``vocab_partials`` stores the chunk's tile-relative logits in a
``[C, V]`` buffer (hidden's dtype) with one summary per 128-wide vocabulary tile, ``combine`` gives lse and the
stats, ``softmax_grad`` turns the buffer into ``dlogits`` in place, and two GEMMs fold it into
``grad_hidden`` (``dlogits @ weight``) and the fp32 ``grad_weight`` (``dlogits.T @ hidden``).
``6 * M * H * V`` FLOPs; the buffer is bounded by the chunk budget, independent of ``M``.
"""
from __future__ import annotations

import triton
import torch

from . import _passes
from ._passes import PassRequest, PassResult, allocate_gradients, chunk_rows
from .kernels import combine, configs_for, matmul, softmax_grad, vocab_partials
from .kernels.configs import multiprocessor_count
from .loss_math import TokenStats, dft_factor


def _summaries(num_splits: int, num_tokens: int, count: int, device) -> tuple[torch.Tensor, ...]:
    return tuple(_passes.uninitialized(num_splits, num_tokens, dtype=torch.float32, device=device)
                 for _ in range(count))


def run_pass(request: PassRequest) -> PassResult:
    target, variant = request.target, request.variant
    hidden = request.hidden if request.hidden.stride(1) == 1 else request.hidden.contiguous()
    bias = None if request.bias is None else request.bias.contiguous()  # the kernel reads it with unit stride
    # The vocabulary-tile kernel reads rows of H with unit stride (vectorised loads); a transposed or sliced
    # weight is copied once (O(V * H)).
    weight = request.weight if request.weight.stride(1) == 1 else request.weight.contiguous()
    num_tokens = hidden.shape[0]
    vocab_size = weight.shape[0]
    device = hidden.device
    configs = configs_for(device, hidden.dtype)
    vocab_config = configs.vocab_config(softcap=variant.has_softcap, label_smoothing=bool(variant.label_smoothing))
    block_n = vocab_config.block_n
    num_tiles = triton.cdiv(vocab_size, block_n)
    num_summaries = 4 if variant.label_smoothing else 3  # (max, sum exp, sum exp * shifted[, sum z])
    transform = dict(logit_scale=variant.logit_scale, softcap=variant.softcap)
    variant_terms = dict(vocab_size=vocab_size, label_smoothing=variant.label_smoothing, z_loss=variant.z_loss)

    result = allocate_gradients(request)
    token_loss, lse, entropy, target_logit = (_passes.uninitialized(num_tokens, dtype=torch.float32, device=device)
                                              for _ in range(4))
    is_top1 = _passes.uninitialized(num_tokens, dtype=torch.int8, device=device)
    z_term = _passes.uninitialized(num_tokens, dtype=torch.float32, device=device) if variant.z_loss else None

    def finish(rows: slice) -> torch.Tensor | None:
        """DFT: scale the rows' loss by detached p(target); returns that factor (None without DFT)."""
        if not variant.dft:
            return None
        factor = dft_factor(lse[rows], target_logit[rows])
        token_loss[rows] *= factor
        if z_term is not None:
            z_term[rows] *= factor
        return factor

    if request.coef is None:
        row_blocks = triton.cdiv(num_tokens, vocab_config.block_m)
        wanted_splits = triton.cdiv(configs.target_programs_per_sm * multiprocessor_count(device), row_blocks)
        tiles_per_split = triton.cdiv(num_tiles, max(1, min(num_tiles, wanted_splits)))
        partials = _summaries(triton.cdiv(num_tiles, tiles_per_split), num_tokens, num_summaries, device)
        vocab_partials(hidden, weight, bias, target, partials, target_logit, None, tiles_per_split,
                       vocab_config, **transform)
        combine(partials, target_logit, token_loss, lse, entropy, is_top1, configs.combine, z_term=z_term,
                **variant_terms)
        finish(slice(0, num_tokens))
    else:
        rows = min(num_tokens, chunk_rows(request, hidden.element_size(), multiple=vocab_config.block_m))
        logits_buffer = _passes.uninitialized(rows, vocab_size, dtype=hidden.dtype, device=device)
        summary_storage = _passes.uninitialized(num_summaries, num_tiles * rows, dtype=torch.float32, device=device)
        for start in range(0, num_tokens, rows):
            end = min(start + rows, num_tokens)
            chunk = slice(start, end)
            chunk_rows_here = end - start
            logits = logits_buffer[:chunk_rows_here]
            partials = tuple(s[: num_tiles * chunk_rows_here].view(num_tiles, chunk_rows_here)
                             for s in summary_storage)
            hidden_chunk = hidden[chunk]
            vocab_partials(hidden_chunk, weight, bias, target[chunk], partials, target_logit[chunk], logits, 1,
                           vocab_config, **transform)
            combine(partials, target_logit[chunk], token_loss[chunk], lse[chunk], entropy[chunk], is_top1[chunk],
                    configs.combine, z_term=None if z_term is None else z_term[chunk], **variant_terms)
            factor = finish(chunk)
            coef = request.coef[chunk] if factor is None else request.coef[chunk] * factor
            softmax_grad(logits, partials[0], lse[chunk], target[chunk], coef, configs.softmax_grad, block_n,
                         label_smoothing=variant.label_smoothing, z_loss=variant.z_loss, **transform)
            dlogits = logits
            if result.grad_hidden is not None:
                matmul(dlogits, weight, result.grad_hidden[chunk], accumulate=False, config=configs.matmul)
            if result.grad_weight is not None:
                matmul(dlogits.T, hidden_chunk, result.grad_weight, accumulate=True, config=configs.matmul_accumulate)
            if result.grad_bias is not None:
                result.grad_bias += dlogits.sum(0, dtype=torch.float32)

    result.stats = TokenStats(token_loss, lse, entropy, is_top1.bool(), z_term)
    return result
