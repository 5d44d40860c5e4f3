"""Validation of chat messages and per-message weights, and each message's index among the messages of its role."""
from __future__ import annotations

import math
import numbers
from typing import Any

from ..token_codes import ROLE_CODES


def check_weight(value: Any, what: str) -> float:
    """``value`` as a finite float >= 0, else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number >= 0, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return value


def validate_messages(messages: Any) -> None:
    """Raise ValueError (naming the message index and key) unless ``messages`` is a list of chat messages."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"message {index} has no 'role' key (keys: {sorted(message)})")
        if message["role"] not in ROLE_CODES:
            raise ValueError(f"message {index}: unknown 'role' {message['role']!r}; expected one of {list(ROLE_CODES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"message {index}: 'content' must be a string (or None), got {type(content).__name__}")


def role_indices(messages: list[dict]) -> list[tuple[int, int]]:
    """For each message: (its 0-based index among messages of its role, the number of messages of that role)."""
    counts: dict[str, int] = {}
    indices = []
    for message in messages:
        role = message["role"]
        indices.append(counts.get(role, 0))
        counts[role] = counts.get(role, 0) + 1
    return [(index, counts[message["role"]]) for index, message in zip(indices, messages)]
