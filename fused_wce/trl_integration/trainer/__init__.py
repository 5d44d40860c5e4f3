"""The trainers and what they are made of. ``WeightedSFTTrainer`` (:mod:`.sft_trainer`): the LM-head patch that
computes the fused loss (:mod:`.lm_head`), dataset preparation (:mod:`.dataset`), the collator (:mod:`.collator`),
the per-group metrics it logs (:mod:`.metrics`) and the loss-curves callback (:mod:`.curves`). ``FusedGRPOTrainer``
(:mod:`.grpo_trainer`): TRL's GRPO with per-token log-probabilities and entropies from the fused head
(:mod:`.log_prob_head`). ``HybridTrainer`` (:mod:`.hybrid_trainer`, its config and mu schedule in
:mod:`.hybrid_config`): GRPO and weighted SFT in one step. Imports trl.
"""
