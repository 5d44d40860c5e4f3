"""Property tests (hypothesis) of the CPU path against the float64 reference: random shapes, weights, ignore
patterns, reductions, normalizers, chunk sizes, bias, ignore_index; plus invariances that must hold exactly."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

import fused_wce

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def problems(draw):
    batch = draw(st.lists(st.integers(0, 6), min_size=1, max_size=2))
    hidden_size = draw(st.integers(1, 48))
    vocab_size = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logit_scale = draw(st.sampled_from([0.1, 1.0, 4.0, 20.0]))
    hidden = torch.randn(*batch, hidden_size, generator=g)
    weight = torch.randn(vocab_size, hidden_size, generator=g) * (logit_scale / hidden_size**0.5)
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    target = torch.randint(0, vocab_size, batch, generator=g)
    target[torch.rand(batch, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = ignore_index
    weights = draw(st.sampled_from(["none", "uniform", "integers", "sparse", "wide"]))
    if weights == "none":
        token_weight = None
    elif weights == "uniform":
        token_weight = torch.rand(batch, generator=g)
    elif weights == "integers":
        token_weight = torch.randint(0, 4, batch, generator=g).float()
    elif weights == "sparse":
        token_weight = torch.rand(batch, generator=g) * (torch.rand(batch, generator=g) < 0.3)
    else:  # weights spanning many orders of magnitude
        token_weight = 10.0 ** (torch.rand(batch, generator=g) * 8 - 4)
    bias = torch.randn(vocab_size, generator=g) if draw(st.booleans()) else None
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    normalizer = None
    if reduction != "none" and draw(st.booleans()):
        normalizer = draw(st.floats(0.1, 100.0))
    chunk_size = draw(st.one_of(st.none(), st.integers(1, 13)))
    return dict(hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), target=target,
                token_weight=token_weight, bias=None if bias is None else bias.requires_grad_(),
                ignore_index=ignore_index, reduction=reduction, normalizer=normalizer), chunk_size


def _differentiable(args):
    return [t for t in (args["hidden"], args["weight"], args["bias"]) if t is not None]


def _close(actual, expected, name, args):
    expected = expected.double()
    error = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    # fp32 math over H and V; a weighted mean over weights spanning 8 decades loses no more than that
    assert error <= 5e-5 * max(scale, 1e-3), f"{name}: error {error:.3g}, scale {scale:.3g}"


@SETTINGS
@given(problems())
def test_cpu_path_matches_reference(case):
    args, chunk_size = case
    out = fused_wce.linear_cross_entropy(**args, chunk_size=chunk_size, backend="torch", return_stats=True)
    ref = fused_wce.reference_linear_cross_entropy(**args, return_stats=True)
    assert out.loss.dtype == torch.float32 and out.loss.shape == ref.loss.shape
    assert torch.isfinite(out.loss).all()
    _close(out.loss, ref.loss, "loss", args)
    for name in ("token_loss", "lse", "entropy"):
        _close(getattr(out, name), getattr(ref, name), name, args)
    inputs = _differentiable(args)
    upstream = torch.rand(ref.loss.shape, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(out.loss, inputs, upstream.float(), allow_unused=True)
    ref_grads = torch.autograd.grad(ref.loss, inputs, upstream, allow_unused=True)
    for name, grad, ref_grad in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        assert grad is not None and torch.isfinite(grad).all(), name
        _close(grad, ref_grad if ref_grad is not None else torch.zeros_like(grad), name, args)


@SETTINGS
@given(problems(), st.floats(0.01, 100.0))
def test_invariances(case, scale):
    """Exact or near-exact identities of the semantics:
    - rows that do not count are never read (changing them changes nothing, bitwise);
    - "none" sums to "sum"; "sum" / sum(w) is "mean"; normalizer = sum(w) is "mean";
    - scaling every weight leaves "mean" unchanged and scales "sum"."""
    args, chunk_size = case
    args = {**args, "reduction": "none", "normalizer": None}
    run = lambda **kw: fused_wce.linear_cross_entropy(**{**args, **kw}, chunk_size=chunk_size,  # noqa: E731
                                                       backend="torch").detach()
    per_token = run()
    token_weight = args["token_weight"]
    weight_or_one = torch.ones(args["target"].shape) if token_weight is None else token_weight
    counted = (args["target"] != args["ignore_index"]) & (weight_or_one > 0)

    garbage = args["hidden"].detach().clone()
    garbage[~counted] = float("nan")
    assert torch.equal(run(hidden=garbage), per_token)

    total = run(reduction="sum")
    assert torch.allclose(per_token.sum(), total, rtol=1e-5, atol=1e-6)
    weight_sum = weight_or_one[counted].sum()
    mean = run(reduction="mean")
    if counted.any():
        assert torch.allclose(mean, total / weight_sum, rtol=1e-5, atol=1e-7)
        assert torch.allclose(run(reduction="sum", normalizer=float(weight_sum)), mean, rtol=1e-5, atol=1e-7)
    else:
        assert mean.item() == 0.0 and total.item() == 0.0
    scaled = weight_or_one * scale
    assert torch.allclose(run(reduction="mean", token_weight=scaled), mean, rtol=1e-5, atol=1e-7)
    assert torch.allclose(run(reduction="sum", token_weight=scaled), total * scale, rtol=1e-5, atol=1e-6)
