"""The tiled formulas of fused_wce.loss_math equal the whole-row ones, in any tiling."""
from __future__ import annotations

import torch

from fused_wce.loss_math import finish_token_stats, merge_tile_summaries, softmax_grad_, tile_summary_


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
    summary, exp_shifted = tile_summary_(logits.detach().clone())
    torch.testing.assert_close(softmax_grad_(exp_shifted, summary[1], target, coef), logits.grad)
