"""TRL integration of ``fused_wce``: per-token weights from chat turns, the shipped dataset and tokenizer.

Never imports triton (the loss backend is chosen inside :mod:`fused_wce`).
"""
from .adaptive import AdaptiveTurnWeights
from .chat_data import (
    CHATML_TEMPLATE,
    CHATML_TEMPLATE_NO_GENERATION,
    build_tokenizer,
    generate_conversations,
    load_default_dataset,
    load_jsonl_dataset,
)
from .weighting import (
    ROLE_CODES,
    TURN_POSITIONS,
    ChatTemplateError,
    TurnWeighting,
    tokenize_with_weights,
)

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
_LAZY = {"WeightedDataCollator": "collator", "WeightedSFTTrainer": "trainer", "add_weighted_lm_head": "trainer",
         "LossCurvesCallback": "curves"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
