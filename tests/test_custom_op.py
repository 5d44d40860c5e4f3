"""The loss as torch.library custom ops: schema, fake and autograd registrations, and torch.compile.

``fused_wce::linear_cross_entropy`` (and its reduction="none" backward op) must look like any aten op to the
compiler: ``opcheck`` runs torch's own registration tests (schema, fake tensors, autograd, AOT dispatch with
dynamic shapes); a ``fullgraph=True`` compile must capture the loss as one node and not recompile when the
number of counted tokens changes (it is only known after the op's host synchronisation).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fused_wce
from fused_wce.custom_ops import _loss_backward_op, _loss_op
from helpers import make_problem

OPTIONS = {
    "mean": dict(reduction="mean"),
    "sum+normalizer": dict(reduction="sum", normalizer=torch.tensor(7.0)),
    "none": dict(reduction="none"),
    "variants": dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, softcap=20.0, logit_scale=0.7, dft=True),
    "lean": dict(reduction="mean", lean_memory=True),
    "bf16_compute": dict(reduction="mean", compute_dtype=torch.bfloat16),
}


def _op_arguments(problem, option: dict, device: str):
    """Positional tensors and keyword options of the forward op, as linear_cross_entropy passes them."""
    option = dict(option)
    normalizer = option.pop("normalizer", None)
    option.setdefault("compute_dtype", problem.hidden.dtype)
    keywords = dict(fused_wce.LossOptions(chunk_size=16, **option).op_kwargs(), grad_hidden=True, grad_weight=True,
                    grad_bias=True)
    tensors = (problem.hidden, problem.weight, problem.bias, problem.target, problem.token_weight,
               None if normalizer is None else normalizer.to(device))
    return tensors, keywords


@pytest.mark.parametrize("option", list(OPTIONS))
def test_opcheck_forward(device, option):
    problem = make_problem((24,), 16, 200, torch.float32, device, bias=True, seed=1)
    tensors, keywords = _op_arguments(problem, OPTIONS[option], device)
    torch.library.opcheck(_loss_op, tensors, keywords)


def test_opcheck_backward(device):
    problem = make_problem((24,), 16, 200, torch.float32, device, bias=True, seed=2)
    tensors, keywords = _op_arguments(problem, dict(reduction="none"), device)
    grad_output = torch.randn(24, device=device)
    # It is the backward of the forward op: once differentiable, so its inputs are plain (detached) tensors.
    detached = tuple(t.detach() for t in tensors[:5])
    torch.library.opcheck(_loss_backward_op, (*detached, grad_output), keywords)


def _loss_and_entropy(hidden, weight, target, token_weight, bias):
    out = fused_wce.linear_cross_entropy(hidden, weight, target, token_weight, bias=bias, return_stats=True,
                                         normalizer=torch.tensor(9.0), z_loss=1e-4)
    return out.loss * 2.0, out.entropy.sum()


def test_fullgraph_compile_is_one_node_without_recompiles(device):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_loss_and_entropy, fullgraph=True, backend=counter)
    counted = set()
    for seed in range(3):  # a different number of counted tokens each time
        problem = make_problem((4, 9), 32, 300, torch.float32, device, bias=True, seed=seed, ignore_fraction=0.3)
        counted.add(int(((problem.target != -100) & (problem.token_weight > 0)).sum()))
        inputs = (problem.hidden, problem.weight, problem.target, problem.token_weight, problem.bias)
        loss, entropy = compiled(*inputs)
        grads = torch.autograd.grad(loss, [problem.hidden, problem.weight, problem.bias])
        eager_loss, eager_entropy = _loss_and_entropy(*inputs)
        eager_grads = torch.autograd.grad(eager_loss, [problem.hidden, problem.weight, problem.bias])
        torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
        torch.testing.assert_close(entropy, eager_entropy)
        for grad, eager_grad in zip(grads, eager_grads):
            torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=0)
    assert len(counted) == 3, "the check needs three different counts"
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    ops = [node.target for graph in counter.graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert sum(op is torch.ops.fused_wce.linear_cross_entropy.default for op in ops) == 1, ops


def test_compiled_reduction_none_runs_the_backward_op(device):
    problem = make_problem((20,), 16, 150, torch.float32, device, seed=4)

    def per_token(hidden, weight, target, token_weight):
        return fused_wce.linear_cross_entropy(hidden, weight, target, token_weight, reduction="none")

    compiled = torch.compile(per_token, fullgraph=True, backend="aot_eager")
    upstream = torch.rand(20, device=device)
    args = (problem.hidden, problem.weight, problem.target, problem.token_weight)
    grads = torch.autograd.grad(compiled(*args), [problem.hidden, problem.weight], upstream)
    eager = torch.autograd.grad(per_token(*args), [problem.hidden, problem.weight], upstream)
    for grad, eager_grad in zip(grads, eager):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=0)


def test_reduce_overhead_compiles_and_runs(device):
    """``mode="reduce-overhead"`` (CUDA graphs): the ops synchronise with the host, so they are tagged
    cudagraph_unsafe and the graph is partitioned around them (or not captured); results equal eager."""
    compiled = torch.compile(_loss_and_entropy, mode="reduce-overhead")
    if hasattr(torch.Tag, "cudagraph_unsafe"):
        assert torch.Tag.cudagraph_unsafe in torch.ops.fused_wce.linear_cross_entropy.default.tags
        assert torch.Tag.cudagraph_unsafe in torch.ops.fused_wce.linear_cross_entropy_backward.default.tags
    for seed in range(3):  # a different number of counted tokens each time
        problem = make_problem((3, 8), 16, 120, torch.float32, device, bias=True, seed=seed, ignore_fraction=0.3)
        inputs = (problem.hidden, problem.weight, problem.target, problem.token_weight, problem.bias)
        loss, entropy = compiled(*inputs)
        grads = torch.autograd.grad(loss, [problem.hidden, problem.weight, problem.bias])
        eager_loss, eager_entropy = _loss_and_entropy(*inputs)
        eager_grads = torch.autograd.grad(eager_loss, [problem.hidden, problem.weight, problem.bias])
        torch.testing.assert_close(loss, eager_loss)
        torch.testing.assert_close(entropy, eager_entropy)
        for grad, eager_grad in zip(grads, eager_grads):
            torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-7)
