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

import functools
import types

import torch
from trl.trainer.utils import FusedCausalLMOutput

import fused_wce

from .lm_head import (HeadCall, backbone_hidden_states, call_head, check_model_supported, compute_dtype_of,
                      logit_scale_of)


class _HeadLogProbCall(HeadCall):
    """Log-probabilities of ``target`` (``[B, T-1]``, -100 where not scored) and, with ``entropy``, the entropy of
    each scored position, under ``softcap(logit_scale * logits) / temperature``. ``fp32``: the projection in
    float32 (TRL's ``cast_lm_head_to_fp32``). ``run`` returns ``(log_probs, entropy or None)``, float32."""

    __slots__ = ("target", "temperature", "logit_scale", "softcap", "entropy", "fp32")

    def __init__(self, target: torch.Tensor, temperature: float, logit_scale: float, softcap: float | None,
                 entropy: bool, fp32: bool):
        self.target, self.temperature, self.logit_scale = target, temperature, logit_scale
        self.softcap, self.entropy, self.fp32 = softcap, entropy, fp32

    def run(self, hidden_states, weight, bias):
        compute_dtype = torch.float32 if self.fp32 else compute_dtype_of(weight)
        if self.fp32:
            hidden_states = hidden_states.float()
        out = fused_wce.linear_log_prob(
            hidden_states, weight, self.target.to(weight.device), bias=bias, temperature=self.temperature,
            softcap=self.softcap, logit_scale=self.logit_scale, return_entropy=self.entropy,
            compute_dtype=compute_dtype)
        return out if self.entropy else (out, None)


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
    ``PreTrainedModel`` (the base model under PEFT), before or after FSDP wraps it. Pre-shifted ``shift_labels``
    (context/sequence parallelism) are not supported (``NotImplementedError``).
    """
    check_model_supported(model)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    logit_scale = logit_scale_of(text_config)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    router_coef = getattr(text_config, "router_aux_loss_coef", 0.0)

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return previous_forward(*args, **kwargs)
        if shift_labels is not None:
            raise NotImplementedError("pre-shifted labels (context/sequence parallelism) are not supported by the "
                                      "fused log-probability head")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise ValueError(f"fused_lm_head=True needs labels [B, T] (-100 where not scored), got "
                             f"{type(labels).__name__ if not isinstance(labels, torch.Tensor) else labels.shape}")
        hidden_states, aux_loss = backbone_hidden_states(self, text_config, args, kwargs)
        target = labels[:, 1:]
        call = _HeadLogProbCall(target, float(temperature), logit_scale, softcap, entropy, cast_lm_head_to_fp32)
        log_probs, token_entropy = call_head(self, hidden_states, call)
        mask = target.to(log_probs.device) != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        if aux_loss is not None:
            loss = loss + router_coef * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=token_entropy, label_mask=mask,
                                   aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)
