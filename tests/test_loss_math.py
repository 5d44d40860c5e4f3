"""The tiled formulas of fused_wce.loss_math equal the whole-row ones, in any tiling."""
from __future__ import annotations

import pytest
import torch

from fused_wce import LossOptions
from fused_wce.loss_math import (apply_dft, dft_factor, finish_token_stats, merge_tile_summaries,
                                 softmax_grad_, tile_summary_, transform_logits_)


def test_merging_tiles_equals_whole_row():
    logits = torch.randn(7, 300, dtype=torch.float64) * 4
    target = torch.randint(0, 300, (7,))
    whole, _ = tile_summary_(logits.clone())
    summary = None
    for tile in logits.split(37, dim=1):
        part, _ = tile_summary_(tile.clone())
        summary = part if summary is None else merge_tile_summaries(summary, part)
    for a, b in zip(summary, whole):
        torch.testing.assert_close(a, b)
    stats = finish_token_stats(summary, logits.gather(1, target[:, None]).squeeze(1))
    log_probs = logits.log_softmax(-1)
    torch.testing.assert_close(stats.lse, logits.logsumexp(-1))
    torch.testing.assert_close(stats.token_loss, -log_probs.gather(1, target[:, None]).squeeze(1))
    torch.testing.assert_close(stats.entropy, -(log_probs.exp() * log_probs).sum(-1))
    assert torch.equal(stats.is_top1, logits.argmax(-1) == target)


def test_softmax_grad_matches_autograd():
    logits = (torch.randn(5, 40, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, 40, (5,))
    coef = torch.rand(5, dtype=torch.float64)
    (torch.nn.functional.cross_entropy(logits, target, reduction="none") * coef).sum().backward()
    summary, _ = tile_summary_(logits.detach().clone())
    lse = summary[0] + summary[1].log()
    grad = softmax_grad_((logits.detach() - lse[:, None]).exp(), None, lse, target, coef)
    torch.testing.assert_close(grad, logits.grad)


@pytest.mark.parametrize("variant", [
    LossOptions(label_smoothing=0.1), LossOptions(z_loss=1e-3), LossOptions(softcap=2.0),
    LossOptions(logit_scale=0.5), LossOptions(dft=True),
    LossOptions(label_smoothing=0.2, z_loss=1e-2, softcap=3.0, logit_scale=1.5, dft=True),
], ids=repr)
def test_variant_math_matches_autograd(variant):
    """finish_token_stats / softmax_grad_ against autograd of the textbook formulas, per variant."""
    raw = (torch.randn(6, 50, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, 50, (6,))
    coef = torch.rand(6, dtype=torch.float64)
    z = raw * variant.logit_scale
    if variant.softcap is not None:
        z = variant.softcap * torch.tanh(z / variant.softcap)
    loss = torch.nn.functional.cross_entropy(z, target, reduction="none", label_smoothing=variant.label_smoothing)
    loss = loss + variant.z_loss * z.logsumexp(-1) ** 2
    if variant.dft:
        loss = loss * (-torch.nn.functional.cross_entropy(z, target, reduction="none")).exp().detach()
    (loss * coef).sum().backward()

    logits = transform_logits_(raw.detach().clone(), variant)
    target_logit = logits.gather(1, target[:, None]).squeeze(1)
    sum_logits = logits.sum(-1)
    summary, _ = tile_summary_(logits.clone())
    stats = finish_token_stats(summary, target_logit, variant, sum_logits, 50)
    scaled_coef = coef
    if variant.dft:
        factor = dft_factor(stats.lse, target_logit)
        stats = apply_dft(stats, factor)
        scaled_coef = coef * factor
    torch.testing.assert_close(stats.token_loss, loss.detach())
    probs = (logits - stats.lse[:, None]).exp()
    grad = softmax_grad_(probs, logits, stats.lse, target, scaled_coef, variant)
    torch.testing.assert_close(grad, raw.grad)
