"""What the public functions return."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossOutput:
    """What :func:`fused_wce.linear_cross_entropy` returns with ``return_stats=True``.

    ``loss`` is the reduced (or, for ``reduction="none"``, per-token weighted) loss and carries the gradient.
    The per-token tensors are shaped like ``target``, detached, and 0 / False where a token is not counted
    (target == ignore_index or weight == 0):

    - ``token_loss`` (float32): the unweighted per-token loss: ``lse - z[target]`` for plain cross-entropy,
      with every loss variant applied otherwise (label smoothing, z-loss, DFT's factor);
    - ``lse`` (float32): ``logsumexp`` of the token's logits;
    - ``entropy`` (float32): entropy of the predicted distribution, in nats;
    - ``is_top1`` (bool): the target has the largest logit (for accuracy);
    - ``z_loss`` (float32, only when ``z_loss > 0``, else None): the per-token z term ``z_loss * lse**2``
      (included in ``token_loss``).
    Logit-level statistics (lse, entropy, is_top1) are of the final logits (after logit_scale and softcap).
    """

    loss: torch.Tensor
    token_loss: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor
    z_loss: torch.Tensor | None = None
