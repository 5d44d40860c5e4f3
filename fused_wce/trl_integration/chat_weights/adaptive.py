"""Adaptive turn weighting: per-turn (or per-role) loss multipliers that follow the running per-group loss.

:class:`AdaptiveTurnWeights` is the configuration (``TurnWeighting(adaptive=AdaptiveTurnWeights(...))``,
``fused-wce sft --adaptive turn``); :class:`AdaptiveWeightState` is the running state a
:class:`~fused_wce.trl_integration.trainer.sft_trainer.WeightedSFTTrainer` keeps while it trains.

Groups. ``groups="turn"``: a token's group is the index of its message among the messages of its role (turn 1,
2, ..., ``max_turn_index`` and later ones together, ``turn_{k}+``); ``groups="role"``: the message's role.
Tokens outside any message (template scaffolding, trained with ``full_sequence``) keep multiplier 1.

Update rule, once per optimizer step, from the per-group losses of the step before (unweighted cross-entropy of
the counted tokens, summed over all micro-batches and data-parallel ranks, so every rank computes the same
multipliers)::

    ema_loss[g]  = ema_decay * ema_loss[g]  + (1 - ema_decay) * mean_loss[g]     (the first value as is)
    ema_count[g] = ema_decay * ema_count[g] + (1 - ema_decay) * tokens[g]        (likewise)
    m[g]         = clip(c * ema_loss[g] ** power, min_weight, max_weight)
    c            such that  sum_g ema_count[g] * m[g] / sum_g ema_count[g] = 1

So the multipliers are proportional to ``ema_loss ** power`` (until a bound is hit), each lies in
``[min_weight, max_weight]``, and their token-weighted mean is exactly 1: the loss keeps its scale, harder turns
get more of it. Groups not seen yet get 1. During the first ``warmup_steps`` updates the multipliers stay 1 (the
averages still run). The trainer multiplies each counted token's weight by its group's multiplier, in the loss
and in its normaliser alike, so the training loss stays a weighted mean ``sum(w m l) / sum(w m)``. Evaluation
uses the plain weights, so eval losses stay comparable from step to step. Everything is plain float64 Python
arithmetic on gathered values: the same inputs give the same multipliers, bit for bit.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..token_codes import DEFAULT_MAX_TURN_INDEX, role_names, turn_index_names

GROUPINGS = ("turn", "role")


def _number(value, name: str, low: float, high: float, *, low_open=False, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


@dataclass(frozen=True)
class AdaptiveTurnWeights:
    """Configuration of the adaptive multipliers (see the module docstring for the exact rule).

    Args:
        groups: ``"turn"`` (turn index within the role, 1..``max_turn_index``+) or ``"role"``.
        ema_decay: in [0, 1); weight of the old average (0: the last step's losses alone).
        power: >= 0; multipliers are proportional to ``ema_loss ** power`` (0: all 1, the adaptive step is inert).
        min_weight: in (0, 1]; no multiplier goes below it.
        max_weight: >= 1; no multiplier goes above it.
        warmup_steps: int >= 0; optimizer steps with all multipliers 1 before the first adaptation.
        max_turn_index: int >= 1; turns from this one on share one group (``groups="turn"``).
    """

    groups: str = "turn"
    ema_decay: float = 0.9
    power: float = 1.0
    min_weight: float = 0.25
    max_weight: float = 4.0
    warmup_steps: int = 0
    max_turn_index: int = DEFAULT_MAX_TURN_INDEX

    def __post_init__(self):
        if self.groups not in GROUPINGS:
            raise ValueError(f"adaptive groups must be one of {list(GROUPINGS)}, got {self.groups!r}")
        set_ = object.__setattr__  # frozen dataclass: store the validated floats
        set_(self, "ema_decay", _number(self.ema_decay, "adaptive ema_decay", 0.0, 1.0, high_open=True))
        set_(self, "power", _number(self.power, "adaptive power", 0.0, math.inf))
        set_(self, "min_weight", _number(self.min_weight, "adaptive min_weight", 0.0, 1.0, low_open=True))
        set_(self, "max_weight", _number(self.max_weight, "adaptive max_weight", 1.0, math.inf, high_open=True))
        for name in ("warmup_steps", "max_turn_index"):
            value = getattr(self, name)
            low = 0 if name == "warmup_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"adaptive {name} must be an int >= {low}, got {value!r}")

    @property
    def group_names(self) -> tuple[str, ...]:
        """The names of the groups, in code order (multiplier ``i`` belongs to ``group_names[i]``)."""
        return turn_index_names(self.max_turn_index) if self.groups == "turn" else role_names()

    def new_state(self) -> "AdaptiveWeightState":
        return AdaptiveWeightState(self)

    @classmethod
    def from_cli(cls, groups: str | None, ema_decay: float = 0.9, power: float = 1.0, min_weight: float = 0.25,
                 max_weight: float = 4.0, warmup_steps: int = 0) -> "AdaptiveTurnWeights | None":
        """``--adaptive turn|role|none`` and its flags; ``None``/``"none"``/``""`` gives ``None`` (off)."""
        if groups is None or groups.strip().lower() in ("", "none", "off"):
            return None
        try:
            return cls(groups=groups.strip().lower(), ema_decay=ema_decay, power=power, min_weight=min_weight,
                       max_weight=max_weight, warmup_steps=warmup_steps)
        except ValueError as error:  # name the flag, e.g. "--adaptive_power must be ..."
            raise ValueError(f"--{str(error).replace('adaptive ', 'adaptive_', 1)}"
                             .replace("--adaptive_groups", "--adaptive")) from None

    def describe(self) -> str:
        return (f"adaptive {self.groups} (ema {self.ema_decay:g}, power {self.power:g}, "
                f"in [{self.min_weight:g}, {self.max_weight:g}]"
                + (f", warmup {self.warmup_steps}" if self.warmup_steps else "") + ")")


class AdaptiveWeightState:
    """The running averages and current multipliers of one training run.

    ``multipliers`` (tuple of float, one per ``config.group_names``) are what the next optimizer step uses;
    :meth:`update` moves them with one step's per-group loss sums and token counts.
    """

    def __init__(self, config: AdaptiveTurnWeights):
        if not isinstance(config, AdaptiveTurnWeights):
            raise TypeError(f"config must be an AdaptiveTurnWeights, got {type(config).__name__}")
        self.config = config
        self.names = config.group_names
        self.ema_loss: list[float | None] = [None] * len(self.names)
        self.ema_count: list[float] = [0.0] * len(self.names)
        self.updates = 0
        self.multipliers: tuple[float, ...] = (1.0,) * len(self.names)
        self._factor_table = None  # ((multipliers, device), float32 tensor) of the last factor_table()

    def update(self, loss_sums, token_counts) -> bool:
        """One optimizer step's per-group ``sum of token CE`` and ``number of counted tokens`` (sequences of
        ``len(names)`` floats, summed over micro-batches and ranks). Returns False (and changes nothing) when no
        group has a token."""
        if len(loss_sums) != len(self.names) or len(token_counts) != len(self.names):
            raise ValueError(f"expected {len(self.names)} group sums and counts, got {len(loss_sums)} and "
                             f"{len(token_counts)}")
        if not any(count > 0 for count in token_counts):
            return False
        decay = self.config.ema_decay
        for g, (total, count) in enumerate(zip(loss_sums, token_counts)):
            count = float(count)
            mean = float(total) / count if count > 0 else math.nan
            if count > 0 and not math.isfinite(mean):  # a diverged step must not poison the weights for good
                continue
            if self.ema_loss[g] is None:  # first sighting: the values as they are
                if count > 0:
                    self.ema_loss[g], self.ema_count[g] = mean, count
                continue
            self.ema_count[g] = decay * self.ema_count[g] + (1 - decay) * count
            if count > 0:
                self.ema_loss[g] = decay * self.ema_loss[g] + (1 - decay) * mean
        self.updates += 1
        self.multipliers = self._solve() if self.updates > self.config.warmup_steps else self.multipliers
        return True

    def _solve(self) -> tuple[float, ...]:
        """Multipliers ``clip(c * ema_loss ** power, lo, hi)`` with token-weighted mean 1 (``c`` by bisection;
        the mean is increasing in ``c``, from ``lo`` <= 1 at ``c = 0`` to ``hi`` >= 1 for large ``c``)."""
        lo, hi, power = self.config.min_weight, self.config.max_weight, self.config.power
        seen = [g for g, value in enumerate(self.ema_loss) if value is not None and self.ema_count[g] > 0]
        raw = {g: max(self.ema_loss[g], 0.0) ** power for g in seen}
        total = sum(self.ema_count[g] for g in seen)
        if not seen or total <= 0 or all(value == 0 for value in raw.values()):
            return (1.0,) * len(self.names)
        share = {g: self.ema_count[g] / total for g in seen}

        def mean_at(c):
            return sum(share[g] * min(max(c * raw[g], lo), hi) for g in seen)

        reference = sum(share[g] * raw[g] for g in seen)  # > 0: at c = 1/reference the unclipped mean is 1
        low, high = 0.0, 1.0 / reference
        while mean_at(high) < 1.0:
            high *= 2.0
        for _ in range(200):
            middle = 0.5 * (low + high)
            if mean_at(middle) < 1.0:
                low = middle
            else:
                high = middle
            if high - low <= 1e-15 * high:
                break
        c = high
        multipliers = [1.0] * len(self.names)
        for g in seen:
            multipliers[g] = min(max(c * raw[g], lo), hi)
        return tuple(multipliers)

    def state_dict(self) -> dict:
        """The running state as plain Python values (JSON-safe floats, exact), for a training checkpoint."""
        return {"groups": self.config.groups, "names": list(self.names), "ema_loss": list(self.ema_loss),
                "ema_count": list(self.ema_count), "updates": self.updates, "multipliers": list(self.multipliers)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s values; ValueError when they belong to other groups."""
        names = tuple(state.get("names", ()))
        if state.get("groups") != self.config.groups or names != self.names:
            raise ValueError(f"the saved adaptive weights have groups {state.get('groups')!r} {list(names)}, this run "
                             f"has {self.config.groups!r} {list(self.names)}")
        self.ema_loss = [None if value is None else float(value) for value in state["ema_loss"]]
        self.ema_count = [float(value) for value in state["ema_count"]]
        self.updates = int(state["updates"])
        self.multipliers = tuple(float(value) for value in state["multipliers"])

    def factor_table(self, device=None):
        """Float32 ``[1 + groups]``: index 0 (no group) is 1, index ``g + 1`` the multiplier of group ``g``.

        Built (a host-to-device copy) once per multipliers and device, so the micro-batches of a step reuse it.
        """
        import torch

        key = (tuple(self.multipliers), str(torch.device(device) if device is not None else "cpu"))
        if self._factor_table is None or self._factor_table[0] != key:
            table = torch.tensor((1.0,) + key[0], dtype=torch.float32, device=device)
            self._factor_table = (key, table)
        return self._factor_table[1]

    def group_codes(self, roles, turn_index):
        """Int64 tensor like ``roles``: ``g + 1`` for a token of group ``g``, 0 for none (scaffolding, padding).

        ``roles`` and ``turn_index`` are the per-token ``token_roles`` / ``token_turn_index`` codes (-1 = none).
        """
        import torch

        if self.config.groups == "role":
            codes = roles.to(torch.int64) + 1
            return codes.masked_fill((codes < 0) | (codes > len(self.names)), 0)
        index = turn_index.to(torch.int64)
        return torch.where(index >= 0, index.clamp_max(len(self.names) - 1) + 1, torch.zeros_like(index))
