"""The vocabulary-parallel log-probs: :func:`fused_wce.linear_log_prob` with the LM head split by vocabulary rows.

The same layouts as the vocabulary-parallel loss (:mod:`fused_wce.vocab_parallel`): a DTensor weight sharded
``Shard(0)`` on a 1-D mesh, or this rank's rows with ``process_group`` and ``vocab_start``; tokens replicated,
or split over the ranks with ``sequence_parallel``. Two custom ops, as in one process
(:mod:`fused_wce.log_prob_ops`):

- ``fused_wce::vocab_parallel_linear_log_prob``: each rank summarises its vocabulary slice, one all-gather of
  the ``[4, M]`` fp32 summaries gives every rank the whole rows' ``lse``, entropy and target logit, hence the
  same ``log_prob`` and ``entropy`` (``2 M H V_r`` FLOPs a rank).
- ``fused_wce::vocab_parallel_linear_log_prob_backward``: each rank's gradient pass over its slice given the
  forward's whole-row ``lse`` and entropy (no summary exchange: ``d log p_t / dz_v`` and ``dH / dz_v`` of a
  column need only those), ``grad_weight`` and ``grad_bias`` of its rows, and its part of ``grad_hidden``,
  all-reduced in fp32 (reduce-scattered with sequence parallelism). ``6 M H V_r`` FLOPs a rank.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .custom_ops import _TAGS, _on_device
from .log_prob_ops import (_INPUTS, _SCHEMA_OPTIONS, _log_prob_backward_op_fake, _log_prob_op_fake, _options,
                           log_prob_backward, log_prob_forward, register_log_prob_autograd)
from .options import LOG_PROB_FIELDS, LossOptions
from .vocab_parallel import _SHARD_SCHEMA, VocabShard, _split_keywords, _TokenShards, shard_options_run


# ----------------------------------------------------------------------------------------------- forward op
def _vp_log_prob_impl(hidden, weight, bias, target, **keywords):
    """``(log_prob, entropy, lse)`` of this rank's tokens over the whole vocabulary, each float32 ``[N]``."""
    shard, options, run = shard_options_run(keywords, _options)
    with torch.autocast(hidden.device.type, enabled=False), _on_device(hidden):
        if not shard.sequence_parallel:
            return log_prob_forward(hidden, weight, bias, target, options, run=run)
        tokens = _TokenShards(shard, target.shape[0], hidden.device)
        all_hidden, all_target, _ = tokens.all_tokens(hidden, target, None, options.ignore_index)
        outputs = log_prob_forward(all_hidden, weight, bias, all_target, options, run=run)
        return tuple(tokens.mine(output) for output in outputs)


_vp_log_prob_op = torch.library.custom_op(
    "fused_wce::vocab_parallel_linear_log_prob", _vp_log_prob_impl, mutates_args=(), tags=_TAGS,
    schema=f"({_INPUTS}, *, {_SHARD_SCHEMA}, {_SCHEMA_OPTIONS}) -> (Tensor, Tensor, Tensor)")


@_vp_log_prob_op.register_fake
def _vp_log_prob_op_fake(hidden, weight, bias, target, **keywords):
    return _log_prob_op_fake(hidden, weight, bias, target, **_split_keywords(keywords)[1])


# ---------------------------------------------------------------------------------------------- backward op
def _vp_log_prob_backward_impl(hidden, weight, bias, target, lse, entropy, grad_log_prob, grad_entropy, *,
                               grad_hidden, grad_weight, grad_bias, **keywords):
    """The gradients of this rank's hidden and of its weight and bias rows (:func:`log_prob_backward`)."""
    shard, options, run = shard_options_run(keywords, _options)
    need_grads = (grad_hidden, grad_weight, grad_bias)
    with torch.autocast(hidden.device.type, enabled=False), _on_device(hidden):
        if not shard.sequence_parallel:
            return log_prob_backward(hidden, weight, bias, target, lse, entropy, grad_log_prob, grad_entropy,
                                     options, need_grads, run=run)
        tokens = _TokenShards(shard, target.shape[0], hidden.device)
        all_hidden, all_target, _ = tokens.all_tokens(hidden, target, None, options.ignore_index)
        per_token = [tokens.gather(t, 0.0) for t in (lse, entropy, grad_log_prob, grad_entropy)]
        outputs = log_prob_backward(all_hidden, weight, bias, all_target, *per_token, options, need_grads, run=run)
        return (tokens.reduce_scatter(outputs[0], hidden.dtype), *outputs[1:])


_vp_log_prob_backward_op = torch.library.custom_op(
    "fused_wce::vocab_parallel_linear_log_prob_backward", _vp_log_prob_backward_impl, mutates_args=(), tags=_TAGS,
    schema=f"({_INPUTS}, Tensor lse, Tensor entropy, Tensor? grad_log_prob, Tensor? grad_entropy, *, "
           f"bool grad_hidden, bool grad_weight, bool grad_bias, {_SHARD_SCHEMA}, {_SCHEMA_OPTIONS}) -> "
           "(Tensor, Tensor, Tensor)")


@_vp_log_prob_backward_op.register_fake
def _vp_log_prob_backward_op_fake(hidden, weight, bias, target, lse, entropy, grad_log_prob, grad_entropy,
                                  **keywords):
    return _log_prob_backward_op_fake(hidden, weight, bias, target, lse, entropy, grad_log_prob, grad_entropy,
                                      **_split_keywords(keywords)[1])


register_log_prob_autograd(_vp_log_prob_op, _vp_log_prob_backward_op)


def vocab_parallel_log_prob_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                               options: LossOptions, shard: VocabShard) -> tuple[Tensor, Tensor, Tensor]:
    """Call the vocabulary-parallel forward op (on every rank of ``shard.group``); returns ``(log_prob,
    entropy, lse)`` of this rank's tokens."""
    return _vp_log_prob_op(hidden, weight, bias, target, **shard.op_kwargs(), **options.op_kwargs(LOG_PROB_FIELDS))
