"""``WeightedSFTTrainer`` (:mod:`.sft_trainer`) and what it is made of: the LM-head patch that computes the fused
loss (:mod:`.lm_head`), dataset preparation (:mod:`.dataset`), the collator (:mod:`.collator`), the per-group
metrics it logs (:mod:`.metrics`) and the loss-curves callback (:mod:`.curves`). Imports trl.
"""
