"""Result and option types shared by every execution path."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .loss_math import PLAIN, LossVariant


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


REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class LossOptions:
    """The keyword options of one call, validated (built inside the custom op from its arguments).

    ``normalizer``: a 0-d tensor or None; ``compute_dtype``: the dtype of the logit matmuls; ``lean_memory``:
    vocabulary-slab gradients (see :func:`fused_wce.linear_cross_entropy`).
    """

    ignore_index: int = -100
    reduction: str = "mean"
    chunk_size: int | None = None
    backend: str = "auto"
    variant: LossVariant = field(default=PLAIN)
    compute_dtype: torch.dtype = torch.float32
    lean_memory: bool = False
    normalizer: torch.Tensor | None = None
