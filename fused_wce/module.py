"""``LinearCrossEntropy``: :func:`fused_wce.linear_cross_entropy` as an ``nn.Module``."""
from __future__ import annotations

import torch
from torch import nn

from .functional import linear_cross_entropy
from .types import LossOutput


class LinearCrossEntropy(nn.Module):
    """Holds the keyword options of :func:`fused_wce.linear_cross_entropy`; has no parameters.

    ``forward(hidden [..., H], weight [V, H], target [...], token_weight [...] | None, bias [V] | None)``.
    """

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean",
                 normalizer: float | torch.Tensor | None = None, chunk_size: int | None = None,
                 return_stats: bool = False, backend: str = "auto", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
                 dft: bool = False, compute_dtype: torch.dtype | None = None, lean_memory: bool = False) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        self.lean_memory = lean_memory
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.dft = dft
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.normalizer = normalizer
        self.chunk_size = chunk_size
        self.return_stats = return_stats
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                token_weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
                ) -> torch.Tensor | LossOutput:
        return linear_cross_entropy(hidden, weight, target, token_weight, bias=bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, normalizer=self.normalizer,
                                    chunk_size=self.chunk_size, return_stats=self.return_stats,
                                    backend=self.backend, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, logit_scale=self.logit_scale,
                                    dft=self.dft, compute_dtype=self.compute_dtype, lean_memory=self.lean_memory)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, chunk_size={self.chunk_size}, "
                f"return_stats={self.return_stats}, backend={self.backend!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"logit_scale={self.logit_scale}, dft={self.dft}, compute_dtype={self.compute_dtype}, "
                f"lean_memory={self.lean_memory}")
