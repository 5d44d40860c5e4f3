"""Shared test helpers: random problems and tolerances measured against torch's own same-dtype error."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

import fused_wce


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    target: torch.Tensor
    token_weight: torch.Tensor | None
    bias: torch.Tensor | None


def make_problem(shape=(3, 17), hidden_size=96, vocab_size=1000, dtype=torch.float32, device="cpu", *,
                 bias=False, ignore_index=-100, ignore_fraction=0.2, zero_weight_fraction=0.2, weighted=True,
                 logit_scale=3.0, seed=None, requires_grad=True) -> Problem:
    """Fresh random inputs: logits with std ~ ``logit_scale``, some ignored targets, some zero weights.

    Never zeros: hidden ~ N(0, 1), weight ~ N(0, logit_scale^2 / H), bias ~ N(0, 1).
    """
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hidden = torch.randn(*shape, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) * (logit_scale / hidden_size**0.5)
    target = torch.randint(0, vocab_size, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < ignore_fraction] = ignore_index
    token_weight = None
    if weighted:
        token_weight = torch.rand(shape, generator=generator) * 2
        token_weight[torch.rand(shape, generator=generator) < zero_weight_fraction] = 0.0
    bias_tensor = torch.randn(vocab_size, generator=generator) if bias else None

    def place(t, grad):
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return t.requires_grad_(grad) if t.is_floating_point() else t

    return Problem(
        hidden=place(hidden, requires_grad),
        weight=place(weight, requires_grad),
        target=target.to(device),
        token_weight=None if token_weight is None else token_weight.to(device),
        bias=None if bias_tensor is None else place(bias_tensor, requires_grad),
    )


def torch_eager_same_dtype(problem: Problem, **kwargs):
    """What transformers does: logits materialised in the input dtype, upcast to fp32, then the loss.

    Its error against the float64 reference is the yardstick for our tolerance in that dtype.
    """
    logits = problem.hidden @ problem.weight.T
    if problem.bias is not None:
        logits = logits + problem.bias
    eye = torch.eye(logits.shape[-1], dtype=torch.float32, device=logits.device)
    # reference_linear_cross_entropy with an identity "weight" turns the given logits into the loss.
    return fused_wce.reference_linear_cross_entropy(logits.float(), eye, problem.target, problem.token_weight,
                                                    compute_dtype=torch.float32, **kwargs)


def torch_eager_log_prob(problem: Problem, **kwargs):
    """``(log_prob, entropy)`` as an RL trainer computes them from a model's logits: materialised in the input
    dtype, upcast to fp32, then the transform, ``log_softmax`` and the gather; differentiable. Its error
    against the float64 reference is the yardstick for :func:`fused_wce.linear_log_prob` in that dtype."""
    logits = problem.hidden @ problem.weight.T
    if problem.bias is not None:
        logits = logits + problem.bias
    eye = torch.eye(logits.shape[-1], dtype=torch.float32, device=logits.device)
    return fused_wce.reference_linear_log_prob(logits.float(), eye, problem.target, return_entropy=True,
                                               compute_dtype=torch.float32, **kwargs)


# Smallest tolerance per dtype, relative to the reference's magnitude: below torch's own error these are the
# rounding of the outputs themselves (fp32: fp32 accumulation over H and V; half types: one output rounding).
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, yardstick: torch.Tensor | None, dtype, name: str,
                 factor: float = 2.0):
    """``max|actual - expected| <= factor * max|yardstick - expected| + FLOOR[dtype] * max|expected|``."""
    expected = expected.double()
    error = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    allowed = FLOOR[dtype] * max(scale, 1e-6)
    if yardstick is not None and yardstick.numel():
        allowed += factor * (yardstick.double() - expected).abs().max().item()
    assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g} (scale {scale:.3g})"


def run_inside_custom_op(mode, func, args, kwargs):
    """For a dispatch mode: run a fused_wce custom op's implementation with ``mode`` active, so the mode sees
    the ops inside it (a mode otherwise sees one opaque op). Returns None for any other op."""
    from torch._library.custom_ops import OPDEFS

    definition = OPDEFS.get(func._schema.name)
    if definition is None or not func._schema.name.startswith("fused_wce::"):
        return None
    implementation = definition._init_fn  # the Python function the op was defined with
    if implementation is None:
        return None
    with mode:
        return implementation(*args, **(kwargs or {}))


def end_distributed_worker() -> None:
    """End a ``torch.distributed`` worker whose results are written: a last barrier, the process group
    destroyed, then no interpreter teardown. With gloo, torch 2.13 sometimes aborts there ("terminate called
    without an active exception", no Python frame, ~1 run in 8, after ``destroy_process_group`` returned),
    which would fail the launch for nothing a test checks."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
