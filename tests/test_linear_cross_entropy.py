"""linear_cross_entropy on every path (CPU torch, Triton interpreted/compiled) against the float64 reference."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fused_wce
from helpers import assert_close, make_problem, torch_eager_same_dtype

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]


@pytest.fixture
def path(every_plan_path):
    """Every execution path, and both logits plans of the Triton path."""
    return every_plan_path


def _run(problem, path, **kwargs):
    device, backend = path[:2]
    return fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                          bias=problem.bias, backend=backend, **kwargs)


def _grads(loss, problem, upstream):
    inputs = [t for t in (problem.hidden, problem.weight, problem.bias) if t is not None]
    return torch.autograd.grad(loss, inputs, upstream)


def check_against_reference(problem, path, dtype, *, reduction="mean", factor=2.0, **kwargs):
    """Loss, stats and gradients of ``path`` against the float64 reference, with torch's same-dtype error as
    the yardstick."""
    out = _run(problem, path, reduction=reduction, return_stats=True, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("chunk_size", "lean_memory", "logits_gemm")}
    ref = fused_wce.reference_linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                   problem.token_weight, bias=problem.bias, reduction=reduction,
                                                   return_stats=True, **ref_kwargs)
    eager = torch_eager_same_dtype(problem, reduction=reduction, return_stats=True, **ref_kwargs)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ref.loss.shape
    assert torch.isfinite(out.loss).all()
    assert_close(out.loss, ref.loss, eager.loss, dtype, "loss", factor)
    for name in ("token_loss", "lse", "entropy"):
        assert_close(getattr(out, name), getattr(ref, name), getattr(eager, name), dtype, name, factor)
    # top-1 may differ from the float64 reference only on near-ties the input rounding can flip.
    mismatch = out.is_top1 != ref.is_top1
    if mismatch.any():
        logits = problem.hidden.double() @ problem.weight.double().T
        if problem.bias is not None:
            logits = logits + problem.bias.double()
        safe_target = problem.target.clamp_min(0)
        gap = logits.amax(-1) - logits.gather(-1, safe_target[..., None]).squeeze(-1)
        assert (gap[mismatch] < 1e-3 * logits.abs().amax()).all(), "is_top1 differs beyond near-ties"

    upstream = torch.randn(ref.loss.shape, dtype=torch.float64) if reduction == "none" else \
        torch.tensor(0.75, dtype=torch.float64)
    grads = _grads(out.loss, problem, upstream.float().to(out.loss.device))
    ref_grads = _grads(ref.loss, problem, upstream.to(ref.loss.device))
    eager_grads = _grads(eager.loss, problem, upstream.float().to(out.loss.device))
    names = ["grad_hidden", "grad_weight", "grad_bias"]
    for name, grad, ref_grad, eager_grad in zip(names, grads, ref_grads, eager_grads):
        assert grad.dtype == dtype, name
        assert_close(grad, ref_grad, eager_grad, dtype, name, factor)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_matches_reference(path, dtype, reduction, bias, poison):
    # V and H are multiples of no block size; 3-D hidden; several chunks, the last one partial.
    if path[:2] == ("cpu", "triton") and (DTYPES.index(dtype) + REDUCTIONS.index(reduction) + bias) % 2 != (len(path) == 3):
        # The interpreter (~4 s a case) runs half of the 18 for each logits plan, the other half for the other:
        # every (dtype, reduction), (dtype, bias) and (reduction, bias) pair still occurs in each; both plans
        # together cover the product; the CPU path and the GPU run the full product.
        pytest.skip("interpreter: pairwise subset of dtype x reduction x bias")
    problem = make_problem((3, 17), 96, 1000, dtype, path[0], bias=bias)
    check_against_reference(problem, path, dtype, reduction=reduction, chunk_size=16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_token(path, dtype, poison):
    problem = make_problem((1,), 96, 1000, dtype, path[0], ignore_fraction=0.0, zero_weight_fraction=0.0)
    check_against_reference(problem, path, dtype)


def test_custom_ignore_index_and_unweighted(path, poison):
    problem = make_problem((2, 20), 40, 300, torch.float32, path[0], ignore_index=-1, weighted=False,
                           ignore_fraction=0.3)
    out = check_against_reference(problem, path, torch.float32, ignore_index=-1, chunk_size=7)
    assert (out.lse[problem.target == -1] == 0).all()


@pytest.mark.parametrize("normalizer", [7.5, "tensor"])
def test_normalizer(path, normalizer, poison):
    problem = make_problem((4, 9), 64, 500, torch.float32, path[0], bias=True)
    if normalizer == "tensor":
        normalizer = torch.tensor(11.25, device=path[0])
    check_against_reference(problem, path, torch.float32, reduction="sum", normalizer=normalizer)
    check_against_reference(problem, path, torch.float32, reduction="mean", normalizer=normalizer)


def test_default_chunk_size_and_no_grad(path, poison):
    """With no gradient wanted the Triton path runs its stats-only kernel; values must not change."""
    problem = make_problem((5, 13), 96, 1000, torch.float32, path[0], requires_grad=False)
    with torch.no_grad():
        out = _run(problem, path, return_stats=True)
    ref = fused_wce.reference_linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                   problem.token_weight, return_stats=True)
    for name in ("loss", "token_loss", "lse", "entropy"):
        assert_close(getattr(out, name), getattr(ref, name), None, torch.float32, name)
    assert torch.equal(out.is_top1, ref.is_top1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nothing_counted_is_zero_and_connected(path, reduction):
    problem = make_problem((2, 5), 32, 100, torch.float32, path[0])
    problem.target.fill_(-100)
    loss = _run(problem, path, reduction=reduction)
    assert torch.count_nonzero(loss) == 0 and loss.requires_grad
    grads = _grads(loss.sum(), problem, None)
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    # all weights zero: the same
    problem = make_problem((2, 5), 32, 100, torch.float32, path[0])
    problem.token_weight.zero_()
    loss = _run(problem, path, reduction=reduction)
    assert torch.count_nonzero(loss) == 0 and not torch.isnan(loss).any()


def test_empty_input(path):
    problem = make_problem((0,), 32, 100, torch.float32, path[0])
    loss = _run(problem, path)
    assert loss.item() == 0.0
    loss.backward()
    assert problem.hidden.grad.shape == (0, 32) and torch.count_nonzero(problem.weight.grad) == 0


def test_int32_targets_and_module(path):
    problem = make_problem((3, 11), 48, 400, torch.float32, path[0])
    module = fused_wce.LinearCrossEntropy(reduction="sum", chunk_size=8, backend=path[1])
    loss = module(problem.hidden, problem.weight, problem.target.int(), problem.token_weight)
    ref = fused_wce.reference_linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                   problem.token_weight, reduction="sum")
    assert_close(loss, ref, None, torch.float32, "loss")
    assert "reduction='sum'" in repr(module)


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_inputs_get_no_gradient_work(path, frozen, monkeypatch):
    """A frozen head (LoRA) launches no grad_weight GEMM; a frozen hidden no grad_hidden GEMM."""
    problem = make_problem((4, 10), 48, 400, torch.float32, path[0], bias=True)
    getattr(problem, frozen).requires_grad_(False)
    calls = []
    if path[1] == "triton":
        import fused_wce.backends.triton_chunks as backend

        real_matmul = backend.matmul_into

        def recording_matmul(a, b, out, **kwargs):  # which gradient each cuBLAS GEMM writes
            if tuple(out.shape) == tuple(problem.weight.shape):
                calls.append("grad_weight")
            elif out.shape[1] == problem.hidden.shape[-1]:
                calls.append("grad_hidden")  # (the cuBLAS plan's logits GEMM writes [C, V]: not a gradient)
            return real_matmul(a, b, out, **kwargs)

        monkeypatch.setattr(backend, "matmul_into", recording_matmul)
    loss = _run(problem, path, chunk_size=16)
    loss.backward()
    frozen_tensor = getattr(problem, frozen)
    assert frozen_tensor.grad is None
    other = problem.hidden if frozen == "weight" else problem.weight
    assert other.grad is not None and torch.count_nonzero(other.grad) > 0
    assert problem.bias.grad is not None
    if path[1] == "triton":
        assert calls, "expected GEMM launches"
        assert set(calls) == {"grad_hidden" if frozen == "weight" else "grad_weight"}


def test_autocast_casts_like_linear(path):
    """Mixed precision: fp32 master weights and hidden states under autocast(bf16) compute in bf16 and
    return fp32 gradients, as F.linear + cross_entropy would."""
    problem = make_problem((2, 9), 64, 300, torch.float32, path[0])
    with torch.autocast(path[0], dtype=torch.bfloat16):
        loss = _run(problem, path)
    loss.backward()
    assert problem.weight.grad.dtype == torch.float32 and problem.hidden.grad.dtype == torch.float32
    bf16 = dataclasses.replace(problem, hidden=problem.hidden.detach().bfloat16(),
                               weight=problem.weight.detach().bfloat16())
    expected = _run(bf16, path)
    torch.testing.assert_close(loss, expected)
