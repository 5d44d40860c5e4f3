"""The Triton path: drives the kernels of :mod:`fused_wce.kernels` over the counted tokens.

Stats only (no gradients wanted, or reduction="none" before its backward): one ``vocab_partials`` launch over
all counted tokens with the vocabulary split across programs, then ``combine``. Logit tiles live only in
registers; memory is three ``[splits, M]`` fp32 summaries. ``2 * M * H * V`` FLOPs.

With gradients: per chunk of ``C`` tokens, ``vocab_partials`` stores the chunk's tile-relative logits in a
``[C, V]`` buffer (the compute dtype) with one summary per vocabulary tile, ``combine`` gives lse and the
stats, ``softmax_grad`` turns the buffer into ``dlogits`` in place, and two cuBLAS GEMMs fold it into
``grad_hidden`` (``dlogits @ weight``) and the fp32 ``grad_weight`` (``dlogits.T @ hidden``, accumulated over
chunks with fp32 output; the first chunk writes it, no memset). ``6 * M * H * V`` FLOPs; the buffer is bounded
by the chunk budget, independent of ``M``.

Lean memory (``request.lean_memory``): the chunk loop above computes everything but ``grad_weight``
(``grad_hidden`` is still one exact GEMM per chunk); then per vocabulary slab ``[v0, v1)`` of all ``M`` tokens,
``vocab_partials`` recomputes the slab's logits and ``softmax_grad`` turns them into ``dlogits`` ``[M, S]``
with the lse the chunks found, and ``grad_weight[v0:v1] = dlogits.T @ hidden`` is complete after that one
GEMM (fp32 accumulation inside cuBLAS), written straight in the weight's dtype. No fp32 ``[V, H]`` exists;
``8 * M * H * V`` FLOPs. Both loops spend a quarter of the chunk budget (``LEAN_BUDGET_DIVISOR``).
"""
from __future__ import annotations

import triton
import torch

from . import _passes
from ._passes import PassRequest, PassResult, allocate_gradients, chunk_rows
from .kernels import combine, configs_for, softmax_grad, vocab_partials
from .kernels.configs import multiprocessor_count
from .loss_math import TokenStats, dft_factor


def _summaries(num_splits: int, num_tokens: int, count: int, device) -> tuple[torch.Tensor, ...]:
    return tuple(_passes.uninitialized(num_splits, num_tokens, dtype=torch.float32, device=device)
                 for _ in range(count))


_CPU_UPCAST_BLOCK = 128


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, accumulate: bool) -> None:
    """``out (+)= a @ b`` with cuBLAS; ``a``, ``b`` share a dtype, ``out`` may be wider (fp32 output).

    Reduced-precision inputs with an fp32 ``out`` use torch's ``out_dtype=float32`` GEMM on CUDA (fp32
    accumulation and output, no rounding to bf16 in between). CPU tensors (the interpreter) have no such GEMM:
    there the exact products of the same inputs are summed in fp32, which is what it computes, upcasting
    ``_CPU_UPCAST_BLOCK`` columns of ``a`` (rows of ``b``) at a time so that the emulation allocates no
    operand-sized fp32 copy the GPU path would not.
    """
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and a.is_cuda:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif out.dtype == torch.float32:
        for start in range(0, a.shape[1], _CPU_UPCAST_BLOCK):
            block = slice(start, start + _CPU_UPCAST_BLOCK)
            if start == 0 and not accumulate:
                torch.mm(a[:, block].float(), b[block].float(), out=out)
            else:
                out.addmm_(a[:, block].float(), b[block].float())
    else:  # e.g. fp16 weights computed in bf16: an fp32 product rounded once to out's dtype
        product = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        matmul_into(a, b, product, accumulate=False)
        out.add_(product) if accumulate else out.copy_(product)


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
    grad_terms = dict(label_smoothing=variant.label_smoothing, z_loss=variant.z_loss, **transform)

    result = allocate_gradients(request)
    token_loss, lse, entropy, target_logit = (_passes.uninitialized(num_tokens, dtype=torch.float32, device=device)
                                              for _ in range(4))
    is_top1 = _passes.uninitialized(num_tokens, dtype=torch.int8, device=device)
    z_term = _passes.uninitialized(num_tokens, dtype=torch.float32, device=device) if variant.z_loss else None
    # fp32 weights: the fp32 accumulator is the gradient itself; lean mode would only cost FLOPs.
    lean = (request.coef is not None and request.lean_memory and result.grad_weight is not None
            and request.grad_weight_dtype != torch.float32)

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
        rows = min(num_tokens, chunk_rows(request, hidden.element_size(), multiple=vocab_config.block_m,
                                          lean=lean))
        # Lean mode: each token's gradient coefficient (with DFT's factor), for the vocabulary slabs.
        lean_coef = _passes.uninitialized(num_tokens, dtype=torch.float32, device=device) if lean else None
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
            if lean_coef is not None:
                lean_coef[chunk] = coef
            softmax_grad(logits, partials[0], lse[chunk], target[chunk], coef, configs.softmax_grad, block_n,
                         **grad_terms)
            dlogits = logits
            first = start == 0  # the first chunk writes the fp32 accumulators: no memset
            if result.grad_hidden is not None:
                matmul_into(dlogits, weight, result.grad_hidden[chunk], accumulate=False)
            if result.grad_weight is not None and not lean:
                matmul_into(dlogits.T, hidden_chunk, result.grad_weight, accumulate=not first)
            if result.grad_bias is not None:
                if first:
                    torch.sum(dlogits, 0, dtype=torch.float32, out=result.grad_bias)
                else:
                    result.grad_bias += dlogits.sum(0, dtype=torch.float32)
        del logits_buffer, summary_storage
        if lean:
            _vocab_slab_weight_gradient(request, hidden, weight, bias, lse, lean_coef, result.grad_weight,
                                        vocab_config, configs, grad_terms)

    result.stats = TokenStats(token_loss, lse, entropy, is_top1.bool(), z_term)
    return result


def _vocab_slab_weight_gradient(request: PassRequest, hidden: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None, lse: torch.Tensor, coef: torch.Tensor,
                                grad_weight: torch.Tensor, vocab_config, configs, grad_terms: dict) -> None:
    """Lean mode: ``grad_weight`` from vocabulary slabs ``[M, S]`` of all ``M`` tokens, given their ``lse``.

    ``S`` spends the chunk budget on one slab (a multiple of the tile width ``BLOCK_SIZE_N``, at least one
    tile). ``vocab_partials`` recomputes the slab's tile-relative logits and their tile maxima, ``softmax_grad``
    turns them into ``dlogits`` with the whole-row ``lse`` (targets relative to the slab), then
    ``grad_weight[slab]`` is one GEMM over every token, written in its final dtype.
    """
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    device = hidden.device
    block_n = vocab_config.block_n
    budget_rows = chunk_rows(request, hidden.element_size(), lean=True)
    slab = max(block_n, (budget_rows * vocab_size // num_tokens) // block_n * block_n)
    slab = min(slab, triton.cdiv(vocab_size, block_n) * block_n)
    num_summaries = 4 if grad_terms["label_smoothing"] else 3
    logits_buffer = _passes.uninitialized(num_tokens, min(slab, vocab_size), dtype=hidden.dtype, device=device)
    summary_storage = _passes.uninitialized(num_summaries, (slab // block_n) * num_tokens, dtype=torch.float32,
                                            device=device)
    slab_target_logit = torch.empty(num_tokens, dtype=torch.float32, device=device)  # not needed again
    for first in range(0, vocab_size, slab):
        last = min(first + slab, vocab_size)
        width = last - first
        tiles = triton.cdiv(width, block_n)
        logits = logits_buffer[:, :width]
        partials = tuple(s[: tiles * num_tokens].view(tiles, num_tokens) for s in summary_storage)
        slab_target = request.target - first
        vocab_partials(hidden, weight[first:last], None if bias is None else bias[first:last], slab_target,
                       partials, slab_target_logit, logits, 1, vocab_config,
                       logit_scale=grad_terms["logit_scale"], softcap=grad_terms["softcap"])
        softmax_grad(logits, partials[0], lse, slab_target, coef, configs.softmax_grad, block_n,
                     num_classes=vocab_size, **grad_terms)
        matmul_into(logits.T, hidden, grad_weight[first:last], accumulate=False)
