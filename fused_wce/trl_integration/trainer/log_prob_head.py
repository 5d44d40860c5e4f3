"""Per-token log-probabilities and entropies from the LM head's own call: the fused head of policy-gradient losses.

:func:`add_log_prob_lm_head` patches ``model.forward`` so that ``model(..., labels=labels, fused_lm_head=True)``,
the call TRL's trainers make on a model given TRL's ``add_fused_lm_head`` (GRPO, RLOO, DPO, KTO), returns
TRL's :class:`~trl.trainer.utils.FusedCausalLMOutput` with ``log_probs`` (and ``entropy``) computed by
:func:`fused_wce.linear_log_prob` from the final hidden states and ``lm_head.weight``, inside a call of the head
module (:func:`~.lm_head.call_head`): FSDP1, FSDP2 (also with the head as its own unit) and ZeRO-3 unshard the
head and reduce its gradient as for any forward of the head. The logits are never built; under ``torch.no_grad``
(old-policy and reference log-probabilities) the call is a single stats-only pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.utils import FusedCausalLMOutput

import fused_wce

from .lm_head import (HeadCall, PatchedForward, backbone_hidden_states, call_head, check_model_supported,
                      compute_dtype_of, logit_scale_of, restore_float32)


class _Float32LogProbs:
    """The log-probabilities and entropies as the fused call computed them, float32, detached: out of reach of a
    mixed-precision output cast (a plain ``__slots__`` class, see :class:`~.lm_head.Float32Values`)."""

    __slots__ = ("log_probs", "entropy")

    def __init__(self, log_probs: torch.Tensor, entropy: torch.Tensor | None):
        self.log_probs, self.entropy = log_probs, entropy


class _HeadLogProbCall(HeadCall):
    """Log-probabilities of ``target`` (``[B, T-1]``, -100 where not scored) and, with ``entropy``, the entropy of
    each scored position, under ``softcap(logit_scale * logits) / temperature``. ``fp32``: the projection in
    float32 (TRL's ``cast_lm_head_to_fp32``). ``run`` returns ``(log_probs, entropy or None, _Float32LogProbs)``,
    float32."""

    __slots__ = ("target", "options")
    DESCRIPTION = "the fused log-probability head"
    VOCAB_PARALLEL = True  # linear_log_prob takes a vocabulary-sharded DTensor weight

    def __init__(self, target: torch.Tensor, options: _LogProbOptions):
        self.target, self.options = target, options

    def run(self, hidden_states, weight, bias):
        options = self.options
        compute_dtype = torch.float32 if options.fp32 else compute_dtype_of(weight)
        if options.fp32:
            hidden_states = hidden_states.float()
        out = fused_wce.linear_log_prob(
            hidden_states, weight, self.target.to(weight.device), bias=bias, temperature=options.temperature,
            softcap=options.softcap, logit_scale=options.logit_scale, return_entropy=options.entropy,
            compute_dtype=compute_dtype)
        log_probs, entropy = out if options.entropy else (out, None)
        exact = _Float32LogProbs(log_probs.detach(), None if entropy is None else entropy.detach())
        return log_probs, entropy, exact


@dataclass(frozen=True)
class _LogProbOptions:
    """The logit transforms of the patched model and what the patch computes, fixed when it is patched."""

    temperature: float
    logit_scale: float
    softcap: float | None
    entropy: bool
    fp32: bool
    router_coef: float


class _LogProbForward(PatchedForward):
    """``model.forward`` once :func:`add_log_prob_lm_head` ran: answers ``fused_lm_head=True`` calls."""

    __slots__ = ()
    KEYWORDS = ("fused_lm_head", "labels", "shift_labels", "num_items_in_batch")

    def __call__(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                 **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return self.plain(*args, **kwargs)
        if shift_labels is not None:
            raise NotImplementedError("pre-shifted labels (context/sequence parallelism) are not supported by the "
                                      "fused log-probability head")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise ValueError(f"fused_lm_head=True needs labels [B, T] (-100 where not scored), got "
                             f"{type(labels).__name__ if not isinstance(labels, torch.Tensor) else labels.shape}")
        model, options = self.model, self.options
        hidden_states, aux_loss = backbone_hidden_states(model, model.config.get_text_config(), args, kwargs)
        target = labels[:, 1:]
        log_probs, entropy, exact = call_head(model, hidden_states, _HeadLogProbCall(target, options))
        log_probs, entropy = restore_float32(log_probs, exact.log_probs), restore_float32(entropy, exact.entropy)
        mask = target.to(log_probs.device) != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        if aux_loss is not None:
            loss = loss + options.router_coef * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask,
                                   aux_loss=aux_loss)


def add_log_prob_lm_head(model, *, temperature: float = 1.0, entropy: bool = True,
                         cast_lm_head_to_fp32: bool = False) -> None:
    """Patch ``model.forward``: ``model(..., labels=labels, fused_lm_head=True)`` returns fused log-probabilities.

    The call convention and output are those of TRL's ``add_fused_lm_head`` (which this replaces wherever both
    are applied: the later patch answers): ``labels`` ``[B, T]`` (-100 where not scored), shifted inside;
    returns a ``FusedCausalLMOutput`` with ``log_probs`` and ``entropy`` ``[B, T-1]`` float32 (0 where the label
    is -100; ``entropy`` None unless ``entropy``), ``label_mask``, ``loss`` (``-sum(log_probs)`` over
    ``num_items_in_batch``, or over the scored tokens, plus the MoE router loss times the config's
    ``router_aux_loss_coef`` when router logits are requested) and ``aux_loss``. Both per-token outputs carry
    gradients to the backbone and the head. The logits are ``softcap(logit_scale * (h W^T + b)) / temperature``
    with the model's own logit scale and ``final_logit_softcapping``, as TRL computes them. Without
    ``fused_lm_head`` the previous forward runs unchanged (generation, the weighted loss). Apply to the unwrapped
    ``PreTrainedModel`` (the base model under PEFT), before or after FSDP wraps it; patching again replaces the
    options; the patched model deep-copies and pickles as a patched model of itself (see
    :class:`~.lm_head.PatchedForward`). Pre-shifted ``shift_labels`` (context/sequence parallelism) are not
    supported (``NotImplementedError``).
    """
    check_model_supported(model)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    text_config = model.config.get_text_config()
    options = _LogProbOptions(float(temperature), logit_scale_of(text_config),
                              getattr(text_config, "final_logit_softcapping", None), bool(entropy),
                              bool(cast_lm_head_to_fp32), float(getattr(text_config, "router_aux_loss_coef", 0.0)))
    _LogProbForward.install(model, options)
