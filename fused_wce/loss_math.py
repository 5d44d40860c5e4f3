"""The loss math, in one place.

Every execution path of ``fused_wce`` computes, for each *counted* token ``i`` (target != ignore_index and
weight > 0), from its raw fp32 logit row ``r_i = hidden_i @ weight.T + bias``:

====================  ===============================================================================
``z_iv``              ``cap * tanh(scale * r_iv / cap)`` (softcap), else ``scale * r_iv``; scale = logit_scale
``lse_i``             ``logsumexp_v z_iv``                     (online over vocabulary tiles, fp32)
``nll_i``             ``lse_i - z_i[t_i]``                     (plain cross-entropy)
``token_loss_i``      ``L_i = (1 - eps) nll_i + eps (lse_i - mean_v z_iv) + lam lse_i^2``, times
                      ``sg(p_i[t_i]) = exp(-nll_i)`` with DFT (eps = label_smoothing, lam = z_loss)
``entropy_i``         ``-sum_v p_iv log p_iv``, ``p_iv = exp(z_iv - lse_i)``
``is_top1_i``         ``z_i[t_i] >= max_v z_iv``               (the target is an arg-max)
``dlogits_iv``        ``c_i * d_i * (p_iv (1 + 2 lam lse_i) - (1 - eps) [v == t_i] - eps / V) * dz_iv/dr_iv``
                      with ``d_i = exp(-nll_i)`` under DFT (else 1), ``dz/dr = scale * (1 - (z / cap)^2)``;
                      plus ``- e_i p_iv (log p_iv + entropy_i) * dz_iv/dr_iv`` with an entropy coefficient
                      ``e_i`` (the gradient of ``e_i * entropy_i``)
====================  ===============================================================================

and the per-token gradient coefficient ``c_i`` is the token's weight times the reduction's scale:
``w_i / sum(w)`` for "mean", ``w_i / normalizer`` with a normalizer, ``w_i`` for "sum" and
``w_i * grad_out_i`` for "none". Per-token log-probabilities (:func:`fused_wce.linear_log_prob`) are
``-nll_i`` of the plain loss: their upstream gradient ``g_i`` is ``c_i = -g_i``, and their entropy's upstream
gradient is ``e_i``. Everything downstream is linear in ``dlogits``:
``d hidden = dlogits @ weight``, ``d weight = dlogits.T @ hidden``, ``d bias = dlogits.sum(0)``.

Online logsumexp over tiles. A tile ``T`` of a row is summarised by three fp32 numbers
``m_T = max z``, ``s_T = sum exp(z - m_T)`` and ``e_T = sum exp(z - m_T) * (z - m_T)`` (plus ``sum z`` with
label smoothing); two summaries merge exactly (:func:`merge_tile_summaries`), so the whole row never has to
exist at once. From the merged summary, ``lse = m + log s`` and ``entropy = log s - e / s``. Keeping ``e``
relative to the running max (rather than ``sum p z``) avoids the cancellation of ``lse - sum p z``.

Vocabulary slices. The same merge combines slices of the vocabulary held by different processes (a
vocabulary-parallel LM head, :mod:`fused_wce.vocab_parallel`): each slice summarises its part of every row as
a :class:`SliceSummary` ``(m, s, e, z[t] or 0, sum z)``, the slices' summaries merge into the whole row's
(:func:`merge_slice_summaries`), which gives ``lse`` and every per-token output as above; ``dlogits`` of a
slice's columns then need only the whole row's ``lse`` and the final ``c_i`` (with DFT's factor, known only
from the whole row), and ``d hidden`` is the sum of the slices' ``dlogits @ weight_slice``.

This module is the PyTorch statement of that math: the CPU path (:mod:`fused_wce._torch_backend`) calls these
functions on whole chunk rows; the Triton kernels (:mod:`fused_wce.kernels`) implement the same formulas on
register tiles (``vocab_partials``: logit transforms, tile summaries and the target logit; ``combine``: the
merge and the per-token outputs; ``softmax_grad``: ``dlogits``), each variant a compile-time flag.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .options import PLAIN, LossOptions


class TokenStats(NamedTuple):
    """Per-token outputs of one pass, for the counted tokens only. All ``[M]``."""

    token_loss: torch.Tensor  # float32, L_i (unweighted, every variant applied)
    lse: torch.Tensor  # float32
    entropy: torch.Tensor  # float32
    is_top1: torch.Tensor  # bool
    z_term: torch.Tensor | None = None  # float32, lam * lse**2 (only with z_loss)


def transform_logits_(raw_logits: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """``z = softcap(scale * r)`` in place on fp32 ``[M, V]`` raw logits; returns them."""
    if options.has_logit_scale:
        raw_logits.mul_(options.logit_scale)
    if options.has_softcap:
        raw_logits.div_(options.softcap).tanh_().mul_(options.softcap)
    return raw_logits


def tile_summary_(logits: torch.Tensor, exp_out: torch.Tensor | None = None
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Summarise rows of an fp32 logit tile ``[M, T]`` as ``(m, s, e)``, each ``[M]`` (see module doc).

    Overwrites ``logits`` with ``z - m`` and writes ``exp(z - m)`` into ``exp_out`` (``[M, T]`` fp32; a new
    tensor when None), which it also returns: two ``[M, T]`` buffers in all.
    """
    row_max = logits.amax(dim=-1)
    # A -inf logit (a banned token) has p = 0 and adds nothing; clamping it to the lowest finite float keeps
    # exp(z - m) (z - m) at 0 instead of 0 * -inf = NaN. NaN stays NaN.
    shifted = logits.sub_(row_max[:, None]).clamp_(min=torch.finfo(logits.dtype).min)
    exp_shifted = torch.exp(shifted, out=exp_out) if exp_out is not None else shifted.exp()
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


def merge_stacked_summaries(row_max: torch.Tensor, sum_exp: torch.Tensor, sum_exp_shifted: torch.Tensor):
    """Merge ``K`` summaries stacked along dim 0 (each ``[K, M]``) into one ``(m, s, e)`` of ``[M]``: the
    :func:`merge_tile_summaries` formula for ``K`` parts at once (equal to folding it over the parts)."""
    m = row_max.amax(dim=0)
    offset = row_max - m
    scale = offset.exp()
    return m, (scale * sum_exp).sum(0), (scale * (sum_exp_shifted + offset * sum_exp)).sum(0)


class SliceSummary(NamedTuple):
    """What a pass over one slice of the vocabulary knows of each token's row before the row is complete, all
    fp32 ``[M]``: the slice's ``(m, s, e)``, the target's logit (0 when the target lies in another slice) and,
    with label smoothing, ``sum z`` over the slice (None without). The summaries of slices that tile the
    vocabulary merge into the whole row's (:func:`merge_slice_summaries`)."""

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    sum_exp_shifted: torch.Tensor
    target_logit: torch.Tensor
    sum_logits: torch.Tensor | None = None


def merge_slice_summaries(stacked: SliceSummary) -> SliceSummary:
    """The whole rows' summary from the summaries of ``K`` vocabulary slices that tile them, stacked along dim
    0 (``[K, M]`` each): ``(m, s, e)`` merged (:func:`merge_stacked_summaries`), the target logits and
    ``sum z`` added (exactly one slice holds each target)."""
    merged = merge_stacked_summaries(stacked.row_max, stacked.sum_exp, stacked.sum_exp_shifted)
    sum_logits = None if stacked.sum_logits is None else stacked.sum_logits.sum(0)
    return SliceSummary(*merged, stacked.target_logit.sum(0), sum_logits)


def finish_token_stats(summary, target_logit: torch.Tensor, options: LossOptions = PLAIN,
                       sum_logits: torch.Tensor | None = None, vocab_size: int | None = None) -> TokenStats:
    """Per-token outputs from a whole-row summary ``(m, s, e)`` and the target's fp32 logit, all ``[M]``.

    ``sum_logits`` (``sum_v z_v``) and ``vocab_size`` are needed with label smoothing. The DFT factor is not
    applied here: see :func:`apply_dft`.
    """
    row_max, sum_exp, sum_exp_shifted = summary
    log_sum_exp = sum_exp.log()
    lse = row_max + log_sum_exp
    entropy = log_sum_exp - sum_exp_shifted / sum_exp
    token_loss = lse - target_logit
    if options.label_smoothing:
        eps = options.label_smoothing
        token_loss = (1.0 - eps) * token_loss + eps * (lse - sum_logits / vocab_size)
    z_term = None
    if options.z_loss:
        z_term = options.z_loss * lse * lse
        token_loss = token_loss + z_term
    return TokenStats(token_loss, lse, entropy, target_logit >= row_max, z_term)


def dft_factor(lse: torch.Tensor, target_logit: torch.Tensor) -> torch.Tensor:
    """``sg(p(target)) = exp(z_t - lse)``, ``[M]``: DFT's per-token multiplier of the loss and its gradient."""
    return (target_logit - lse).exp()


def apply_dft(stats: TokenStats, factor: torch.Tensor) -> TokenStats:
    """Scale each token's loss (and z term) by DFT's detached ``p(target)``."""
    z_term = None if stats.z_term is None else stats.z_term * factor
    return stats._replace(token_loss=stats.token_loss * factor, z_term=z_term)


def softmax_grad_(probs: torch.Tensor, logits: torch.Tensor | None, lse: torch.Tensor, target: torch.Tensor,
                  coef: torch.Tensor, options: LossOptions = PLAIN, vocab_size: int | None = None, *,
                  entropy: torch.Tensor | None = None, entropy_coef: torch.Tensor | None = None,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Turn probabilities ``p = exp(z - lse)``, rows ``[M, T]``, into ``dlogits`` (with respect to the raw
    logits) in place, and return them.

    ``coef`` (float32 ``[M]``) already includes the DFT factor. ``logits`` (``z``, ``[M, T]``) is needed only
    with a softcap, whose derivative depends on ``z``, or with ``entropy_coef``; it is overwritten. The rows may
    be one block of the vocabulary (``T < V``): ``target`` is then relative to the block's first column (a
    target outside ``[0, T)`` is in another block) and ``vocab_size`` is ``V`` (label smoothing's ``eps / V``);
    by default the rows are whole (``T == V``).

    ``entropy_coef`` (float32 ``[M]``, with the rows' whole-row ``entropy``) adds the gradient of
    ``entropy_coef * entropy``: ``-e p (z - lse + entropy)`` before the logit transform's derivative. With a
    softcap that term needs a third ``[M, T]`` buffer, ``scratch`` (allocated when None), since ``z`` is read
    again afterwards.
    """
    row_scale = coef * (1.0 + 2.0 * options.z_loss * lse) if options.z_loss else coef
    entropy_term = None
    if entropy_coef is not None:
        # dH/dz_v = -p_v (log p_v + H) with log p = z - lse. A -inf logit has p = 0: clamped, its term is 0.
        out = logits if scratch is None and not options.has_softcap else scratch
        entropy_term = torch.sub(logits, (lse - entropy)[:, None], out=out).clamp_(min=torch.finfo(logits.dtype).min)
        entropy_term.mul_(probs).mul_(entropy_coef[:, None])
    grad = probs.mul_(row_scale[:, None])
    if entropy_term is not None:
        grad.sub_(entropy_term)
    eps = options.label_smoothing
    width = grad.shape[1]
    in_block = (target >= 0) & (target < width)
    target_step = torch.where(in_block, -(1.0 - eps) * coef, torch.zeros_like(coef))
    grad.scatter_add_(1, target.clamp(0, width - 1)[:, None], target_step[:, None])
    if eps:
        grad.sub_((eps / (vocab_size or width)) * coef[:, None])
    if options.has_softcap:  # dz/dr = scale * (1 - tanh^2) = scale * (1 - (z / cap)^2)
        grad.mul_(logits.div_(options.softcap).square_().neg_().add_(1.0))
    if options.has_logit_scale:
        grad.mul_(options.logit_scale)
    return grad
