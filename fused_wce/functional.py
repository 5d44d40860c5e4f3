"""``linear_cross_entropy`` and ``linear_log_prob``: the functional API.

Each validates the arguments (one :class:`~fused_wce.options.LossOptions` for the keyword options, then the
tensors) and calls its custom op: ``fused_wce::linear_cross_entropy`` (:mod:`fused_wce.custom_ops`) or
``fused_wce::linear_log_prob`` (:mod:`fused_wce.log_prob_ops`).
"""
from __future__ import annotations

import torch

from .custom_ops import loss_op
from .log_prob_ops import log_prob_op
from .options import LossOptions
from .outputs import LossOutput
from .validation import check_tensors
from .vocab_parallel import local_inputs, vocab_parallel_loss_op
from .vocab_parallel_log_prob import vocab_parallel_log_prob_op


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    token_weight: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_stats: bool = False,
    backend: str = "auto",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    dft: bool = False,
    compute_dtype: torch.dtype | None = None,
    lean_memory: bool = False,
    logits_gemm: str = "auto",
    process_group=None,
    vocab_start: int | None = None,
    sequence_parallel: bool = False,
) -> torch.Tensor | LossOutput:
    """Weighted cross-entropy of ``hidden @ weight.T + bias`` against ``target``, without the full logits.

    Args:
        hidden: ``[..., H]`` float32, float16 or bfloat16 (final hidden states).
        weight: ``[V, H]``, hidden's dtype unless ``compute_dtype`` or autocast sets the matmul dtype
            (``lm_head.weight``).
        target: ``[...]`` (hidden.shape[:-1]) int64 or int32, each in ``[0, V)`` or ``== ignore_index``.
        token_weight: ``[...]`` like target, floating, finite, >= 0; None means all ones.
        bias: ``[V]`` or None.
        ignore_index: targets with this value do not count.
        reduction: ``"mean"``: ``sum(w_i l_i) / sum(w_i)``; ``"sum"``: ``sum(w_i l_i)``; ``"none"``:
            ``w_i l_i`` shaped like target. Sums run over counted tokens (target != ignore_index and w_i > 0).
        normalizer: float or 0-d tensor, finite and > 0; if given, the loss is ``sum(w_i l_i) / normalizer``
            (how a trainer normalises over gradient accumulation and ranks).
        chunk_size: counted tokens per chunk; None picks it from ``DEFAULT_CHUNK_BUDGET_BYTES`` (256 MiB of
            temporaries; ``CPU_CHUNK_BUDGET_BYTES``, 3 MiB, for the PyTorch path on CPU), see fused_wce.budget.
        return_stats: also return per-token lse, entropy, is_top1 and the unweighted loss (:class:`LossOutput`).
        backend: ``"auto"`` (Triton for CUDA tensors, chunked PyTorch otherwise), ``"triton"`` or ``"torch"``.
        label_smoothing: in [0, 1), as ``F.cross_entropy`` defines it.
        z_loss: coefficient (>= 0) of ``lse**2`` added to each counted token's loss before weighting.
        softcap: if given (> 0), logits become ``softcap * tanh(logits / softcap)`` (Gemma-2).
        logit_scale: (> 0) multiplies the logits before the softcap (Cohere; a temperature is 1 / scale).
        dft: multiply each counted token's loss by stop-gradient ``p(target)`` (Dynamic Fine-Tuning).
        Each variant is a compile-time specialisation of the kernels: when off it costs nothing.
        compute_dtype: dtype of the logit matmuls (float32, float16 or bfloat16); hidden, weight and bias are
            cast to it inside the op and their gradients come back in their own dtypes, so fp32 master weights
            receive their fp32 gradient with no extra ``[V, H]`` copy. None: the autocast dtype under
            ``torch.autocast`` (as ``F.linear``), else hidden's dtype.
        lean_memory: compute ``grad_weight`` per vocabulary slab over all counted tokens, written straight in
            the weight's dtype, instead of accumulating an fp32 ``[V, H]`` over token chunks: with bf16 weights
            the extra memory falls from ``6 * V * H`` bytes (fp32 accumulator + bf16 copy) to ``~0``, for
            ``8 * M * H * V`` instead of ``6 * M * H * V`` FLOPs. Same loss and gradients up to rounding.
        logits_gemm: how the Triton path forms a chunk's logits: ``"cublas"`` (a cuBLAS GEMM with fp32 output,
            then one Triton row kernel; in the statistics-only pass too), ``"triton"`` (a register-tiled Triton
            matmul: in the gradient pass it stores tile-relative logits in the compute dtype, in the
            statistics-only pass it stores none), or ``"auto"`` (``"cublas"`` for the gradient pass, measured
            faster; ``"triton"`` for the statistics-only pass: no-grad calls, evaluation, the forward of
            ``reduction="none"``). Same results up to rounding; the CPU path ignores it.

    Vocabulary parallelism (a tensor-parallel LM head, docs/vocab_parallel.md): ``weight`` (and ``bias``) may be
    a DTensor sharded ``Shard(0)`` on a 1-D mesh, or this rank's rows ``[vocab_start, vocab_start + rows)`` of
    the vocabulary with ``process_group`` (the ranks' rows must tile ``[0, V)``; uneven is fine). Every rank of
    the group calls the loss; the ranks exchange per-token fp32 summaries and the hidden gradient, never
    logits or weights. ``hidden``, ``target`` and ``token_weight`` are the same on every rank, unless
    ``sequence_parallel=True`` (or hidden is a DTensor sharded along a token dimension): then each rank passes
    its own tokens. The loss (reduced over every rank's tokens) is the same on every rank; per-token outputs
    are this rank's tokens'; ``weight``'s gradient is this rank's rows'.

    The loss runs as the custom op ``fused_wce::linear_cross_entropy``: ``torch.compile(fullgraph=True)``
    captures it as one node, for any number of counted tokens.

    Returns:
        The loss (float32), or a :class:`LossOutput` when ``return_stats``. With nothing counted the loss is
        0.0, connected to the graph with zero gradients.
    """
    options = LossOptions(ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
                          label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
                          dft=dft, compute_dtype=compute_dtype, lean_memory=lean_memory, logits_gemm=logits_gemm)
    return _call(hidden, weight, target, token_weight, bias, normalizer, options, return_stats,
                 process_group=process_group, vocab_start=vocab_start, sequence_parallel=sequence_parallel)


def _call(hidden, weight, target, token_weight, bias, normalizer, options: LossOptions,
          return_stats: bool, *, process_group=None, vocab_start: int | None = None,
          sequence_parallel: bool = False) -> torch.Tensor | LossOutput:
    """:func:`linear_cross_entropy` with its keyword options already in ``options`` (also used by
    :class:`fused_wce.LinearCrossEntropy`)."""
    hidden, weight, target, token_weight, bias, normalizer, shard = local_inputs(
        hidden, weight, target, token_weight, bias, normalizer, process_group, vocab_start, sequence_parallel)
    check_tensors(hidden, weight, target, token_weight, bias, normalizer, options)
    options = options.resolved(hidden)
    hidden_size = weight.shape[1]
    flat_weight = None if token_weight is None else token_weight.reshape(-1).float()
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):
        normalizer = torch.tensor(float(normalizer), dtype=torch.float64)  # a CPU scalar: no device copy here
    grad_enabled = torch.is_grad_enabled()
    grads = dict(grad_hidden=grad_enabled and hidden.requires_grad, grad_weight=grad_enabled and weight.requires_grad,
                 grad_bias=grad_enabled and bias is not None and bias.requires_grad)
    flat = (hidden.reshape(-1, hidden_size), weight, bias, target.reshape(-1), flat_weight, normalizer, options)
    outputs = loss_op(*flat, **grads) if shard is None else vocab_parallel_loss_op(*flat, shard, **grads)
    loss, token_loss, lse, entropy, is_top1, z_term = outputs[:6]
    shape = target.shape
    if options.reduction == "none":
        loss = loss.view(shape)
    if not return_stats:
        return loss
    return LossOutput(loss=loss, token_loss=token_loss.detach().view(shape), lse=lse.detach().view(shape),
                      entropy=entropy.detach().view(shape), is_top1=is_top1.view(shape),
                      z_loss=z_term.detach().view(shape) if options.has_z_loss else None)


def linear_log_prob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    lean_memory: bool = False,
    logits_gemm: str = "auto",
    process_group=None,
    vocab_start: int | None = None,
    sequence_parallel: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities ``log p(target)`` (and entropies) of ``hidden @ weight.T + bias``, without the
    full logits: what every policy-gradient loss (GRPO, DAPO, Dr.GRPO, PPO clipping, a KL to a reference model)
    needs from the LM head.

    The distribution is ``softmax(z)`` with ``z = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature``:
    the temperature divides the logits after the model's own final softcapping, as TRL's GRPO does when it
    scores sampled completions (``logits / temperature``).

    Args:
        hidden: ``[..., H]`` float32, float16 or bfloat16 (final hidden states).
        weight: ``[V, H]``, hidden's dtype unless ``compute_dtype`` or autocast sets the matmul dtype.
        target: ``[...]`` (hidden.shape[:-1]) int64 or int32, each in ``[0, V)`` or ``== ignore_index``.
        bias: ``[V]`` or None.
        temperature: finite, > 0; divides the (scaled, softcapped) logits.
        softcap: if given (> 0), logits become ``softcap * tanh(logits / softcap)`` before the temperature.
        logit_scale: (> 0) multiplies the logits before the softcap.
        return_entropy: also return each token's entropy (nats) of the same distribution.
        ignore_index: targets with this value get log-prob and entropy 0 and no gradient (prompt, padding).
        chunk_size, backend, compute_dtype, lean_memory, logits_gemm: as for :func:`linear_cross_entropy`.
        process_group, vocab_start, sequence_parallel: a vocabulary-parallel LM head, as for
            :func:`linear_cross_entropy` (or ``weight``/``bias`` as DTensors sharded ``Shard(0)``): every rank gets
            its tokens' log-probs and entropies over the whole vocabulary, and the gradients of its weight rows.

    Returns:
        ``log_prob`` float32 shaped like ``target`` (0 where ignored), or ``(log_prob, entropy)`` with
        ``return_entropy``. Both are differentiable with any upstream gradient per token (any sign, any value):
        the backward recomputes the logits chunk by chunk and applies ``d log p_t / dz = onehot - p`` and
        ``d H / dz = -p (log p + H)`` (through the temperature, softcap and logit scale) inside the gradient
        GEMMs' pass. Without gradients (``torch.no_grad()``, or no input requiring grad) the call is a single
        statistics-only pass (``2 N H V`` FLOPs).

    It runs as the custom op ``fused_wce::linear_log_prob``: ``torch.compile(fullgraph=True)`` captures it as one
    node, for any number of ignored tokens.
    """
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    options = LossOptions(ignore_index=ignore_index, reduction="none", chunk_size=chunk_size, backend=backend,
                          softcap=softcap, logit_scale=logit_scale, compute_dtype=compute_dtype,
                          lean_memory=lean_memory, logits_gemm=logits_gemm).tempered(temperature)
    hidden, weight, target, _, bias, _, shard = local_inputs(hidden, weight, target, None, bias, None, process_group,
                                                             vocab_start, sequence_parallel)
    check_tensors(hidden, weight, target, None, bias, None, options)
    options = options.resolved(hidden)
    flat = (hidden.reshape(-1, weight.shape[1]), weight, bias, target.reshape(-1), options)
    log_prob, entropy, _ = log_prob_op(*flat) if shard is None else vocab_parallel_log_prob_op(*flat, shard)
    shape = target.shape
    if return_entropy:
        return log_prob.view(shape), entropy.view(shape)
    return log_prob.view(shape)
