"""The per-token codes and column names shared by the chat weights, the trainer and its logs.

Every token of a tokenized conversation carries, next to its weight, the role of its message
(:data:`ROLE_CODES`), the message's position among the messages of its role (:data:`TURN_POSITIONS`) and its turn
index (the 0-based index of the message among the messages of its role). :data:`SCAFFOLDING` (-1) marks a token of
no message (role headers, separators, padding).
"""
from __future__ import annotations

ROLE_CODES: dict[str, int] = {"system": 0, "user": 1, "assistant": 2, "tool": 3}  # -1 = scaffolding / no message
TURN_POSITIONS: tuple[str, ...] = ("first", "middle", "last", "only")  # among messages of the same role
SCAFFOLDING = -1
DEFAULT_MAX_TURN_INDEX = 5  # turn_1 .. turn_4, turn_5+

# Per-token columns of a tokenized conversation (and of a batch): weight, role, turn position and turn index codes.
TOKEN_WEIGHTS = "token_weights"
TOKEN_ROLES = "token_roles"
TOKEN_TURN_POSITIONS = "token_turn_positions"
TOKEN_TURN_INDEX = "token_turn_index"


def role_names() -> tuple[str, ...]:
    """The roles in code order (``system``, ``user``, ``assistant``, ``tool``)."""
    return tuple(sorted(ROLE_CODES, key=ROLE_CODES.get))


def turn_position_code(index: int, count: int) -> int:
    """Code in :data:`TURN_POSITIONS` of the ``index``-th (0-based) of ``count`` messages of one role."""
    if count == 1:
        return TURN_POSITIONS.index("only")
    if index == 0:
        return TURN_POSITIONS.index("first")
    return TURN_POSITIONS.index("last" if index == count - 1 else "middle")


def turn_index_names(max_turn_index: int = DEFAULT_MAX_TURN_INDEX) -> tuple[str, ...]:
    """``("turn_1", ..., "turn_{k-1}", "turn_{k}+")`` for ``k = max_turn_index`` (``("turn_1+",)`` for k = 1)."""
    return tuple(f"turn_{i}" for i in range(1, max_turn_index)) + (f"turn_{max_turn_index}+",)
