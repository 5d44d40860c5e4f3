"""Plain-PyTorch reference that materialises the logits (tests and benchmarks compare against it).

It implements the documented semantics in the most obvious way, in float64 by default, with autograd for the
gradients; it allocates ``N * V`` logits, so it is for checking, not for training.
"""
from __future__ import annotations

import torch

from .outputs import LossOutput


def _logits(hidden, weight, bias, logit_scale: float, softcap: float | None, compute_dtype) -> torch.Tensor:
    """``softcap(logit_scale * (hidden @ weight.T + bias))`` materialised in ``compute_dtype``."""
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    token_weight: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    return_stats: bool = False,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    dft: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor | LossOutput:
    """Reference for :func:`fused_wce.linear_cross_entropy`, computed in ``compute_dtype`` (float64 by default).

    The inputs are upcast with differentiable casts, so ``loss.backward()`` gives gradients in the inputs'
    dtypes, computed in ``compute_dtype``. The loss and stats come back in ``compute_dtype``.
    """
    logits = _logits(hidden, weight, bias, logit_scale, softcap, compute_dtype)
    if token_weight is None:
        token_weight = torch.ones(target.shape, dtype=compute_dtype, device=target.device)
    token_weight = token_weight.to(compute_dtype)
    counted = (target != ignore_index) & (token_weight > 0)
    safe_target = torch.where(counted, target, 0).long()

    log_probs = logits.log_softmax(-1)
    target_log_prob = log_probs.gather(-1, safe_target[..., None]).squeeze(-1)
    token_loss = -target_log_prob
    if label_smoothing:  # (not 0 * mean, which is NaN when a logit is -inf)
        token_loss = (1.0 - label_smoothing) * token_loss - label_smoothing * log_probs.mean(-1)
    lse = torch.logsumexp(logits, -1)
    z_term = z_loss * lse.square()
    token_loss = token_loss + z_term
    if dft:
        probability = target_log_prob.detach().exp()
        token_loss, z_term = token_loss * probability, z_term * probability
    zero = torch.zeros((), dtype=compute_dtype, device=logits.device)
    weighted = torch.where(counted, token_weight * token_loss, zero)

    if reduction == "none":
        loss = weighted
    elif normalizer is not None:
        loss = weighted.sum() / torch.as_tensor(normalizer, dtype=compute_dtype, device=logits.device)
    elif reduction == "sum":
        loss = weighted.sum()
    elif reduction == "mean":
        total_weight = torch.where(counted, token_weight, zero).sum()
        loss = torch.where(total_weight > 0, weighted.sum() / total_weight.clamp_min(torch.finfo(compute_dtype).tiny), zero)
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    if not return_stats:
        return loss
    with torch.no_grad():
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum(-1)
        target_logit = logits.gather(-1, safe_target[..., None]).squeeze(-1)
        is_top1 = target_logit >= logits.amax(-1)
    return LossOutput(
        loss=loss,
        token_loss=torch.where(counted, token_loss.detach(), zero),
        lse=torch.where(counted, lse.detach(), zero),
        entropy=torch.where(counted, entropy, zero),
        is_top1=is_top1 & counted,
        z_loss=torch.where(counted, z_term.detach(), zero) if z_loss else None,
    )


def reference_linear_log_prob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fused_wce.linear_log_prob`, computed in ``compute_dtype`` (float64 by default) from
    the materialised logits ``z = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature``:
    ``log_softmax(z).gather(target)`` and ``-sum(p log p)``, 0 where ``target == ignore_index``, differentiable
    through autograd (upcast with differentiable casts, so gradients come back in the inputs' dtypes)."""
    logits = _logits(hidden, weight, bias, logit_scale, softcap, compute_dtype)
    logits = logits / temperature
    labelled = target != ignore_index
    log_probs = logits.log_softmax(-1)
    picked = log_probs.gather(-1, torch.where(labelled, target, 0).long()[..., None]).squeeze(-1)
    zero = torch.zeros((), dtype=compute_dtype, device=logits.device)
    log_prob = torch.where(labelled, picked, zero)
    if not return_entropy:
        return log_prob
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_prob, torch.where(labelled, entropy, zero)
