"""``LinearCrossEntropy``: :func:`fused_wce.linear_cross_entropy` as an ``nn.Module``."""
from __future__ import annotations

import torch
from torch import nn

from .functional import _call
from .options import LossOptions
from .outputs import LossOutput


class LinearCrossEntropy(nn.Module):
    """Holds the keyword options of :func:`fused_wce.linear_cross_entropy` (validated once, as one
    :class:`~fused_wce.options.LossOptions`, plus ``normalizer`` and ``return_stats``); has no parameters.

    ``forward(hidden [..., H], weight [V, H], target [...], token_weight [...] | None, bias [V] | None)``.
    """

    def __init__(self, *, normalizer: float | torch.Tensor | None = None, return_stats: bool = False,
                 **options) -> None:
        super().__init__()
        self.options = LossOptions(**options)
        self.normalizer = normalizer
        self.return_stats = return_stats

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                token_weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
                ) -> torch.Tensor | LossOutput:
        return _call(hidden, weight, target, token_weight, bias, self.normalizer, self.options, self.return_stats)

    def extra_repr(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self.options).items())
        return f"{fields}, normalizer={self.normalizer!r}, return_stats={self.return_stats}"
