"""Result and option types shared by every execution path."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossOutput:
    """What :func:`fused_wce.linear_cross_entropy` returns with ``return_stats=True``.

    ``loss`` is the reduced (or, for ``reduction="none"``, per-token weighted) loss and carries the gradient.
    The per-token tensors are shaped like ``target``, detached, and 0 / False where a token is not counted
    (target == ignore_index or weight == 0):

    - ``token_loss`` (float32): the unweighted cross-entropy ``lse - z[target]``;
    - ``lse`` (float32): ``logsumexp`` of the token's logits;
    - ``entropy`` (float32): entropy of the predicted distribution, in nats;
    - ``is_top1`` (bool): the target has the largest logit (for accuracy).
    """

    loss: torch.Tensor
    token_loss: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor


REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class LossOptions:
    """The keyword options of one call, validated; passed to the autograd function as one object."""

    ignore_index: int = -100
    reduction: str = "mean"
    chunk_size: int | None = None
    backend: str = "auto"
