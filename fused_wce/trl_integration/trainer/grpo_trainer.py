"""``FusedGRPOTrainer``: TRL's ``GRPOTrainer`` whose per-token log-probabilities and entropies come from
:func:`fused_wce.linear_log_prob`, computed inside the LM head's own call.

Every GRPO-family loss (``grpo``, ``dapo``, ``dr_grpo``, ``bnpo``, ``cispo``, ``sapo``, ...; the clipped ratio, the
k3 KL to the reference model, the entropy bonus) depends on the model only through the per-token
log-probabilities of the sampled completions and their entropies. TRL computes both with its chunked head (its
``add_fused_lm_head``); this trainer swaps in :func:`~.log_prob_head.add_log_prob_lm_head` on the policy and the
reference model and keeps everything else of ``GRPOTrainer``: generation, rewards, advantages, the loss
formulas and their normalisation over gradient accumulation and ranks, the logs. So with the same completions
and rewards its losses and gradients are stock TRL's (checked to float32 precision in the tests), while the head
runs inside the head module's call (right under FSDP2 with the head as its own unit, where TRL's gathers a
``full_tensor()`` whose gradient is never reduce-scattered), and the policy's old and reference log-probabilities
are stats-only passes.
"""
from __future__ import annotations

from accelerate.utils import is_peft_model
from trl import GRPOTrainer

from .lm_head import check_model_supported
from .log_prob_head import add_log_prob_lm_head


class FusedGRPOTrainer(GRPOTrainer):
    """:class:`trl.GRPOTrainer` with the fused log-probability head; used exactly as ``GRPOTrainer``.

    Not supported (clear errors at init): context/sequence parallelism (pre-shifted labels), models without an
    output embedding, a LoRA adapter on the LM head itself. ``cast_lm_head_to_fp32`` runs the head's projection in
    float32 from the float32 head TRL installs.
    """

    _tag_names = ["trl", "grpo", "fused-wce"]

    def __init__(self, model, reward_funcs, args=None, *posargs, **kwargs):
        if not isinstance(model, str):
            check_model_supported(model)
        super().__init__(model, reward_funcs, args, *posargs, **kwargs)
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and (getattr(parallelism, "cp_enabled", False)
                                        or getattr(parallelism, "sp_enabled", False)):
            raise NotImplementedError(f"context/sequence parallelism is not supported by {type(self).__name__}")
        fp32 = self.args.cast_lm_head_to_fp32
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_log_prob_lm_head(policy, temperature=self.temperature, entropy=True, cast_lm_head_to_fp32=fp32)
        if self.ref_model is not None:  # may be wrapped already (FSDP, DeepSpeed): patch the model inside
            reference = self.accelerator.unwrap_model(self.ref_model)
            add_log_prob_lm_head(reference, temperature=self.temperature, entropy=False, cast_lm_head_to_fp32=fp32)
