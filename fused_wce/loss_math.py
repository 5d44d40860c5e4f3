"""The loss math, in one place.

Every execution path of ``fused_wce`` computes, for each *counted* token ``i`` (target != ignore_index and
weight > 0), from its fp32 logit row ``z_i = hidden_i @ weight.T + bias``:

====================  ===============================================================================
``lse_i``             ``logsumexp_v z_iv``                     (online over vocabulary tiles, fp32)
``token_loss_i``      ``l_i = lse_i - z_i[t_i]``               (unweighted cross-entropy)
``entropy_i``         ``-sum_v p_iv log p_iv = -sum_v p_iv (z_iv - lse_i)``
``is_top1_i``         ``z_i[t_i] >= max_v z_iv``               (the target is an arg-max)
``dlogits_iv``        ``c_i * (p_iv - [v == t_i])``, ``p_iv = exp(z_iv - lse_i)``
====================  ===============================================================================

where the per-token gradient coefficient ``c_i`` is the token's weight times the reduction's scale:
``w_i / sum(w)`` for "mean", ``w_i / normalizer`` with a normalizer, ``w_i`` for "sum" and
``w_i * grad_out_i`` for "none". Everything downstream is linear in ``dlogits``:
``d hidden = dlogits @ weight``, ``d weight = dlogits.T @ hidden``, ``d bias = dlogits.sum(0)``.

Online logsumexp over tiles. A tile ``T`` of a row is summarised by three fp32 numbers
``m_T = max z``, ``s_T = sum exp(z - m_T)`` and ``e_T = sum exp(z - m_T) * (z - m_T)``; two summaries
merge exactly (:func:`merge_tile_summaries`), so the whole row never has to exist at once. From the merged
summary, ``lse = m + log s`` and ``entropy = log s - e / s``. Keeping ``e`` relative to the running max
(rather than ``sum p z``) avoids the cancellation of ``lse - sum p z`` for large logits.

This module is the PyTorch statement of that math: the CPU path (:mod:`fused_wce._torch_backend`) calls these
functions on whole chunk rows; the Triton kernels (:mod:`fused_wce.kernels`) implement the same formulas on
register tiles (``vocab_partials``: the tile summaries and the target logit; ``combine``: the merge and the
per-token outputs; ``softmax_grad``: ``dlogits``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class TokenStats(NamedTuple):
    """Per-token outputs of one pass, for the counted tokens only. All ``[M]``."""

    token_loss: torch.Tensor  # float32, l_i = lse_i - z_i[t_i]
    lse: torch.Tensor  # float32
    entropy: torch.Tensor  # float32
    is_top1: torch.Tensor  # bool


def tile_summary_(logits: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Summarise rows of an fp32 logit tile ``[M, T]`` as ``(m, s, e)``, each ``[M]`` (see module doc).

    Overwrites ``logits`` with ``z - m`` and also returns ``exp(z - m)`` (``[M, T]``), the unnormalised
    probabilities that :func:`softmax_grad_` turns into ``dlogits``; two ``[M, T]`` buffers in all.
    """
    row_max = logits.amax(dim=-1)
    shifted = logits.sub_(row_max[:, None])
    exp_shifted = shifted.exp()
    sum_exp = exp_shifted.sum(-1)
    # sum_v exp(z - m) (z - m) as a batched dot product: no third [M, T] temporary.
    sum_exp_shifted = torch.bmm(exp_shifted[:, None, :], shifted[:, :, None]).view(-1)
    return (row_max, sum_exp, sum_exp_shifted), exp_shifted


def merge_tile_summaries(a, b):
    """Merge two ``(m, s, e)`` row summaries into the summary of the concatenated rows (exact)."""
    m_a, s_a, e_a = a
    m_b, s_b, e_b = b
    m = torch.maximum(m_a, m_b)
    scale_a, scale_b = (m_a - m).exp(), (m_b - m).exp()
    # exp(z - m) (z - m) = scale_x * exp(z - m_x) * ((z - m_x) + (m_x - m)) for z in tile x.
    s = scale_a * s_a + scale_b * s_b
    e = scale_a * (e_a + (m_a - m) * s_a) + scale_b * (e_b + (m_b - m) * s_b)
    return m, s, e


def finish_token_stats(summary, target_logit: torch.Tensor) -> TokenStats:
    """Per-token outputs from a whole-row summary ``(m, s, e)`` and the target's fp32 logit, all ``[M]``."""
    row_max, sum_exp, sum_exp_shifted = summary
    log_sum_exp = sum_exp.log()
    lse = row_max + log_sum_exp
    entropy = log_sum_exp - sum_exp_shifted / sum_exp
    return TokenStats(lse - target_logit, lse, entropy, target_logit >= row_max)


def softmax_grad_(
    exp_shifted: torch.Tensor, sum_exp: torch.Tensor, target: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Turn ``exp(z - m)`` rows ``[M, V]`` into ``dlogits = coef * (p - onehot(target))`` in place.

    ``p = exp(z - m) / s = exp(z - lse)``; ``sum_exp``, ``target`` (int64) and ``coef`` (float32) are ``[M]``.
    """
    exp_shifted.mul_((coef / sum_exp)[:, None])
    exp_shifted.scatter_add_(1, target[:, None], -coef[:, None])
    return exp_shifted
