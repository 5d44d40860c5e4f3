"""The ``fused-wce`` commands: ``sft`` (:mod:`.sft`) and ``compare`` (:mod:`.compare`), and what they share:
flags and defaults (:mod:`.options`), data (:mod:`.data`), model and tokenizer (:mod:`.model`), the trainer with
its printed logs (:mod:`.training`). The entry point is :func:`fused_wce.trl_integration.cli.main`.
"""
