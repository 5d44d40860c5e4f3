"""compute_dtype (fp32 master weights, bf16 matmuls) and lean_memory (vocabulary-slab weight gradients).

Both change where and in which dtype the gradients are formed, never the loss: each is checked against the
float64 reference with torch's same-dtype error as the yardstick, and for the memory it saves with a
peak-live-bytes recorder that sees inside the custom op.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fused_wce
from helpers import assert_close, make_problem, torch_eager_same_dtype
from test_linear_cross_entropy import check_against_reference
from test_memory_bound import LiveBytes

VARIANTS = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, logit_scale=0.7, dft=True)


@pytest.fixture
def path(every_plan_path):
    """Every execution path, and both logits plans of the Triton path."""
    return every_plan_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lean_memory_matches_reference(path, dtype, reduction, poison):
    # chunk_size 16 of 40 counted tokens sets the slab width to ~400 of V = 1000: several slabs, one partial.
    problem = make_problem((3, 17), 96, 1000, dtype, path[0], bias=True)
    check_against_reference(problem, path, dtype, reduction=reduction, chunk_size=16, lean_memory=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lean_memory_with_every_variant(path, dtype, poison):
    problem = make_problem((2, 15), 64, 700, dtype, path[0], bias=True, seed=5)
    check_against_reference(problem, path, dtype, chunk_size=8, lean_memory=True, **VARIANTS)


def test_lean_memory_writes_the_weight_gradient_in_its_dtype(path):
    problem = make_problem((30,), 32, 500, torch.bfloat16, path[0], seed=6)
    lean = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                          backend=path[1], chunk_size=8, lean_memory=True)
    grad_weight, = torch.autograd.grad(lean, [problem.weight])
    default = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                             backend=path[1], chunk_size=8)
    default_grad_weight, = torch.autograd.grad(default, [problem.weight])
    assert grad_weight.dtype == torch.bfloat16
    torch.testing.assert_close(lean, default)
    # both round an fp32 sum to bf16 once; they may differ by one bf16 step where the sums differ in order
    torch.testing.assert_close(grad_weight.float(), default_grad_weight.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("how", ["compute_dtype", "autocast"])
def test_fp32_master_weights_with_bf16_matmuls(path, how):
    """fp32 hidden and weight, bf16 matmuls: fp32 gradients, as accurate as torch's own bf16 computation."""
    problem = make_problem((3, 13), 64, 600, torch.float32, path[0], bias=True, seed=7)
    kwargs = dict(bias=problem.bias, backend=path[1], chunk_size=16, return_stats=True)
    if how == "compute_dtype":
        out = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                             compute_dtype=torch.bfloat16, **kwargs)
    else:
        with torch.autocast(path[0], dtype=torch.bfloat16):
            out = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                 problem.token_weight, **kwargs)
    grads = torch.autograd.grad(out.loss, [problem.hidden, problem.weight, problem.bias])
    assert all(g.dtype == torch.float32 for g in grads)

    # the same as running on bf16 copies of the inputs (bf16 is what the matmuls see), up to bf16 output rounding
    bf16 = dataclasses.replace(problem, hidden=problem.hidden.detach().bfloat16().requires_grad_(),
                               weight=problem.weight.detach().bfloat16().requires_grad_(),
                               bias=problem.bias.detach().bfloat16().requires_grad_())
    reference = fused_wce.reference_linear_cross_entropy(bf16.hidden, bf16.weight, bf16.target, bf16.token_weight,
                                                         bias=bf16.bias)
    eager = torch_eager_same_dtype(bf16)
    assert_close(out.loss, reference, eager, torch.bfloat16, "loss")
    ref_grads = torch.autograd.grad(reference, [bf16.hidden, bf16.weight, bf16.bias])
    eager_grads = torch.autograd.grad(eager, [bf16.hidden, bf16.weight, bf16.bias])
    for name, grad, ref_grad, eager_grad in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads,
                                                eager_grads):
        assert_close(grad, ref_grad, eager_grad, torch.bfloat16, name)


def test_compute_dtype_is_checked():
    problem = make_problem((4,), 8, 20, torch.float32)
    with pytest.raises(TypeError, match="compute_dtype"):
        fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, compute_dtype=torch.float64)
    with pytest.raises(TypeError, match="weight.dtype"):  # mixed dtypes need a compute dtype
        fused_wce.linear_cross_entropy(problem.hidden, problem.weight.bfloat16(), problem.target)
    with pytest.raises(TypeError, match="lean_memory"):
        fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, lean_memory=1)


def _peak_bytes(problem, path, **kwargs) -> int:
    live = LiveBytes()
    with live:
        loss = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                              backend=path[1], chunk_size=4, **kwargs)
        loss.backward()
        del loss
    return live.peak


# Upper bounds of the peak live bytes of the Triton path (the GPU plan), in units of V * H bytes, for a
# problem where V * H dominates: bf16 weights hold an fp32 accumulator (4) and its bf16 copy for .grad (2), in
# lean mode only the bf16 gradient (2); fp32 master weights with bf16 matmuls hold their fp32 gradient (4) and
# the bf16 weight copy (2) that an F.linear under autocast keeps too, and no second fp32 [V, H].
TRITON_PEAK_BOUNDS = {"default": 6, "lean": 2, "master": 6, "master_lean": 6}


def test_weight_gradient_memory(path, monkeypatch):
    vocab, hidden = 2048, 64
    # The PyTorch path's lean mode accumulates each vocabulary block's [B, H] rows in fp32: a budget that makes a
    # block an eighth of the vocabulary (at this small V * H the default budget would cover all of it).
    for budget in ("CPU_CHUNK_BUDGET_BYTES", "DEFAULT_CHUNK_BUDGET_BYTES"):  # (the PyTorch path on CUDA: DEFAULT)
        monkeypatch.setattr(fused_wce.budget, budget, 4 * 256 * (8 * 4 + 4 * hidden))
    vh = vocab * hidden
    # chunk and slab buffers (the interpreter's 256-wide vocabulary tiles make a slab [M, 256]), a slab's fp32
    # [S, H] GEMM output (0.5 V * H for S = 256 here), the CPU emulation's fp32 upcast blocks of the GEMM
    # operands, [N, H] and [N] vectors: ~1.5 V * H at this small V * H, well below the 4 V * H any extra fp32
    # [V, H] would add
    small_terms = 1.75 * vh
    bf16 = make_problem((96,), hidden, vocab, torch.bfloat16, path[0], seed=8)
    master = make_problem((96,), hidden, vocab, torch.float32, path[0], seed=8)
    peaks = {
        "default": _peak_bytes(bf16, path),
        "lean": _peak_bytes(bf16, path, lean_memory=True),
        "master": _peak_bytes(master, path, compute_dtype=torch.bfloat16),
        "master_lean": _peak_bytes(master, path, compute_dtype=torch.bfloat16, lean_memory=True),
    }
    in_vh = {name: round(peak / vh, 2) for name, peak in peaks.items()}
    assert peaks["default"] >= 6 * vh, in_vh  # the fp32 accumulator and the copy really exist by default
    if path[1] == "triton":
        for name, bound in TRITON_PEAK_BOUNDS.items():
            assert peaks[name] <= bound * vh + small_terms, (name, in_vh)
    else:
        # The CPU path computes in fp32 from an fp32 copy of the weight (4): lean saves the accumulator only
        # while that copy is alive (the bf16 .grad copy comes after it is freed).
        assert peaks["lean"] <= peaks["default"] - 1.5 * vh, in_vh
