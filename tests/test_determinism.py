"""Determinism: the same inputs give bitwise identical loss, stats and gradients run after run, on every path.

The Triton path uses no atomics (asserted below from the kernels' source): every output element is written by
one program, grad_weight accumulates chunk after chunk through the GEMM's ACCUMULATE flag in a fixed order,
grad_bias is a torch sum. So there is no ``deterministic=`` option; docs/robustness.md states why.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fused_wce
from helpers import make_problem

KERNELS = Path(fused_wce.__file__).parent / "kernels"


def _run_once(problem, path, reduction, **kwargs):
    inputs = [problem.hidden, problem.weight, problem.bias]
    out = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                         bias=problem.bias, reduction=reduction, backend=path[1],
                                         return_stats=True, **kwargs)
    upstream = torch.linspace(-1, 1, out.loss.numel(), device=out.loss.device).view_as(out.loss)
    grads = torch.autograd.grad(out.loss, inputs, upstream)
    return [out.loss.detach(), out.token_loss, out.lse, out.entropy, out.is_top1, *grads]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_identical_run_after_run(path, dtype, reduction):
    problem = make_problem((2, 10), 40, 500, dtype, path[0], bias=True, seed=17)
    deterministic = torch.cuda.is_available() and path[0] == "cuda"
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic or previous)
    try:
        runs = [_run_once(problem, path, reduction, chunk_size=8) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    names = ["loss", "token_loss", "lse", "entropy", "is_top1", "grad_hidden", "grad_weight", "grad_bias"]
    for run in runs[1:]:
        for name, first, again in zip(names, runs[0], run):
            assert torch.equal(first, again), f"{name} differs between runs"


def test_no_grad_pass_is_bitwise_repeatable(path):
    """The stats-only plan (vocabulary split across programs, then combine) is repeatable too."""
    problem = make_problem((3, 7), 40, 600, torch.float32, path[0], requires_grad=False, seed=4)
    with torch.no_grad():
        runs = [fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                               problem.token_weight, backend=path[1], return_stats=True)
                for _ in range(3)]
    for run in runs[1:]:
        for name in ("loss", "token_loss", "lse", "entropy", "is_top1"):
            assert torch.equal(getattr(run, name), getattr(runs[0], name)), name


def test_kernels_use_no_atomics():
    """Statement of docs/robustness.md: no kernel uses atomics, so results do not depend on scheduling."""
    sources = sorted(KERNELS.glob("*.py"))
    assert sources
    for source in sources:
        text = source.read_text()
        assert not re.search(r"\batomic_\w+|tl\.atomic", text), f"{source.name} uses atomics"
    backend = (KERNELS.parent / "backends" / "triton_chunks.py").read_text()
    # grad_weight accumulates through cuBLAS GEMMs in chunk order (deterministic for a fixed GPU and
    # workspace), not through atomics or index_add_/scatter_add_ (non-deterministic on CUDA)
    assert "matmul_into(dlogits.T, hidden[chunk], gradients.weight, accumulate=not first)" in backend
    assert not re.search(r"index_add_|scatter_add_|index_put_\(.*accumulate=True", backend)
