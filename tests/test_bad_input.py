"""Bad input: a TypeError/ValueError naming the argument, raised before any kernel launches."""
from __future__ import annotations

import pytest
import torch

import fused_wce

N, H, V = 6, 16, 50


def good(**overrides):
    args = dict(hidden=torch.randn(2, 3, H), weight=torch.randn(V, H), target=torch.randint(0, V, (2, 3)),
                token_weight=torch.rand(2, 3))
    args.update(overrides)
    return args


CASES = [
    # (name, overrides, keyword options, exception, message fragment)
    ("hidden not a tensor", dict(hidden=[[1.0] * H]), {}, TypeError, "hidden"),
    ("hidden int", dict(hidden=torch.ones(2, 3, H, dtype=torch.int64)), {}, TypeError, "hidden"),
    ("hidden 0-d", dict(hidden=torch.tensor(1.0), target=torch.tensor(1), token_weight=None), {}, ValueError,
     "hidden"),
    ("weight 1-d", dict(weight=torch.randn(V * H)), {}, ValueError, "weight"),
    ("weight dtype", dict(weight=torch.randn(V, H, dtype=torch.float64)), {}, TypeError, "weight.dtype"),
    ("hidden size", dict(weight=torch.randn(V, H + 1)), {}, ValueError, "weight.shape[1]"),
    ("target float", dict(target=torch.zeros(2, 3)), {}, TypeError, "target"),
    ("target shape", dict(target=torch.zeros(6, dtype=torch.long)), {}, ValueError, "target shape"),
    ("target too large", dict(target=torch.full((2, 3), V)), {}, ValueError, "target"),
    ("target negative", dict(target=torch.full((2, 3), -5)), {}, ValueError, "target"),
    ("weight int", dict(token_weight=torch.ones(2, 3, dtype=torch.long)), {}, TypeError, "token_weight"),
    ("weight shape", dict(token_weight=torch.ones(6)), {}, ValueError, "token_weight shape"),
    ("weight negative", dict(token_weight=-torch.ones(2, 3)), {}, ValueError, "token_weight"),
    ("weight nan", dict(token_weight=torch.full((2, 3), float("nan"))), {}, ValueError, "token_weight"),
    ("weight inf", dict(token_weight=torch.full((2, 3), float("inf"))), {}, ValueError, "token_weight"),
    ("bias shape", {}, dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    ("bias dtype", {}, dict(bias=torch.randn(V, dtype=torch.float64)), TypeError, "bias.dtype"),
    ("reduction", {}, dict(reduction="avg"), ValueError, "reduction"),
    ("chunk_size 0", {}, dict(chunk_size=0), ValueError, "chunk_size"),
    ("chunk_size float", {}, dict(chunk_size=2.0), TypeError, "chunk_size"),
    ("normalizer 0", {}, dict(normalizer=0.0), ValueError, "normalizer"),
    ("normalizer nan", {}, dict(normalizer=float("nan")), ValueError, "normalizer"),
    ("normalizer tensor 0", {}, dict(normalizer=torch.tensor(0.0)), ValueError, "normalizer"),
    ("normalizer 1-d", {}, dict(normalizer=torch.ones(2)), ValueError, "normalizer"),
    ("normalizer str", {}, dict(normalizer="1"), TypeError, "normalizer"),
    ("normalizer with none", {}, dict(normalizer=2.0, reduction="none"), ValueError, "normalizer"),
    ("ignore_index float", {}, dict(ignore_index=1.5), TypeError, "ignore_index"),
    ("backend", {}, dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("name, overrides, options, error, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named(name, overrides, options, error, fragment, monkeypatch):
    import fused_wce.backends.torch_blocks as backend

    def no_launch(request):
        raise AssertionError("a pass ran before the bad input was rejected")

    monkeypatch.setattr(backend, "run_pass", no_launch)
    args = good(**overrides)
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        fused_wce.linear_cross_entropy(args["hidden"], args["weight"], args["target"], args["token_weight"],
                                       **options)


def test_out_of_range_target_is_an_error_even_with_zero_weight():
    target = torch.randint(0, V, (2, 3))
    target[0, 0] = V + 3
    weight = torch.rand(2, 3)
    weight[0, 0] = 0.0
    with pytest.raises(ValueError, match="target"):
        fused_wce.linear_cross_entropy(torch.randn(2, 3, H), torch.randn(V, H), target, weight)


def test_ignore_index_inside_vocabulary_is_allowed():
    target = torch.randint(0, V, (2, 3))
    loss = fused_wce.linear_cross_entropy(torch.randn(2, 3, H), torch.randn(V, H), target, ignore_index=int(target[0, 0]))
    assert torch.isfinite(loss)


def test_triton_backend_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = good()
    with pytest.raises(ValueError, match="backend='triton'"):
        fused_wce.linear_cross_entropy(args["hidden"], args["weight"], args["target"], backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_names_the_argument():
    args = good()
    with pytest.raises(ValueError, match="weight"):
        fused_wce.linear_cross_entropy(args["hidden"], args["weight"].cuda(), args["target"])
    with pytest.raises(ValueError, match="target"):
        fused_wce.linear_cross_entropy(args["hidden"].cuda(), args["weight"].cuda(), args["target"])
