"""``linear_cross_entropy``: the functional API and the autograd function behind it."""
from __future__ import annotations

import os

import torch

from . import _torch_backend
from ._passes import PassRequest, PassResult, allocate_gradients
from ._validation import check_arguments, count_tokens
from .loss_math import LossVariant, TokenStats
from .types import LossOptions, LossOutput


def _backend_module(options: LossOptions, device: torch.device):
    """The module whose ``run_pass(PassRequest) -> PassResult`` executes the pass."""
    backend = options.backend
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return _torch_backend
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 "
                         "(Triton's CPU interpreter, set before triton is imported)")
    from . import _triton_backend  # imported lazily: CPU users never need triton

    return _triton_backend


def _scatter_rows(values: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Rows ``values[j]`` placed at ``index[j]`` of a zero tensor with ``num_rows`` rows."""
    if values.shape[0] == num_rows:  # every row counted: index is 0..N-1, nothing to scatter
        return values
    out = values.new_zeros((num_rows, *values.shape[1:]))
    return out.index_copy_(0, index, values) if index.numel() else out


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Forward computes the loss (and, for reduced losses, the gradients); backward scales them.

    Inputs: hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, target ``[N]``, token_weight float32
    ``[N]`` or None, normalizer (float, 0-d tensor or None), options (:class:`LossOptions`).
    Outputs: loss (0-d, or ``[N]`` for reduction="none"), then per-token token_loss, lse, entropy ``[N]``
    float32, is_top1 ``[N]`` bool and z_term ``[N]`` float32 (empty without z-loss); all but the loss are
    non-differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, normalizer, options: LossOptions):
        # Inputs arrive already cast (see _apply_autocast); the math inside is fp32 by construction.
        with torch.autocast(hidden.device.type, enabled=False):
            return _LinearCrossEntropyFunction._forward(ctx, hidden, weight, bias, target, token_weight,
                                                        normalizer, options)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, target, token_weight, normalizer, options: LossOptions):
        num_tokens = target.shape[0]
        counted = count_tokens(target, token_weight, weight.shape[0], options.ignore_index, normalizer)
        index = counted.index
        device = hidden.device
        if token_weight is None:
            counted_weight = torch.ones(counted.n_counted, dtype=torch.float32, device=device)
        else:
            counted_weight = token_weight.index_select(0, index)

        if options.reduction == "none":
            denominator = None
        elif normalizer is not None:
            denominator = torch.as_tensor(normalizer, dtype=torch.float32, device=device)
        elif options.reduction == "mean":
            # In float64 so that tiny (even subnormal) weights still normalise exactly; with nothing counted the
            # numerator is 0, and so is the loss (divided by 1, never 0/0).
            total = counted_weight.double().sum()
            denominator = torch.where(total > 0, total, torch.ones_like(total))
        else:
            denominator = torch.ones((), dtype=torch.float32, device=device)

        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads_in_forward = denominator is not None and (need_hidden or need_weight or need_bias)
        recompute_in_backward = denominator is None and (need_hidden or need_weight or need_bias)
        # Every token counted (full-sequence SFT): no [N, H] gather copy, unless backward will read the rows
        # again (a copy then protects them from in-place changes of the caller's tensor).
        gather = counted.n_counted != num_tokens or recompute_in_backward
        request = PassRequest(
            hidden=hidden.index_select(0, index) if gather else hidden,
            weight=weight,
            bias=bias,
            target=target.index_select(0, index).long(),
            coef=(counted_weight / denominator).float() if grads_in_forward else None,
            need_grad_hidden=need_hidden,
            need_grad_weight=need_weight,
            need_grad_bias=need_bias,
            chunk_size=options.chunk_size,
            variant=options.variant,
        )
        backend = _backend_module(options, device)
        result = backend.run_pass(request) if counted.n_counted else _empty_result(request)

        if denominator is None:
            loss = _scatter_rows(counted_weight * result.stats.token_loss, index, num_tokens)
        else:
            weighted_sum = (counted_weight.double() * result.stats.token_loss.double()).sum()
            loss = (weighted_sum / denominator).float()

        ctx.options = options
        ctx.shapes = (num_tokens, hidden.dtype, weight.dtype)
        ctx.backend = backend
        if grads_in_forward:
            ctx.result = result
            ctx.save_for_backward(index)
        elif recompute_in_backward:
            ctx.request = request  # reduction="none": recompute with the per-token upstream gradient
            ctx.counted_weight = counted_weight
            ctx.save_for_backward(index)

        stats = result.stats
        outputs = (
            loss,
            _scatter_rows(stats.token_loss, index, num_tokens),
            _scatter_rows(stats.lse, index, num_tokens),
            _scatter_rows(stats.entropy, index, num_tokens),
            _scatter_rows(stats.is_top1, index, num_tokens),
            _scatter_rows(stats.z_term, index, num_tokens) if stats.z_term is not None
            else hidden.new_zeros(0, dtype=torch.float32),
        )
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *unused_stat_grads):
        with torch.autocast(grad_loss.device.type, enabled=False):
            return _LinearCrossEntropyFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        (index,) = ctx.saved_tensors
        num_tokens, hidden_dtype, weight_dtype = ctx.shapes
        if ctx.options.reduction == "none":
            request = ctx.request
            request.coef = ctx.counted_weight * grad_loss.index_select(0, index).float()
            result = ctx.backend.run_pass(request) if index.numel() else _empty_result(request)
            scale = None
            del ctx.request
        else:
            result = ctx.result
            scale = grad_loss.float()
            del ctx.result

        grad_hidden = grad_weight = grad_bias = None
        if result.grad_hidden is not None:
            rows = result.grad_hidden if scale is None else (result.grad_hidden.float() * scale).to(hidden_dtype)
            grad_hidden = _scatter_rows(rows, index, num_tokens)
        if result.grad_weight is not None:
            grad_weight = (result.grad_weight if scale is None else result.grad_weight.mul_(scale)).to(weight_dtype)
        if result.grad_bias is not None:
            grad_bias = (result.grad_bias if scale is None else result.grad_bias.mul_(scale)).to(weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _empty_result(request: PassRequest) -> PassResult:
    """A pass over zero tokens: empty stats, zero gradients (the loss stays connected to the graph)."""
    result = allocate_gradients(request)
    empty = request.hidden.new_zeros(0, dtype=torch.float32)
    result.stats = TokenStats(empty, empty, empty, empty.bool(), empty if request.variant.z_loss else None)
    return result


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
) -> torch.Tensor | LossOutput:
    """Weighted cross-entropy of ``hidden @ weight.T + bias`` against ``target``, without the full logits.

    Args:
        hidden: ``[..., H]`` float32, float16 or bfloat16 (final hidden states).
        weight: ``[V, H]``, hidden's dtype and device (``lm_head.weight``).
        target: ``[...]`` (hidden.shape[:-1]) int64 or int32, each in ``[0, V)`` or ``== ignore_index``.
        token_weight: ``[...]`` like target, floating, finite, >= 0; None means all ones.
        bias: ``[V]`` or None.
        ignore_index: targets with this value do not count.
        reduction: ``"mean"``: ``sum(w_i l_i) / sum(w_i)``; ``"sum"``: ``sum(w_i l_i)``; ``"none"``:
            ``w_i l_i`` shaped like target. Sums run over counted tokens (target != ignore_index and w_i > 0).
        normalizer: float or 0-d tensor, finite and > 0; if given, the loss is ``sum(w_i l_i) / normalizer``
            (how a trainer normalises over gradient accumulation and ranks).
        chunk_size: counted tokens per chunk; None picks it from ``DEFAULT_CHUNK_BUDGET_BYTES`` (256 MiB of
            ``[chunk, V]`` temporaries; ``CPU_CHUNK_BUDGET_BYTES``, 32 MiB, for the PyTorch path on CPU).
        return_stats: also return per-token lse, entropy, is_top1 and the unweighted loss (:class:`LossOutput`).
        backend: ``"auto"`` (Triton for CUDA tensors, chunked PyTorch otherwise), ``"triton"`` or ``"torch"``.
        label_smoothing: in [0, 1), as ``F.cross_entropy`` defines it.
        z_loss: coefficient (>= 0) of ``lse**2`` added to each counted token's loss before weighting.
        softcap: if given (> 0), logits become ``softcap * tanh(logits / softcap)`` (Gemma-2).
        logit_scale: (> 0) multiplies the logits before the softcap (Cohere; a temperature is 1 / scale).
        dft: multiply each counted token's loss by stop-gradient ``p(target)`` (Dynamic Fine-Tuning).
        Each variant is a compile-time specialisation of the kernels: when off it costs nothing.

    Under ``torch.autocast`` hidden, weight and bias are cast to the autocast dtype first (as ``F.linear``).

    Returns:
        The loss (float32), or a :class:`LossOutput` when ``return_stats``. With nothing counted the loss is
        0.0, connected to the graph with zero gradients.
    """
    hidden, weight, bias = _apply_autocast(hidden, weight, bias)
    check_arguments(hidden, weight, target, token_weight, bias, ignore_index=ignore_index, reduction=reduction,
                    normalizer=normalizer, chunk_size=chunk_size, backend=backend)
    variant = make_variant(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                           logit_scale=logit_scale, dft=dft)
    options = LossOptions(ignore_index=int(ignore_index), reduction=reduction, chunk_size=chunk_size, backend=backend,
                          variant=variant)
    hidden_size = weight.shape[1]
    flat_weight = None if token_weight is None else token_weight.reshape(-1).float()
    loss, token_loss, lse, entropy, is_top1, z_term = _LinearCrossEntropyFunction.apply(
        hidden.reshape(-1, hidden_size), weight, bias, target.reshape(-1), flat_weight, normalizer, options)
    shape = target.shape
    if reduction == "none":
        loss = loss.view(shape)
    if not return_stats:
        return loss
    return LossOutput(loss=loss, token_loss=token_loss.view(shape), lse=lse.view(shape),
                      entropy=entropy.view(shape), is_top1=is_top1.view(shape),
                      z_loss=z_term.view(shape) if variant.z_loss else None)


def _apply_autocast(hidden, weight, bias):
    """Under ``torch.autocast`` the logits matmul runs in the autocast dtype, as ``F.linear`` would: fp32
    master weights (mixed-precision training) meet bf16 hidden states there. Casts are differentiable, so
    gradients reach the fp32 parameters in their own dtype."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return hidden, weight, bias
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t if not isinstance(t, torch.Tensor) or not t.is_floating_point() else t.to(dtype)
            for t in (hidden, weight, bias)]
    return cast[0], cast[1], cast[2]


def make_variant(*, label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0, dft=False) -> LossVariant:
    """A validated :class:`LossVariant`; a TypeError/ValueError names the offending argument."""
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss), ("logit_scale", logit_scale),
                        ("softcap", softcap)):
        if value is None and name == "softcap":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return LossVariant(label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                       softcap=None if softcap is None else float(softcap), logit_scale=float(logit_scale), dft=dft)
