"""Loss variants (label smoothing, z-loss, softcap, logit scale, DFT) on every path against the reference."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import fused_wce
from conftest import INTERPRETING
from fused_wce.kernels.vocab_partials import tanh as kernel_tanh
from helpers import make_problem
from test_linear_cross_entropy import check_against_reference

ALONE = {
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=4.0),
    "logit_scale": dict(logit_scale=0.7),
    "dft": dict(dft=True),
}
COMBINED = {
    "smoothing+z_loss": dict(label_smoothing=0.2, z_loss=1e-2),
    "scale+softcap": dict(logit_scale=1.3, softcap=5.0),
    "all": dict(label_smoothing=0.05, z_loss=1e-3, softcap=6.0, logit_scale=0.8, dft=True),
}
ALL = {**ALONE, **COMBINED}


@pytest.fixture
def path(every_plan_path):
    """Every execution path, and both logits plans of the Triton path."""
    return every_plan_path


@pytest.mark.parametrize("variant", list(ALL), ids=list(ALL))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_variant_fp32(path, variant, reduction, poison):
    problem = make_problem((3, 13), 96, 1000, torch.float32, path[0], bias=True)
    out = check_against_reference(problem, path, torch.float32, reduction=reduction, chunk_size=16, **ALL[variant])
    assert (out.z_loss is not None) == ("z_loss" in ALL[variant])


@pytest.mark.parametrize("variant", ["softcap", "all"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_variant_half_precision(path, variant, dtype, poison):
    problem = make_problem((2, 11), 96, 1000, dtype, path[0])
    check_against_reference(problem, path, dtype, reduction="sum", chunk_size=8, **ALL[variant])


def test_variants_with_normalizer_and_no_grad(path, poison):
    problem = make_problem((4, 7), 64, 500, torch.float32, path[0])
    check_against_reference(problem, path, torch.float32, normalizer=9.0, **COMBINED["all"])
    with torch.no_grad():
        out = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                             return_stats=True, backend=path[1], **COMBINED["all"])
    ref = fused_wce.reference_linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                   problem.token_weight, return_stats=True, **COMBINED["all"])
    torch.testing.assert_close(out.token_loss, ref.token_loss.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.z_loss, ref.z_loss.float(), rtol=1e-4, atol=1e-6)


@pytest.fixture
def cublas_statistics_pass(path, monkeypatch):
    """For the Triton path: counts the statistics-only passes that ran through cuBLAS logits."""
    if path[1] != "triton" or len(path) == 3:
        pytest.skip("the Triton path's default logits plan: logits_gemm='cublas' changes only its statistics pass")
    import fused_wce.backends.triton_chunks as triton_chunks

    calls = []
    original = triton_chunks._cublas_stats_pass

    def counted(*args, **kwargs):
        calls.append(args[0].num_tokens)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_chunks, "_cublas_stats_pass", counted)
    return calls


@pytest.mark.parametrize("variant", ["plain", *ALL], ids=["plain", *ALL])
def test_statistics_pass_through_cublas(path, variant, cublas_statistics_pass, poison):
    """logits_gemm="cublas": the statistics-only pass (reduction="none"'s forward, a no-grad call) runs on cuBLAS
    fp32 logits and logit_rows; its outputs and the gradients after it match the reference in every variant."""
    options = {} if variant == "plain" else ALL[variant]
    problem = make_problem((3, 13), 96, 1000, torch.float32, path[0], bias=True)
    check_against_reference(problem, path, torch.float32, reduction="none", chunk_size=16, logits_gemm="cublas",
                            **options)
    assert len(cublas_statistics_pass) == 1
    with torch.no_grad():
        out = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, problem.token_weight,
                                             bias=problem.bias, return_stats=True, backend=path[1], chunk_size=16,
                                             logits_gemm="cublas", **options)
    assert len(cublas_statistics_pass) == 2
    ref = fused_wce.reference_linear_cross_entropy(problem.hidden, problem.weight, problem.target,
                                                   problem.token_weight, bias=problem.bias, return_stats=True,
                                                   **options)
    for name in ("loss", "token_loss", "lse", "entropy"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_statistics_pass_through_cublas_half_precision(path, dtype, cublas_statistics_pass, poison):
    problem = make_problem((2, 11), 96, 1000, dtype, path[0])
    check_against_reference(problem, path, dtype, reduction="none", chunk_size=8, logits_gemm="cublas",
                            **ALL["all"])
    assert len(cublas_statistics_pass) == 1


def test_softcap_bounds_logits(path):
    """With a softcap every logit is in (-cap, cap), so lse <= cap + log V whatever the hidden states."""
    problem = make_problem((2, 5), 32, 200, torch.float32, path[0], logit_scale=1000.0)
    out = fused_wce.linear_cross_entropy(problem.hidden, problem.weight, problem.target, softcap=2.0,
                                         return_stats=True, backend=path[1])
    counted = problem.target != -100
    assert (out.lse[counted] <= 2.0 + torch.log(torch.tensor(200.0)) + 1e-4).all()
    assert torch.isfinite(out.loss)


BAD = [
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(z_loss=float("inf")), ValueError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-30.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(logit_scale=0.0), ValueError, "logit_scale"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    (dict(logit_scale="2"), TypeError, "logit_scale"),
    (dict(dft=1), TypeError, "dft"),
]


@pytest.mark.parametrize("options, error, name", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_variant_values(options, error, name):
    with pytest.raises(error, match=name):
        fused_wce.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,)), **options)


@triton.jit
def _apply_kernel_tanh(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, kernel_tanh(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


@pytest.mark.skipif(not INTERPRETING, reason="runs the kernel's tanh on host memory under the interpreter")
def test_kernel_tanh_is_accurate_for_small_and_large_arguments():
    """The softcap's tanh: within 4 fp32 ulp of float64 tanh, from tiny arguments (where 1 - exp(-2|x|)
    would cancel) through the switch at 0.25 to saturation."""
    magnitudes = torch.cat([torch.logspace(-7, 1.5, 400), torch.linspace(0.2, 0.3, 101)])
    x = torch.cat([magnitudes, -magnitudes]).float()
    y = torch.empty_like(x)
    _apply_kernel_tanh[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    exact = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    worst = ((y.double() - exact).abs() / ulp).max().item()
    assert worst <= 4.0, f"tanh off by {worst:.1f} ulp"
