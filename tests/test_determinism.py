"""Determinism, as docs/robustness.md promises it: identical inputs (values, shapes, strides, dtype, device,
``chunk_size``) give bitwise identical loss, per-token stats and gradients run after run, on every path, with or
without ``torch.use_deterministic_algorithms(True)``. There is no ``deterministic=`` option.

Not promised, so not tested: equality across different ``chunk_size``s, batch compositions or paths.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fused_wce
from helpers import make_problem

NAMES = ("loss", "token_loss", "lse", "entropy", "is_top1", "z_loss", "grad_hidden", "grad_weight", "grad_bias")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch's deterministic mode on or off for the block (on CUDA it needs CUBLAS_WORKSPACE_CONFIG: conftest)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _run_once(problem, path, **kwargs) -> list:
    """Every output of one forward + backward: the loss, each per-token stat and each gradient (None if absent)."""
    out = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                         bias=problem.bias, backend=path[1], return_stats=True, **kwargs)
    inputs = {name: t for name, t in (("hidden", problem.hidden), ("weight", problem.weight),
                                      ("bias", problem.bias)) if t is not None and t.requires_grad}
    upstream = torch.linspace(-1, 1, out.loss.numel(), device=out.loss.device).view_as(out.loss)
    grads = dict(zip(inputs, torch.autograd.grad(out.loss, list(inputs.values()), upstream)))
    return [out.loss.detach(), out.token_loss, out.lse, out.entropy, out.is_top1, out.z_loss,
            grads.get("hidden"), grads.get("weight"), grads.get("bias")]


def assert_bitwise_repeatable(problem, path, repeats=2, **kwargs):
    """``repeats`` runs without torch's deterministic mode and ``repeats`` with it: within each mode every output
    is bitwise identical (the two modes may legitimately pick different torch kernels)."""
    for enabled in (False, True):
        with deterministic_algorithms(enabled):
            runs = [_run_once(problem, path, **kwargs) for _ in range(repeats)]
        for run in runs[1:]:
            for name, first, again in zip(NAMES, runs[0], run):
                assert (first is None) == (again is None), name
                if first is not None:
                    assert torch.equal(first, again), f"{name} differs between runs (deterministic mode {enabled})"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_identical_run_after_run(path, dtype, reduction):
    problem = make_problem((2, 10), 40, 500, dtype, path[0], bias=True, seed=17)
    assert_bitwise_repeatable(problem, path, repeats=3, reduction=reduction, chunk_size=8)


@pytest.mark.parametrize("chunk_size", [1, 7, None], ids=["chunk1", "chunk7", "default_chunk"])
def test_bitwise_repeatable_at_every_chunk_size(path, chunk_size):
    """Many chunks (grad_weight accumulated 13 times), a ragged last chunk, and the default budget's one chunk."""
    problem = make_problem((13,), 24, 300, torch.float32, path[0], bias=True, seed=5)
    assert_bitwise_repeatable(problem, path, chunk_size=chunk_size)


OPTIONS = {
    "lean_memory": dict(lean_memory=True),  # vocabulary-slab weight gradient (bf16 weights: the lean plan runs)
    "variants": dict(label_smoothing=0.1, z_loss=1e-3, softcap=30.0, logit_scale=0.8, dft=True),
    "sum_normalizer": dict(reduction="sum", normalizer=11.0),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_bitwise_repeatable_with_every_plan(path, option):
    problem = make_problem((3, 9), 40, 600, torch.bfloat16, path[0], bias=True, seed=23)
    assert_bitwise_repeatable(problem, path, chunk_size=10, **OPTIONS[option])


def test_frozen_head_is_bitwise_repeatable(path):
    """A frozen LM head (no weight gradient: the plan launches no grad_weight GEMM)."""
    problem = make_problem((4, 6), 32, 400, torch.float32, path[0], bias=False, seed=31)
    problem.weight.requires_grad_(False)
    assert_bitwise_repeatable(problem, path, chunk_size=9)


def test_no_grad_pass_is_bitwise_repeatable(path):
    """The stats-only plan (vocabulary split across programs, then combine) is repeatable too."""
    problem = make_problem((3, 7), 40, 600, torch.float32, path[0], requires_grad=False, seed=4)
    for enabled in (False, True):
        with torch.no_grad(), deterministic_algorithms(enabled):
            runs = [fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                   problem.token_weight, backend=path[1], return_stats=True)
                    for _ in range(3)]
        for run in runs[1:]:
            for name in ("loss", "token_loss", "lse", "entropy", "is_top1"):
                assert torch.equal(getattr(run, name), getattr(runs[0], name)), name
