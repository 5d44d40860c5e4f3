"""TRL integration of ``fused_wce``: per-token weights from chat turns, the trainer, the shipped dataset and tokenizer.

Layout: :mod:`.chat_weights` (weights from chats), :mod:`.trainer` (``WeightedSFTTrainer``, its LM-head patch,
collator, metrics and loss curves), :mod:`.evaluation` (held-out measurements with bootstrap intervals),
:mod:`.commands` (``fused-wce sft|compare|evaluate|fetch-model``, entry point :mod:`.cli`), :mod:`.chat_data` (the
shipped conversations and tokenizer), :mod:`.history_data` (the experiment's conversations), :mod:`.gguf_models`
(``.gguf`` checkpoints), :mod:`.token_codes` (the per-token codes they share).
Never imports triton (the loss backend is chosen inside :mod:`fused_wce`).
"""
from .chat_data import (
    CHATML_TEMPLATE,
    CHATML_TEMPLATE_NO_GENERATION,
    build_tokenizer,
    generate_conversations,
    load_default_dataset,
    load_jsonl_dataset,
)
from .chat_weights.adaptive import AdaptiveTurnWeights
from .chat_weights.template_spans import ChatTemplateError
from .chat_weights.tokenize import tokenize_with_weights
from .chat_weights.turn_weighting import TurnWeighting
from .token_codes import ROLE_CODES, TURN_POSITIONS

__all__ = [
    "AdaptiveTurnWeights",
    "CHATML_TEMPLATE",
    "CHATML_TEMPLATE_NO_GENERATION",
    "ROLE_CODES",
    "TURN_POSITIONS",
    "ChatTemplateError",
    "TurnWeighting",
    "build_tokenizer",
    "generate_conversations",
    "load_default_dataset",
    "load_jsonl_dataset",
    "tokenize_with_weights",
]

# Trainer and collator: imported on first use, so the weighting helpers load without importing trl.
_LAZY = {"WeightedDataCollator": "trainer.collator", "WeightedSFTTrainer": "trainer.sft_trainer",
         "add_weighted_lm_head": "trainer.lm_head", "LossCurvesCallback": "trainer.curves"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
