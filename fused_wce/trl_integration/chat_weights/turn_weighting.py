"""How much each message of a conversation teaches: :class:`TurnWeighting`.

Weight of message ``i`` (role ``r``, the ``j``-th of the ``n_r`` messages of role ``r``, ``k = n_r - 1 - j`` of
them after it)::

    role_weights.get(r, 1.0 if full_sequence else 0.0)
    * (0 if last_n is not None and k >= last_n else 1)
    * (decay ** k if decay is not None else 1)
    * message[message_weight_key]          # 1 when the key is absent or None; any finite float >= 0
    * weight_fn(j, n_r, r, message)        # when given; must return a finite float >= 0

``last_n`` and ``decay`` count turns *within each role*: with ``role_weights={"assistant": 1, "user": 0.3}`` and
``decay=0.5`` the last assistant and the last user message get factor 1, the ones before them 0.5, and so on. For
the default (assistant only) this is exactly "the assistant turn k positions from the end gets decay**k".
``weight_fn`` receives the same role-relative index and count as ``last_n``/``decay``. How these weights reach the
tokens: :func:`~fused_wce.trl_integration.chat_weights.tokenize.tokenize_with_weights`.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable

from ..token_codes import ROLE_CODES
from .adaptive import AdaptiveTurnWeights
from .messages import check_weight, role_indices, validate_messages


@dataclass
class TurnWeighting:
    """How much each message of a conversation teaches; see the module docstring for the exact formula.

    Args:
        role_weights: weight per role (keys among :data:`ROLE_CODES`, values finite >= 0). Roles not listed get 0,
            or 1 with ``full_sequence``. Default ``{"assistant": 1.0}``: TRL's ``assistant_only_loss``.
        full_sequence: scaffolding tokens (headers, separators) get weight 1 and unlisted roles get 1: TRL's
            default full-sequence loss.
        last_n: only the last ``last_n`` (>= 1) messages of each role count; earlier ones get 0.
        decay: in (0, 1]; the message ``k`` messages before the last one of its role gets ``decay**k``.
        weight_fn: ``(index_in_role, count_in_role, role, message) -> float >= 0``, multiplied in.
        message_weight_key: the per-message weight key (OpenAI format: ``"weight"``, 0 or 1; any finite float
            >= 0 here), multiplied in; absent or ``None`` values mean 1. ``None`` ignores per-message weights
            (as stock TRL does).
        adaptive: an :class:`~.adaptive.AdaptiveTurnWeights`: per-turn (or per-role) loss multipliers that follow
            the running per-group loss during training (applied by the trainer at loss time; tokenization ignores
            it). ``None``: fixed weights.
    """

    role_weights: dict[str, float] = field(default_factory=lambda: {"assistant": 1.0})
    full_sequence: bool = False
    last_n: int | None = None
    decay: float | None = None
    weight_fn: Callable[[int, int, str, dict], float] | None = None
    message_weight_key: str | None = "weight"
    adaptive: AdaptiveTurnWeights | None = None

    def __post_init__(self):
        if self.adaptive is not None and not isinstance(self.adaptive, AdaptiveTurnWeights):
            raise TypeError(f"adaptive must be an AdaptiveTurnWeights or None, got {type(self.adaptive).__name__}")
        if not isinstance(self.role_weights, dict):
            raise TypeError(f"role_weights must be a dict {{role: weight}}, got {type(self.role_weights).__name__}")
        checked = {}
        for role, value in self.role_weights.items():
            if role not in ROLE_CODES:
                raise ValueError(f"role_weights: unknown role {role!r}; expected one of {list(ROLE_CODES)}")
            checked[role] = check_weight(value, f"role_weights[{role!r}]")
        self.role_weights = checked
        if not isinstance(self.full_sequence, bool):
            raise TypeError(f"full_sequence must be a bool, got {self.full_sequence!r}")
        if self.last_n is not None and (isinstance(self.last_n, bool) or not isinstance(self.last_n, int)
                                        or self.last_n < 1):
            raise ValueError(f"last_n must be None or an int >= 1, got {self.last_n!r}")
        if self.decay is not None:
            if isinstance(self.decay, bool) or not isinstance(self.decay, numbers.Real) or not 0 < self.decay <= 1:
                raise ValueError(f"decay must be None or a number in (0, 1], got {self.decay!r}")
            self.decay = float(self.decay)
        if self.weight_fn is not None and not callable(self.weight_fn):
            raise TypeError(f"weight_fn must be callable or None, got {type(self.weight_fn).__name__}")
        if self.message_weight_key is not None and not isinstance(self.message_weight_key, str):
            raise TypeError(f"message_weight_key must be a str or None, got {self.message_weight_key!r}")

    @classmethod
    def stock_trl(cls, assistant_only_loss: bool) -> "TurnWeighting":
        """Weight 1 on the tokens stock TRL trains: the assistant turns (``assistant_only_loss``) or the full
        sequence; per-message ``weight`` keys ignored, as TRL ignores them."""
        if assistant_only_loss:
            return cls(role_weights={"assistant": 1.0}, message_weight_key=None)
        return cls(full_sequence=True, message_weight_key=None)

    @classmethod
    def from_cli(cls, role_weights: str | None, full_sequence: bool = False, last_n: int | None = None,
                 decay: float | None = None, **kwargs) -> "TurnWeighting":
        """From ``--role_weights "assistant=1,user=0.1,tool=0"`` (``None`` or empty: assistant only) and the
        other flags; ``kwargs`` go to the constructor (e.g. ``message_weight_key``)."""
        weights = {"assistant": 1.0}
        if role_weights is not None and role_weights.strip():
            weights = {}
            for item in role_weights.split(","):
                role, sep, value = item.partition("=")
                role = role.strip()
                if not sep or not role:
                    raise ValueError(f"--role_weights: expected 'role=weight' items separated by commas, got {item!r} "
                                     f"in {role_weights!r}")
                if role in weights:
                    raise ValueError(f"--role_weights: role {role!r} given twice in {role_weights!r}")
                try:
                    weights[role] = float(value)
                except ValueError:
                    raise ValueError(f"--role_weights: weight of {role!r} is not a number: {value.strip()!r}") from None
                check_weight(weights[role], f"--role_weights: the weight of {role!r}")
        try:
            return cls(role_weights=weights, full_sequence=bool(full_sequence), last_n=last_n, decay=decay, **kwargs)
        except ValueError as error:  # in the words of the flags: "--decay must be a number in (0, 1], got -0.5"
            message = str(error).replace(" must be None or ", " must be ")
            raise ValueError(f"--{message}" if message.startswith(("role_weights", "last_n", "decay"))
                             else message) from None

    def message_weights(self, messages: list[dict]) -> list[float]:
        """One validated weight (finite float >= 0) per message; raises ValueError naming the message and key."""
        validate_messages(messages)
        default = 1.0 if self.full_sequence else 0.0
        weights = []
        for index, (message, (in_role, count)) in enumerate(zip(messages, role_indices(messages))):
            role = message["role"]
            from_end = count - 1 - in_role
            weight = self.role_weights.get(role, default)
            if self.last_n is not None and from_end >= self.last_n:
                weight = 0.0
            if self.decay is not None:
                weight *= self.decay ** from_end
            if self.message_weight_key is not None and message.get(self.message_weight_key) is not None:
                weight *= check_weight(message[self.message_weight_key],
                                        f"message {index} key {self.message_weight_key!r}")
            if self.weight_fn is not None:
                weight *= check_weight(self.weight_fn(in_role, count, role, message),
                                        f"weight_fn(...) for message {index}")
            weights.append(weight)
        return weights

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``assistant=1,user=0.5; last 2; x message 'weight'``."""
        if self.full_sequence:
            return "full sequence"
        parts = [",".join(f"{role}={value:g}" for role, value in self.role_weights.items())]
        if self.last_n is not None:
            parts.append(f"last {self.last_n}")
        if self.decay is not None:
            parts.append(f"decay {self.decay:g}")
        if self.weight_fn is not None:
            parts.append("weight_fn")
        if self.message_weight_key is not None:
            parts.append(f"x message {self.message_weight_key!r}")
        if self.adaptive is not None:
            parts.append(self.adaptive.describe())
        return "; ".join(parts)
