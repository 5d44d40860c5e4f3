"""The ``torch.library`` custom ops behind :func:`fused_wce.linear_log_prob`, and their autograd.

``fused_wce::linear_log_prob`` is one statistics-only pass over the counted tokens (target != ignore_index):
per token ``log_prob = z_t - lse`` (minus the plain cross-entropy of the transformed logits), its ``entropy``
and ``lse``, each ``[N]`` fp32, 0 where ignored. Nothing of the backward happens in it, so a no-grad call (old
and reference log-probs) costs exactly that pass: ``2 M H V`` FLOPs.

Its backward runs ``fused_wce::linear_log_prob_backward``: one gradient pass over the counted tokens given the
forward's lse and entropy (:class:`fused_wce.passes.KnownRowStats`), with per-token coefficients
``c = -grad_log_prob`` (``d log p_t / dz = onehot - p``, minus the cross-entropy's) and ``e = grad_entropy``
(``dH / dz = -p (log p + H)``), both applied to ``dlogits`` inside the dX/dW GEMMs' pass:
``dlogits = (-g_lp (p - onehot) - g_H p (z - lse + H)) dz/dr``. Each op has a fake implementation and the
``cudagraph_unsafe`` tag (it counts the tokens on the host), as :mod:`fused_wce.custom_ops` explains.

The options travel as keyword arguments, the :data:`fused_wce.options.LOG_PROB_FIELDS` of a
:class:`~fused_wce.options.LossOptions` whose logit transform already includes the temperature
(:meth:`~fused_wce.options.LossOptions.tempered`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .custom_ops import (_TAGS, _gradient_outputs, _on_device, _run_counted, _scatter_rows, fake_gradients,
                         gradient_scale)
from .options import LOG_PROB_FIELDS, LossOptions
from .passes import KnownRowStats

_INPUTS = "Tensor hidden, Tensor weight, Tensor? bias, Tensor target"
_SCHEMA_OPTIONS = LossOptions.op_schema(LOG_PROB_FIELDS)


def _options(option_fields: dict) -> LossOptions:
    """The pass options of a log-prob op call: the plain loss with the given transform and execution fields."""
    return LossOptions(reduction="none", **option_fields)


# ----------------------------------------------------------------------------------------------- forward op
def log_prob_forward(hidden, weight, bias, target, options: LossOptions, run=_run_counted):
    """``(log_prob, entropy, lse)``, each float32 ``[N]`` and 0 where ``target == ignore_index``, from one
    statistics-only pass (``run``: :func:`fused_wce.custom_ops._run_counted`, or a vocabulary slice's)."""
    result, index, _ = run(hidden, weight, bias, target, None, None, options, lambda counted_weight, index: None,
                           (False, False, False))
    stats = result.stats
    return tuple(_scatter_rows(values, index, target.shape[0])
                 for values in (stats.token_loss.neg(), stats.entropy, stats.lse))


def _log_prob_impl(hidden, weight, bias, target, **option_fields):
    """``(log_prob, entropy, lse)`` (:func:`log_prob_forward`). hidden ``[N, H]`` and weight ``[V, H]`` in any
    float dtype (cast to ``compute_dtype``), target ``[N]``."""
    with torch.autocast(hidden.device.type, enabled=False), _on_device(hidden):
        return log_prob_forward(hidden, weight, bias, target, _options(option_fields))


_log_prob_op = torch.library.custom_op(
    "fused_wce::linear_log_prob", _log_prob_impl, mutates_args=(), tags=_TAGS,
    schema=f"({_INPUTS}, *, {_SCHEMA_OPTIONS}) -> (Tensor, Tensor, Tensor)")


@_log_prob_op.register_fake
def _log_prob_op_fake(hidden, weight, bias, target, **option_fields):
    return tuple(hidden.new_empty(target.shape[0], dtype=torch.float32) for _ in range(3))


# ---------------------------------------------------------------------------------------------- backward op
def log_prob_backward(hidden, weight, bias, target, lse, entropy, grad_log_prob, grad_entropy, options: LossOptions,
                      need_grads, run=_run_counted):
    """The gradients for the upstream gradients of the log-probs and entropies (``[N]`` each, or None when that
    output was not differentiated), from one pass given the forward's ``lse`` and ``entropy`` ``[N]``. Outputs
    ``(grad_hidden [N, H] in hidden's dtype, grad_weight [V, H] float32 (weight's dtype with lean_memory),
    grad_bias [V] float32)``, each ``[0]`` when not wanted."""
    extras = {}

    def coef_of(counted_weight, index):
        # c = -g_lp (log p_t is minus the cross-entropy), e = g_H; one power-of-two scale for both (fp16).
        coef = (-grad_log_prob.index_select(0, index).float() if grad_log_prob is not None
                else torch.zeros_like(counted_weight))
        entropy_coef = None if grad_entropy is None else grad_entropy.index_select(0, index).float()
        largest = coef if entropy_coef is None else torch.maximum(coef.abs(), entropy_coef.abs())
        extras["scale"] = scale = gradient_scale(largest, options.compute_dtype)
        extras["entropy_coef"] = None if entropy_coef is None else entropy_coef / scale
        extras["known"] = KnownRowStats(lse.index_select(0, index).float(), entropy.index_select(0, index).float())
        return coef / scale

    def extras_of(index):
        return {"entropy_coef": extras["entropy_coef"], "known": extras["known"]}

    result, index, _ = run(hidden, weight, bias, target, None, None, options, coef_of, need_grads, extras_of)
    outputs = _gradient_outputs(result.gradients, index, target.shape[0], hidden)
    if options.compute_dtype == torch.float16:
        for t in outputs:
            t.mul_(extras["scale"])
    return outputs


def _log_prob_backward_impl(hidden, weight, bias, target, lse, entropy, grad_log_prob, grad_entropy, *,
                            grad_hidden, grad_weight, grad_bias, **option_fields):
    """:func:`log_prob_backward` of one process."""
    with torch.autocast(hidden.device.type, enabled=False), _on_device(hidden):
        return log_prob_backward(hidden, weight, bias, target, lse, entropy, grad_log_prob, grad_entropy,
                                 _options(option_fields), (grad_hidden, grad_weight, grad_bias))


_log_prob_backward_op = torch.library.custom_op(
    "fused_wce::linear_log_prob_backward", _log_prob_backward_impl, mutates_args=(), tags=_TAGS,
    schema=f"({_INPUTS}, Tensor lse, Tensor entropy, Tensor? grad_log_prob, Tensor? grad_entropy, *, "
           f"bool grad_hidden, bool grad_weight, bool grad_bias, {_SCHEMA_OPTIONS}) -> (Tensor, Tensor, Tensor)")


@_log_prob_backward_op.register_fake
def _log_prob_backward_op_fake(hidden, weight, bias, target, lse, entropy, grad_log_prob, grad_entropy, *,
                               grad_hidden, grad_weight, grad_bias, **option_fields):
    return fake_gradients(hidden, weight, bias, target.shape[0], _options(option_fields), grad_hidden, grad_weight,
                          grad_bias)


# ----------------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, keyword_only_inputs, output):
    hidden, weight, bias, target = inputs[:4]
    log_prob, entropy, lse = output
    ctx.set_materialize_grads(False)  # an output nobody differentiates costs nothing in the backward
    ctx.mark_non_differentiable(lse)
    ctx.keywords = keyword_only_inputs
    ctx.dtypes = (hidden.dtype, weight.dtype)
    ctx.save_for_backward(hidden, weight, bias, target, lse, entropy)


def register_log_prob_autograd(forward_op, backward_op) -> None:
    """The autograd of a log-prob forward op (inputs ``hidden, weight, bias, target``, outputs ``(log_prob,
    entropy, lse)``, keyword-only options): its backward calls ``backward_op`` with the same keywords."""
    def backward(ctx, grad_log_prob, grad_entropy, unused_grad_lse):
        if grad_log_prob is None and grad_entropy is None:
            return None, None, None, None
        hidden, weight, bias, target, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        grad_hidden, grad_weight, grad_bias = backward_op(
            hidden, weight, bias, target, lse, entropy, grad_log_prob, grad_entropy, grad_hidden=need_hidden,
            grad_weight=need_weight, grad_bias=need_bias, **ctx.keywords)
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_hidden.to(hidden_dtype) if need_hidden else None,
                grad_weight.to(weight_dtype) if need_weight else None,
                grad_bias.to(weight_dtype) if need_bias else None,
                None)

    forward_op.register_autograd(backward, setup_context=_setup_context)


register_log_prob_autograd(_log_prob_op, _log_prob_backward_op)


def log_prob_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                options: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Call the forward op with ``options`` (tempered and resolved); returns ``(log_prob, entropy, lse)``."""
    return _log_prob_op(hidden, weight, bias, target, **options.op_kwargs(LOG_PROB_FIELDS))
