"""``linear_cross_entropy``: the functional API, and the ``torch.library`` custom ops behind it.

The loss is registered as the custom op ``fused_wce::linear_cross_entropy`` (with a fake implementation and
an autograd formula), so ``torch.compile`` sees one opaque node: no graph break, no guard on how many tokens
count, no recompilation when that number changes. The op computes the loss, the per-token statistics and,
for reduced losses, the gradients in the same pass; its backward only scales them. For ``reduction="none"``
the backward runs ``fused_wce::linear_cross_entropy_backward``, a second pass with the per-token upstream
gradient.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import _torch_backend
from ._passes import PassRequest, PassResult, allocate_gradients
from ._validation import FLOAT_DTYPES, check_arguments, count_tokens
from .loss_math import LossVariant, TokenStats
from .types import LossOptions, LossOutput



def _backend_module(backend: str, device: torch.device):
    """The module whose ``run_pass(PassRequest) -> PassResult`` executes the pass."""
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


def _empty_result(request: PassRequest) -> PassResult:
    """A pass over zero tokens: empty stats, zero gradients (the loss stays connected to the graph)."""
    result = allocate_gradients(request, zero=True)
    def empty(dtype=torch.float32):  # distinct tensors: the op's outputs must not alias one another
        return request.hidden.new_zeros(0, dtype=dtype)

    result.stats = TokenStats(empty(), empty(), empty(), empty(torch.bool), empty() if request.variant.z_loss else None)
    return result


def _options(ignore_index, reduction, chunk_size, backend, label_smoothing, z_loss, softcap, logit_scale, dft,
             compute_dtype, lean_memory, normalizer=None) -> LossOptions:
    variant = LossVariant(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
                          dft=dft)
    return LossOptions(ignore_index=int(ignore_index), reduction=reduction, chunk_size=chunk_size, backend=backend,
                       variant=variant, compute_dtype=compute_dtype, lean_memory=lean_memory, normalizer=normalizer)


def _run_counted(hidden, weight, bias, target, token_weight, options: LossOptions, coef_of, need_grads):
    """Count the tokens (the one host synchronisation), gather them and run one pass over them.

    ``coef_of(counted_weight, index)`` gives the per-token gradient coefficients (float32 ``[M]``), or None
    for statistics only. Returns ``(result, index, counted_weight)``.
    """
    num_tokens = target.shape[0]
    counted = count_tokens(target, token_weight, weight.shape[0], options.ignore_index, options.normalizer)
    index = counted.index
    if token_weight is None:
        counted_weight = torch.ones(counted.n_counted, dtype=torch.float32, device=hidden.device)
    else:
        counted_weight = token_weight.index_select(0, index).float()
    coef = coef_of(counted_weight, index)
    # Every token counted (full-sequence SFT): no [N, H] gather copy.
    rows = hidden if counted.n_counted == num_tokens else hidden.index_select(0, index)
    request = PassRequest(
        hidden=rows.to(options.compute_dtype),
        weight=weight.to(options.compute_dtype),
        bias=None if bias is None else bias.to(options.compute_dtype),
        target=target.index_select(0, index).long(),
        coef=coef,
        need_grad_hidden=need_grads[0],
        need_grad_weight=need_grads[1],
        need_grad_bias=need_grads[2] and bias is not None,
        chunk_size=options.chunk_size,
        variant=options.variant,
        grad_hidden_dtype=hidden.dtype,
        grad_weight_dtype=weight.dtype,
        lean_memory=options.lean_memory,
    )
    backend = _backend_module(options.backend, hidden.device)
    result = backend.run_pass(request) if counted.n_counted else _empty_result(request)
    return result, index, counted_weight


def _gradient_outputs(result: PassResult, index, num_tokens: int, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The pass's gradients as op outputs: grad_hidden scattered to ``[N, H]``; an empty tensor where absent."""
    def present(t):
        return t if t is not None else hidden.new_empty(0)

    grad_hidden = None if result.grad_hidden is None else _scatter_rows(result.grad_hidden, index, num_tokens)
    return present(grad_hidden), present(result.grad_weight), present(result.grad_bias)


# ----------------------------------------------------------------------------------------------- forward op
def _loss_impl(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, token_weight: Optional[Tensor],
    normalizer: Optional[Tensor], *, ignore_index: int, reduction: str, chunk_size: Optional[int], backend: str,
    label_smoothing: float, z_loss: float, softcap: Optional[float], logit_scale: float, dft: bool,
    compute_dtype: torch.dtype, lean_memory: bool, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss, per-token stats and (reduced losses, when asked) the unscaled gradients, in this order.

    hidden ``[N, H]`` and weight ``[V, H]`` in any float dtype (cast to ``compute_dtype`` for the matmuls),
    target ``[N]``, token_weight float32 ``[N]`` or None, normalizer a 0-d tensor or None. Outputs: loss
    float32 (0-d, or ``[N]`` for "none"); token_loss, lse, entropy float32 ``[N]``; is_top1 bool ``[N]``;
    z_term float32 ``[N]`` (``[0]`` without z-loss); grad_hidden ``[N, H]`` in hidden's dtype, grad_weight
    ``[V, H]`` float32 (weight's dtype with lean_memory), grad_bias float32 ``[V]`` (each ``[0]`` when absent).
    """
    options = _options(ignore_index, reduction, chunk_size, backend, label_smoothing, z_loss, softcap, logit_scale,
                       dft, compute_dtype, lean_memory, normalizer)
    with torch.autocast(hidden.device.type, enabled=False):  # the math is fp32 by construction
        return _loss_forward(hidden, weight, bias, target, token_weight, options, (grad_hidden, grad_weight, grad_bias))


_loss_op = torch.library.custom_op("fused_wce::linear_cross_entropy", _loss_impl, mutates_args=())


def _loss_forward(hidden, weight, bias, target, token_weight, options: LossOptions, need_grads):
    num_tokens = target.shape[0]
    device = hidden.device
    grads_in_forward = options.reduction != "none" and any(need_grads)
    denominator = None

    def coef_of(counted_weight, index):
        nonlocal denominator
        if options.reduction == "none":
            return None
        if options.normalizer is not None:
            denominator = options.normalizer.to(device=device, dtype=torch.float32)
        elif options.reduction == "mean":
            # In float64 so that tiny (even subnormal) weights still normalise exactly; with nothing counted the
            # numerator is 0, and so is the loss (divided by 1, never 0/0).
            total = counted_weight.double().sum()
            denominator = torch.where(total > 0, total, torch.ones_like(total))
        else:
            denominator = torch.ones((), dtype=torch.float32, device=device)
        return (counted_weight / denominator).float() if grads_in_forward else None

    result, index, counted_weight = _run_counted(hidden, weight, bias, target, token_weight, options, coef_of,
                                                 need_grads if grads_in_forward else (False, False, False))
    stats = result.stats
    if denominator is None:
        loss = _scatter_rows(counted_weight * stats.token_loss, index, num_tokens)
    else:
        loss = ((counted_weight.double() * stats.token_loss.double()).sum() / denominator).float()
    z_term = (_scatter_rows(stats.z_term, index, num_tokens) if stats.z_term is not None
              else hidden.new_zeros(0, dtype=torch.float32))
    return (loss, _scatter_rows(stats.token_loss, index, num_tokens), _scatter_rows(stats.lse, index, num_tokens),
            _scatter_rows(stats.entropy, index, num_tokens), _scatter_rows(stats.is_top1, index, num_tokens),
            z_term, *_gradient_outputs(result, index, num_tokens, hidden))


@_loss_op.register_fake
def _loss_op_fake(hidden, weight, bias, target, token_weight, normalizer, *, ignore_index, reduction, chunk_size,
                  backend, label_smoothing, z_loss, softcap, logit_scale, dft, compute_dtype, lean_memory,
                  grad_hidden, grad_weight, grad_bias):
    num_tokens = target.shape[0]
    vocab_size, hidden_size = weight.shape
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grads = reduction != "none"

    def maybe(wanted, *shape, dtype):
        return hidden.new_empty(shape if wanted else (0,), dtype=dtype)

    return (
        hidden.new_empty((num_tokens,) if reduction == "none" else (), **f32),
        *(hidden.new_empty(num_tokens, **f32) for _ in range(3)),
        hidden.new_empty(num_tokens, dtype=torch.bool),
        hidden.new_empty(num_tokens if z_loss else 0, **f32),
        maybe(grads and grad_hidden, num_tokens, hidden_size, dtype=hidden.dtype),
        maybe(grads and grad_weight, vocab_size, hidden_size, dtype=weight.dtype if lean_memory else torch.float32),
        maybe(grads and grad_bias and bias is not None, vocab_size, dtype=torch.float32),
    )


# ---------------------------------------------------------------------------------------------- backward op
def _loss_backward_impl(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, token_weight: Optional[Tensor],
    grad_output: Tensor, *, ignore_index: int, chunk_size: Optional[int], backend: str, label_smoothing: float,
    z_loss: float, softcap: Optional[float], logit_scale: float, dft: bool, compute_dtype: torch.dtype,
    lean_memory: bool, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction="none": the gradients for the upstream gradient ``grad_output`` ``[N]`` of the per-token
    losses, from a second pass (the counted tokens are counted again). Outputs as in the forward op."""
    options = _options(ignore_index, "none", chunk_size, backend, label_smoothing, z_loss, softcap, logit_scale,
                       dft, compute_dtype, lean_memory)
    with torch.autocast(hidden.device.type, enabled=False):
        def coef_of(counted_weight, index):
            return counted_weight * grad_output.index_select(0, index).float()

        result, index, _ = _run_counted(hidden, weight, bias, target, token_weight, options, coef_of,
                                        (grad_hidden, grad_weight, grad_bias))
        return _gradient_outputs(result, index, target.shape[0], hidden)


_loss_backward_op = torch.library.custom_op("fused_wce::linear_cross_entropy_backward", _loss_backward_impl,
                                            mutates_args=())
# The Python implementation behind each op (tools that trace allocations call them to see inside the ops).
OP_IMPLEMENTATIONS = {"fused_wce::linear_cross_entropy": _loss_impl,
                      "fused_wce::linear_cross_entropy_backward": _loss_backward_impl}


@_loss_backward_op.register_fake
def _loss_backward_op_fake(hidden, weight, bias, target, token_weight, grad_output, *, ignore_index, chunk_size,
                           backend, label_smoothing, z_loss, softcap, logit_scale, dft, compute_dtype, lean_memory,
                           grad_hidden, grad_weight, grad_bias):
    vocab_size, hidden_size = weight.shape
    return (
        hidden.new_empty((target.shape[0], hidden_size) if grad_hidden else (0,)),
        hidden.new_empty((vocab_size, hidden_size) if grad_weight else (0,),
                         dtype=weight.dtype if lean_memory else torch.float32),
        hidden.new_empty((vocab_size,) if grad_bias and bias is not None else (0,), dtype=torch.float32),
    )


# ----------------------------------------------------------------------------------------------- autograd
def _tracing(tensor: Tensor) -> bool:
    """True while torch.compile or AOTAutograd traces (they see fake or functional tensors, not data)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(tensor, (FakeTensor, FunctionalTensor))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    hidden, weight, bias, target, token_weight, _ = inputs
    # Only the loss is differentiable; without this autograd would build zero gradients for the other outputs,
    # a [V, H] fp32 one among them.
    ctx.set_materialize_grads(False)
    ctx.options = keyword_only_inputs
    ctx.dtypes = (hidden.dtype, weight.dtype)
    if keyword_only_inputs["reduction"] == "none":
        ctx.save_for_backward(hidden, weight, bias, target, token_weight)
    else:
        ctx.save_for_backward(*output[6:])  # the gradients computed in the forward pass


def _backward(ctx, grad_loss, *unused_output_grads):
    options = ctx.options
    if grad_loss is None:  # the loss itself was not differentiated (only the statistics were used)
        return None, None, None, None, None, None
    hidden_dtype, weight_dtype = ctx.dtypes
    if options["reduction"] == "none":
        hidden, weight, bias, target, token_weight = ctx.saved_tensors
        backward_options = {k: v for k, v in options.items() if k != "reduction"}
        grad_hidden, grad_weight, grad_bias = _loss_backward_op(hidden, weight, bias, target, token_weight,
                                                                grad_loss, **backward_options)
    else:
        scale = grad_loss.float()
        if _tracing(scale):  # torch.compile / AOTAutograd trace the backward functionally
            grad_hidden, grad_weight, grad_bias = (t * scale for t in ctx.saved_tensors)
        else:
            # Scaled in place, so no second [V, H] exists: the saved gradients belong to this node alone (a
            # second backward through it fails autograd's version check instead of scaling them twice).
            grad_hidden, grad_weight, grad_bias = (t.mul_(scale) for t in ctx.saved_tensors)

    def cast(t, dtype, wanted):
        return t.to(dtype) if wanted else None

    return (cast(grad_hidden, hidden_dtype, options["grad_hidden"]),
            cast(grad_weight, weight_dtype, options["grad_weight"]),
            cast(grad_bias, weight_dtype, options["grad_bias"] and grad_bias.numel() > 0),
            None, None, None)


_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- public API
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
            ``[chunk, V]`` temporaries; ``CPU_CHUNK_BUDGET_BYTES``, 32 MiB, for the PyTorch path on CPU).
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

    The loss runs as the custom op ``fused_wce::linear_cross_entropy``: ``torch.compile(fullgraph=True)``
    captures it as one node, for any number of counted tokens.

    Returns:
        The loss (float32), or a :class:`LossOutput` when ``return_stats``. With nothing counted the loss is
        0.0, connected to the graph with zero gradients.
    """
    casting = compute_dtype is not None or (isinstance(hidden, torch.Tensor)
                                            and torch.is_autocast_enabled(hidden.device.type))
    check_arguments(hidden, weight, target, token_weight, bias, ignore_index=ignore_index, reduction=reduction,
                    normalizer=normalizer, chunk_size=chunk_size, backend=backend, mixed_dtypes=casting)
    if compute_dtype is None:
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if casting else hidden.dtype
    elif compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
    check_variant(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale, dft=dft)
    if not isinstance(lean_memory, bool):
        raise TypeError(f"lean_memory must be a bool, got {type(lean_memory).__name__}")

    hidden_size = weight.shape[1]
    flat_hidden = hidden.reshape(-1, hidden_size)
    flat_weight = None if token_weight is None else token_weight.reshape(-1).float()
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):
        normalizer = torch.tensor(float(normalizer), dtype=torch.float64)  # a CPU scalar: no device copy here
    grad_enabled = torch.is_grad_enabled()
    outputs = _loss_op(
        flat_hidden, weight, bias, target.reshape(-1), flat_weight, normalizer,
        ignore_index=int(ignore_index), reduction=reduction, chunk_size=chunk_size, backend=backend,
        label_smoothing=float(label_smoothing), z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap), logit_scale=float(logit_scale), dft=dft,
        compute_dtype=compute_dtype, lean_memory=lean_memory,
        grad_hidden=grad_enabled and hidden.requires_grad, grad_weight=grad_enabled and weight.requires_grad,
        grad_bias=grad_enabled and bias is not None and bias.requires_grad,
    )
    loss, token_loss, lse, entropy, is_top1, z_term = outputs[:6]
    shape = target.shape
    if reduction == "none":
        loss = loss.view(shape)
    if not return_stats:
        return loss
    return LossOutput(loss=loss, token_loss=token_loss.detach().view(shape), lse=lse.detach().view(shape),
                      entropy=entropy.detach().view(shape), is_top1=is_top1.view(shape),
                      z_loss=z_term.detach().view(shape) if z_loss else None)


def check_variant(*, label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0, dft=False) -> None:
    """Raise TypeError/ValueError naming the offending loss-variant argument (see :class:`LossVariant`)."""
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss), ("logit_scale", logit_scale),
                        ("softcap", softcap)):
        if value is None and name == "softcap":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    LossVariant.check(label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                      softcap=None if softcap is None else float(softcap), logit_scale=float(logit_scale), dft=dft)
