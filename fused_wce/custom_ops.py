"""The ``torch.library`` custom ops behind :func:`fused_wce.linear_cross_entropy`, and their autograd.

``fused_wce::linear_cross_entropy`` computes the loss, the per-token statistics and, for reduced losses, the
gradients in the same pass; its backward only scales them. For ``reduction="none"`` the backward runs
``fused_wce::linear_cross_entropy_backward``, a second pass with the per-token upstream gradient. Each op has a
fake implementation (output shapes from the inputs alone), so ``torch.compile`` sees one opaque node: no graph
break, no guard on how many tokens count, no recompilation when that number changes. Both ops synchronise
with the host once (counting the tokens), so they are tagged ``cudagraph_unsafe``: CUDA-graph capture
(``mode="reduce-overhead"``) partitions the graph around them instead of capturing them.

The options travel as the ops' keyword arguments, one per :class:`fused_wce.options.LossOptions` field
(:meth:`~fused_wce.options.LossOptions.op_schema`), and are rebuilt into one object inside.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .backends import backend_for
from .options import LossOptions
from .passes import Gradients, PassRequest, PassResult, empty_pass
from .validation import count_tokens

_INPUTS = "Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? token_weight"
_GRADS_WANTED = "bool grad_hidden, bool grad_weight, bool grad_bias"
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
# The forward op's outputs; the gradients come last, ``grad_scale`` (0-d fp32) is what they must be multiplied
# by (besides the upstream gradient) to be the gradients of the loss.
FORWARD_OUTPUTS = ("loss", "token_loss", "lse", "entropy", "is_top1", "z_term",
                   "grad_hidden", "grad_weight", "grad_bias", "grad_scale")
_FIRST_GRADIENT = FORWARD_OUTPUTS.index("grad_hidden")


def _on_device(tensor: Tensor):
    """Run with ``tensor``'s CUDA device current: Triton launches on the current device, cuBLAS on the
    tensors', and a model split over GPUs (``device_map``) puts its head on any of them."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def gradient_scale(coef: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """For fp16 matmuls, a power of two ``s`` with ``max|coef| / s`` in (0.5, 1] (1 when every coefficient is 0),
    0-d fp32; 1 for other compute dtypes.

    A pass computes ``dlogits`` from ``coef / s`` and its gradients are multiplied by ``s`` afterwards, in fp32:
    with fp16 ``dlogits``, coefficients like ``1 / 16384`` (a mean over many tokens) would otherwise underflow
    (fp16's smallest normal number is 6.1e-5), before a gradient scaler's factor could help. Powers of two scale
    exactly; bf16 and fp32 share fp32's exponent range and need no scale.
    """
    if coef.numel() == 0 or compute_dtype != torch.float16:
        return torch.ones((), dtype=torch.float32, device=coef.device)
    largest = coef.abs().max()
    return torch.where(largest > 0, torch.exp2(torch.ceil(torch.log2(largest))), torch.ones_like(largest))


def counted_request(hidden, weight, bias, target, token_weight, normalizer, options: LossOptions, coef_of,
                    need_grads, vocab_size: int | None = None, extras_of=None) -> tuple[PassRequest, Tensor, Tensor]:
    """Count the tokens (the one host synchronisation) and gather them into one pass's request.

    ``coef_of(counted_weight, index)`` gives the per-token gradient coefficients (float32 ``[M]``, already
    divided by their :func:`gradient_scale`), or None for statistics only. ``vocab_size`` is the vocabulary
    the targets index (``weight.shape[0]`` by default; the whole vocabulary when ``weight`` is one shard of it).
    ``extras_of(index)``, called after ``coef_of``, gives further :class:`~fused_wce.passes.PassRequest` fields of
    the counted rows (the log-prob backward's entropy coefficients and known statistics).
    Returns ``(request, index, counted_weight)``.
    """
    num_tokens = target.shape[0]
    counted = count_tokens(target, token_weight, vocab_size or weight.shape[0], options.ignore_index, normalizer)
    index = counted.index
    if token_weight is None:
        counted_weight = torch.ones(counted.n_counted, dtype=torch.float32, device=hidden.device)
    else:
        counted_weight = token_weight.index_select(0, index).float()
    # Every token counted (full-sequence SFT): no [N, H] gather copy.
    rows = hidden if counted.n_counted == num_tokens else hidden.index_select(0, index)
    dtype = options.compute_dtype
    coef = coef_of(counted_weight, index)
    request = PassRequest(
        hidden=rows.to(dtype), weight=weight.to(dtype), bias=None if bias is None else bias.to(dtype),
        target=target.index_select(0, index).long(), options=options,
        grad_hidden_dtype=hidden.dtype, grad_weight_dtype=weight.dtype, coef=coef,
        need_grad_hidden=need_grads[0], need_grad_weight=need_grads[1], need_grad_bias=need_grads[2] and bias is not None,
        **(extras_of(index) if extras_of is not None else {}),
    )
    return request, index, counted_weight


def _run_counted(hidden, weight, bias, target, token_weight, normalizer, options: LossOptions, coef_of,
                 need_grads, extras_of=None) -> tuple[PassResult, Tensor, Tensor]:
    """Count the tokens, gather them and run one pass over them (:func:`counted_request`). Returns
    ``(result, index, counted_weight)``."""
    request, index, counted_weight = counted_request(hidden, weight, bias, target, token_weight, normalizer, options,
                                                     coef_of, need_grads, extras_of=extras_of)
    backend = backend_for(options.backend, hidden.device)
    result = backend.run_pass(request) if request.num_tokens else empty_pass(request)
    return result, index, counted_weight


def _scatter_rows(values: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """Rows ``values[j]`` placed at ``index[j]`` of a zero tensor with ``num_rows`` rows."""
    if values.shape[0] == num_rows:  # every row counted: index is 0..N-1, nothing to scatter
        return values
    out = values.new_zeros((num_rows, *values.shape[1:]))
    return out.index_copy_(0, index, values) if index.numel() else out


def _gradient_outputs(gradients: Gradients, index: Tensor, num_tokens: int, hidden: Tensor) -> tuple[Tensor, ...]:
    """The pass's gradients as op outputs: grad_hidden scattered to ``[N, H]``; an empty tensor where absent."""
    def present(t):
        return t if t is not None else hidden.new_empty(0)

    grad_hidden = None if gradients.hidden is None else _scatter_rows(gradients.hidden, index, num_tokens)
    return present(grad_hidden), present(gradients.weight), present(gradients.bias)


# ----------------------------------------------------------------------------------------------- forward op
def _loss_impl(hidden, weight, bias, target, token_weight, normalizer, *, grad_hidden, grad_weight, grad_bias,
               **option_fields):
    """Loss, per-token stats and (reduced losses, when asked) the gradients, as :data:`FORWARD_OUTPUTS`.

    hidden ``[N, H]`` and weight ``[V, H]`` in any float dtype (cast to ``compute_dtype`` for the matmuls),
    target ``[N]``, token_weight float32 ``[N]`` or None, normalizer a 0-d tensor or None. Outputs: loss
    float32 (0-d, or ``[N]`` for "none"); token_loss, lse, entropy float32 ``[N]``; is_top1 bool ``[N]``;
    z_term float32 ``[N]`` (``[0]`` without z-loss); grad_hidden ``[N, H]`` in hidden's dtype, grad_weight
    ``[V, H]`` float32 (weight's dtype with lean_memory), grad_bias float32 ``[V]`` (each ``[0]`` when
    absent), all to be multiplied by grad_scale (0-d float32).
    """
    options = LossOptions(**option_fields)
    with torch.autocast(hidden.device.type, enabled=False), _on_device(hidden):  # the math is fp32 by construction
        return _loss_forward(hidden, weight, bias, target, token_weight, normalizer, options,
                             (grad_hidden, grad_weight, grad_bias))


def _denominator(counted_weight: Tensor, normalizer: Tensor | None, reduction: str) -> Tensor:
    """What the weighted sum is divided by: the normalizer, ``sum(w)`` for "mean" (in float64 so that tiny,
    even subnormal, weights still normalise exactly; 1 when nothing counts, never 0/0), else 1."""
    if normalizer is not None:
        return normalizer.to(device=counted_weight.device, dtype=torch.float32)
    if reduction == "mean":
        total = counted_weight.double().sum()
        return torch.where(total > 0, total, torch.ones_like(total))
    return torch.ones((), dtype=torch.float32, device=counted_weight.device)


def _loss_forward(hidden, weight, bias, target, token_weight, normalizer, options: LossOptions, need_grads,
                  run=_run_counted):
    """The forward op's outputs (:data:`FORWARD_OUTPUTS`); ``run`` counts the tokens and runs their pass (the
    signature of :func:`_run_counted`)."""
    num_tokens = target.shape[0]
    reduced = options.reduction != "none"
    grads_in_forward = reduced and any(need_grads)
    grad_scale = torch.ones((), dtype=torch.float32, device=hidden.device)

    def coef_of(counted_weight, index):
        nonlocal grad_scale
        if not grads_in_forward:
            return None
        coef = (counted_weight / _denominator(counted_weight, normalizer, options.reduction)).float()
        grad_scale = gradient_scale(coef, options.compute_dtype)
        return coef / grad_scale

    result, index, counted_weight = run(hidden, weight, bias, target, token_weight, normalizer, options,
                                        coef_of, need_grads if grads_in_forward else (False,) * 3)
    stats = result.stats
    if reduced:
        denominator = _denominator(counted_weight, normalizer, options.reduction)
        loss = ((counted_weight.double() * stats.token_loss.double()).sum() / denominator).float()
    else:
        loss = _scatter_rows(counted_weight * stats.token_loss, index, num_tokens)
    z_term = (_scatter_rows(stats.z_term, index, num_tokens) if stats.z_term is not None
              else hidden.new_zeros(0, dtype=torch.float32))
    per_token = (_scatter_rows(t, index, num_tokens) for t in (stats.token_loss, stats.lse, stats.entropy,
                                                               stats.is_top1))
    return (loss, *per_token, z_term, *_gradient_outputs(result.gradients, index, num_tokens, hidden), grad_scale)


_loss_op = torch.library.custom_op(
    "fused_wce::linear_cross_entropy", _loss_impl, mutates_args=(), tags=_TAGS,
    schema=f"({_INPUTS}, Tensor? normalizer, *, {_GRADS_WANTED}, {LossOptions.op_schema()}) -> "
           f"({', '.join(['Tensor'] * len(FORWARD_OUTPUTS))})")


@_loss_op.register_fake
def _loss_op_fake(hidden, weight, bias, target, token_weight, normalizer, *, grad_hidden, grad_weight, grad_bias,
                  **option_fields):
    options = LossOptions(**option_fields)
    num_tokens = target.shape[0]
    vocab_size, hidden_size = weight.shape
    f32 = dict(dtype=torch.float32, device=hidden.device)
    reduced = options.reduction != "none"

    def maybe(wanted, *shape, dtype):
        return hidden.new_empty(shape if wanted else (0,), dtype=dtype)

    return (
        hidden.new_empty(() if reduced else (num_tokens,), **f32),
        *(hidden.new_empty(num_tokens, **f32) for _ in range(3)),
        hidden.new_empty(num_tokens, dtype=torch.bool),
        hidden.new_empty(num_tokens if options.has_z_loss else 0, **f32),
        maybe(reduced and grad_hidden, num_tokens, hidden_size, dtype=hidden.dtype),
        maybe(reduced and grad_weight, vocab_size, hidden_size, dtype=options.weight_grad_dtype(weight.dtype)),
        maybe(reduced and grad_bias and bias is not None, vocab_size, dtype=torch.float32),
        hidden.new_empty((), **f32),
    )


# ---------------------------------------------------------------------------------------------- backward op
def _loss_backward_impl(hidden, weight, bias, target, token_weight, grad_output, *, grad_hidden, grad_weight,
                        grad_bias, **option_fields):
    """reduction="none": the gradients for the upstream gradient ``grad_output`` ``[N]`` of the per-token
    losses, from a second pass (the counted tokens are counted again). Outputs as the forward op's gradients,
    already scaled."""
    with torch.autocast(hidden.device.type, enabled=False), _on_device(hidden):
        return _loss_backward(hidden, weight, bias, target, token_weight, grad_output, LossOptions(**option_fields),
                              (grad_hidden, grad_weight, grad_bias))


def _loss_backward(hidden, weight, bias, target, token_weight, grad_output, options: LossOptions, need_grads,
                   run=_run_counted) -> tuple[Tensor, Tensor, Tensor]:
    """The backward op's outputs; ``run`` counts the tokens and runs their pass (as in :func:`_loss_forward`)."""
    grad_scale = None

    def coef_of(counted_weight, index):
        nonlocal grad_scale
        coef = counted_weight * grad_output.index_select(0, index).float()
        grad_scale = gradient_scale(coef, options.compute_dtype)
        return coef / grad_scale

    result, index, _ = run(hidden, weight, bias, target, token_weight, None, options, coef_of, need_grads)
    outputs = _gradient_outputs(result.gradients, index, target.shape[0], hidden)
    if options.compute_dtype == torch.float16:
        for t in outputs:
            t.mul_(grad_scale)
    return outputs


_loss_backward_op = torch.library.custom_op(
    "fused_wce::linear_cross_entropy_backward", _loss_backward_impl, mutates_args=(), tags=_TAGS,
    schema=f"({_INPUTS}, Tensor grad_output, *, {_GRADS_WANTED}, {LossOptions.op_schema()}) -> "
           "(Tensor, Tensor, Tensor)")


def fake_gradients(hidden, weight, bias, num_tokens: int, options: LossOptions, grad_hidden: bool,
                   grad_weight: bool, grad_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A backward op's outputs for its fake implementation: grad_hidden ``[N, H]`` in hidden's dtype,
    grad_weight ``[V, H]`` in :meth:`LossOptions.weight_grad_dtype`, grad_bias ``[V]`` float32; ``[0]`` where
    not wanted."""
    vocab_size, hidden_size = weight.shape
    return (
        hidden.new_empty((num_tokens, hidden_size) if grad_hidden else (0,)),
        hidden.new_empty((vocab_size, hidden_size) if grad_weight else (0,),
                         dtype=options.weight_grad_dtype(weight.dtype)),
        hidden.new_empty((vocab_size,) if grad_bias and bias is not None else (0,), dtype=torch.float32),
    )


@_loss_backward_op.register_fake
def _loss_backward_op_fake(hidden, weight, bias, target, token_weight, grad_output, *, grad_hidden, grad_weight,
                           grad_bias, **option_fields):
    return fake_gradients(hidden, weight, bias, target.shape[0], LossOptions(**option_fields), grad_hidden,
                          grad_weight, grad_bias)


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
    ctx.keywords = keyword_only_inputs
    ctx.dtypes = (hidden.dtype, weight.dtype)
    if keyword_only_inputs["reduction"] == "none":
        ctx.save_for_backward(hidden, weight, bias, target, token_weight)
    else:
        ctx.save_for_backward(*output[_FIRST_GRADIENT:])  # the gradients computed in the forward pass, and scale


def _backward(ctx, grad_loss, backward_op):
    """The forward op's backward; ``backward_op`` is its reduction="none" backward op (same inputs and
    keyword arguments as the forward op, ``grad_output`` in place of ``normalizer``)."""
    keywords = ctx.keywords
    if grad_loss is None:  # the loss itself was not differentiated (only the statistics were used)
        return None, None, None, None, None, None
    hidden_dtype, weight_dtype = ctx.dtypes
    if keywords["reduction"] == "none":
        hidden, weight, bias, target, token_weight = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = backward_op(hidden, weight, bias, target, token_weight, grad_loss,
                                                          **keywords)
    else:
        *gradients, grad_scale = ctx.saved_tensors
        scale = grad_loss.float() * grad_scale
        if _tracing(scale):  # torch.compile / AOTAutograd trace the backward functionally
            grad_hidden, grad_weight, grad_bias = (t * scale for t in gradients)
        else:
            # Scaled in place, so no second [V, H] exists: the saved gradients belong to this node alone (a
            # second backward through it fails autograd's version check instead of scaling them twice).
            grad_hidden, grad_weight, grad_bias = (t.mul_(scale) for t in gradients)

    def cast(t, dtype, wanted):
        return t.to(dtype) if wanted else None

    return (cast(grad_hidden, hidden_dtype, keywords["grad_hidden"]),
            cast(grad_weight, weight_dtype, keywords["grad_weight"]),
            cast(grad_bias, weight_dtype, keywords["grad_bias"] and grad_bias.numel() > 0),
            None, None, None)


def register_loss_autograd(forward_op, backward_op) -> None:
    """Make ``forward_op`` (outputs :data:`FORWARD_OUTPUTS`, inputs ``hidden, weight, bias, target,
    token_weight, normalizer``) differentiable in its loss: reduced losses scale the gradients it computed,
    reduction="none" runs ``backward_op``."""
    def backward(ctx, grad_loss, *unused_output_grads):
        return _backward(ctx, grad_loss, backward_op)

    forward_op.register_autograd(backward, setup_context=_setup_context)


register_loss_autograd(_loss_op, _loss_backward_op)


def loss_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, token_weight: Tensor | None,
            normalizer: Tensor | None, options: LossOptions, *, grad_hidden: bool, grad_weight: bool,
            grad_bias: bool) -> tuple[Tensor, ...]:
    """Call the forward op with ``options`` (resolved) as its keyword arguments; returns FORWARD_OUTPUTS."""
    return _loss_op(hidden, weight, bias, target, token_weight, normalizer, grad_hidden=grad_hidden,
                    grad_weight=grad_weight, grad_bias=grad_bias, **options.op_kwargs())
