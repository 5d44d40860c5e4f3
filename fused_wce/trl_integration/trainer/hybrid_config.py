"""``HybridConfig``: ``GRPOConfig`` plus the SFT term of :class:`~.hybrid_trainer.HybridTrainer`, and its mixing
weight schedule ``mu(step)``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig

MU_SCHEDULES = ("constant", "linear", "cosine")
SFT_TOKEN_REWEIGHTINGS = ("none", "p", "p(1-p)")


@dataclass
class HybridConfig(GRPOConfig):
    """:class:`trl.GRPOConfig` plus the SFT term: ``loss = (1 - mu) * GRPO + mu * SFT`` each optimizer step.

    ``mu`` is :func:`mu_at` of the optimizer step: 0 -> ``sft_mu`` linearly over ``sft_mu_warmup_steps``, then
    ``sft_mu`` -> ``sft_mu_end`` over ``sft_mu_decay_steps`` (``linear`` or ``cosine``; default: the rest of
    ``max_steps``), then ``sft_mu_end``; ``constant`` (the default) keeps ``sft_mu`` after the warm-up.
    """

    sft_mu: float = field(default=0.5, metadata={
        "help": "Weight mu of the SFT term in (1 - mu) * GRPO + mu * SFT (after the warm-up, before any decay)."})
    sft_mu_end: float | None = field(default=None, metadata={
        "help": "mu at the end of the decay (linear/cosine schedules); default: sft_mu."})
    sft_mu_schedule: str = field(default="constant", metadata={
        "help": f"How mu moves from sft_mu to sft_mu_end: one of {', '.join(MU_SCHEDULES)}."})
    sft_mu_warmup_steps: int = field(default=0, metadata={
        "help": "Optimizer steps over which mu rises linearly from 0 to sft_mu."})
    sft_mu_decay_steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps of the decay after the warm-up; default: max_steps minus the warm-up."})
    sft_per_device_train_batch_size: int = field(default=4, metadata={
        "help": "Expert conversations per device in each micro-batch of the SFT term."})
    sft_max_length: int | None = field(default=512, metadata={
        "help": "Truncate each tokenized expert conversation to this many tokens (None: no truncation)."})
    sft_token_reweighting: str = field(default="none", metadata={
        "help": "Per-token factor of the SFT term, from the model's own probability p of the expert token "
                "(stop-gradient): 'none', 'p' (DFT) or 'p(1-p)' (CHORD-phi)."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("sft_mu", "sft_mu_end"):
            value = getattr(self, name)
            if value is None and name == "sft_mu_end":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.sft_mu_schedule not in MU_SCHEDULES:
            raise ValueError(f"sft_mu_schedule must be one of {MU_SCHEDULES}, got {self.sft_mu_schedule!r}")
        if self.sft_mu_schedule == "constant" and self.sft_mu_end not in (None, self.sft_mu):
            raise ValueError(f"sft_mu_end={self.sft_mu_end} needs a decaying sft_mu_schedule ('linear' or 'cosine'); "
                             "the 'constant' schedule keeps sft_mu")
        for name in ("sft_mu_warmup_steps", "sft_mu_decay_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.sft_mu_schedule != "constant" and self.sft_mu_decay_steps is None and self.max_steps <= 0:
            raise ValueError("a decaying sft_mu_schedule needs sft_mu_decay_steps (or max_steps > 0)")
        size = self.sft_per_device_train_batch_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"sft_per_device_train_batch_size must be an int >= 1, got {size!r}")
        if self.sft_max_length is not None and (not isinstance(self.sft_max_length, int) or self.sft_max_length < 2):
            raise ValueError(f"sft_max_length must be an int >= 2 or None, got {self.sft_max_length!r}")
        if self.sft_token_reweighting not in SFT_TOKEN_REWEIGHTINGS:
            raise ValueError(f"sft_token_reweighting must be one of {SFT_TOKEN_REWEIGHTINGS}, got "
                             f"{self.sft_token_reweighting!r}")


def mu_at(step: int, config: HybridConfig) -> float:
    """The SFT weight ``mu`` of optimizer step ``step`` (0-based) under ``config``'s schedule."""
    start, warmup = float(config.sft_mu), config.sft_mu_warmup_steps
    if step < warmup:
        return start * (step + 1) / (warmup + 1)
    if config.sft_mu_schedule == "constant":
        return start
    end = start if config.sft_mu_end is None else float(config.sft_mu_end)
    decay = config.sft_mu_decay_steps
    if decay is None:
        decay = max(config.max_steps - warmup, 0)
    if decay == 0 or step - warmup >= decay:
        return end
    progress = (step - warmup) / decay
    if config.sft_mu_schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
