"""TRL integration of ``fused_wce``: per-token weights from chat turns, the shipped dataset and tokenizer.

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
from .weighting import (
    ROLE_CODES,
    TURN_POSITIONS,
    ChatTemplateError,
    TurnWeighting,
    tokenize_with_weights,
)

__all__ = [
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
