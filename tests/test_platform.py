"""What differs between machines and must not change the results: the TF32 setting's two APIs, GEMMs with
fp32 output from half-precision operands (or their fallback), the current CUDA device, and fp16's range."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fused_wce
from helpers import assert_close, make_problem, torch_eager_same_dtype


@pytest.mark.parametrize("setting, expected", [
    ("torch.backends.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
    ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32"),
    ("torch.backends.cuda.matmul.allow_tf32 = False", "ieee"),
    ("torch.set_float32_matmul_precision('high')", "tf32"),
    ("pass", "ieee"),
])
def test_fp32_dot_precision_follows_either_tf32_api(setting, expected):
    """Once the newer ``fp32_precision`` API is used, reading the legacy ``allow_tf32`` flag raises; the
    kernels' precision must follow whichever API the user set (in a fresh process: the setting is global)."""
    code = textwrap.dedent(f"""
        import torch
        from fused_wce.kernels.configs import KernelConfig
        {setting}
        print(KernelConfig.dot_precision(torch.float32), KernelConfig.dot_precision(torch.bfloat16))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [expected, "tf32"]


def test_fp32_output_gemm_fallback_gives_the_same_loss(path, monkeypatch):
    """Where torch's fp32-output GEMM from bf16 operands is missing (ROCm, older builds), the product is formed
    in bf16 and added into the fp32 accumulator: still within bf16 tolerance of the float64 reference."""
    if path[1] != "triton":
        pytest.skip("the PyTorch path multiplies in fp32")
    import fused_wce.backends.gemm as gemm

    monkeypatch.setattr(gemm, "fp32_output_mode", lambda a: "fallback")
    problem = make_problem((3, 11), 64, 500, torch.bfloat16, path[0], bias=True, seed=11)
    loss = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                          bias=problem.bias, backend=path[1], chunk_size=8)
    grads = torch.autograd.grad(loss, [problem.hidden, problem.weight, problem.bias])
    reference = fused_wce.reference_linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                         problem.token_weight, bias=problem.bias)
    eager = torch_eager_same_dtype(problem)
    assert_close(loss, reference, eager, torch.bfloat16, "loss")
    ref_grads = torch.autograd.grad(reference, [problem.hidden, problem.weight, problem.bias])
    eager_grads = torch.autograd.grad(eager, [problem.hidden, problem.weight, problem.bias])
    for name, grad, ref_grad, eager_grad in zip(("hidden", "weight", "bias"), grads, ref_grads, eager_grads):
        assert_close(grad, ref_grad, eager_grad, torch.bfloat16, f"grad_{name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_output_gemm_is_used_on_cuda():
    from fused_wce.backends.gemm import fp32_output_mode

    a = torch.ones(4, 4, dtype=torch.bfloat16, device="cuda")
    assert fp32_output_mode(a) == ("fallback" if torch.version.hip else "out_dtype")


@pytest.mark.parametrize("scaler", [1024.0, 65536.0])
def test_fp16_gradients_survive_large_normalizers(path, scaler):
    """A mean over ~16k tokens makes each token's gradient coefficient ~6e-5, at the bottom of fp16's range:
    dlogits stored in fp16 would underflow (p ~ 5e-4 times 6e-5 is below fp16's smallest subnormal) before the
    gradient scaler's factor on the loss reaches them, as fp16 training needs it to. The gradients of hidden
    and weight stay within fp16's tolerance of the float64 reference."""
    problem = make_problem((40,), 64, 2000, torch.float16, path[0], seed=12, ignore_fraction=0.0,
                           zero_weight_fraction=0.0)
    normalizer = 16384.0
    loss = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                          reduction="sum", normalizer=normalizer, backend=path[1], chunk_size=16)
    grads = torch.autograd.grad(loss * scaler, [problem.hidden, problem.weight])
    reference = fused_wce.reference_linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                         problem.token_weight, reduction="sum",
                                                         normalizer=normalizer)
    ref_grads = torch.autograd.grad(reference * scaler, [problem.hidden, problem.weight])
    for name, grad, ref_grad in zip(("hidden", "weight"), grads, ref_grads):
        assert torch.count_nonzero(grad) > 0.9 * grad.numel(), f"grad_{name}: most entries flushed to zero"
        assert_close(grad.float() / scaler, ref_grad / scaler, None, torch.float16, f"grad_{name}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_tensors_device_not_the_current_one():
    """With a head on cuda:1 (device_map) and cuda:0 current, the kernels must launch on cuda:1."""
    problem = make_problem((2, 9), 64, 300, torch.bfloat16, "cuda:1", bias=True, seed=13)
    with torch.cuda.device(0):
        loss = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                              bias=problem.bias)
        grads = torch.autograd.grad(loss, [problem.hidden, problem.weight, problem.bias])
    with torch.cuda.device(1):
        expected = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                  problem.token_weight, bias=problem.bias)
        expected_grads = torch.autograd.grad(expected, [problem.hidden, problem.weight, problem.bias])
    assert loss.device == torch.device("cuda:1")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
