"""benchmarks.roofline, the model of each provider's FLOPs, HBM bytes, time and peak memory, checked against what
can be counted or measured without a GPU, and for the properties any correct model has.

- FLOPs: torch's FlopCounterMode counts the GEMMs of each provider's computation at small shapes on CPU; the
  model's FLOPs are exactly that count, and scale linearly with H, V and the tokens, so they hold at every size.
- Peak memory: where a provider's algorithm is the same on CPU (fused_wce's PyTorch path, eager), the peak of
  torch's allocations on CPU is within the model's own 20% gap threshold of its prediction.
- Consistency: bigger problems never predict less; time lies between max(compute, memory) and their sum and
  scales inversely with the card's rates; published peer measurements are reproduced.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import fused_wce
from benchmarks import measure, roofline
from benchmarks.providers import PROVIDERS_BY_NAME
from helpers import run_inside_custom_op

H, V, N = 4096, 128256, 16384  # Llama-3-8B's head, 16384 tokens
H200 = roofline.CARDS["H200"]
GEMMS = {"aten.mm", "aten.addmm", "aten.addmm_"}


# --- FLOPs, counted ------------------------------------------------------------------------------------------------
class _IntoCustomOps(TorchDispatchMode):
    """Runs fused_wce's custom ops' implementations op by op, so that a mode below this one sees their GEMMs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = run_inside_custom_op(self, func, args, kwargs)
        return inside if inside is not None else func(*args, **(kwargs or {}))


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # FlopCounterMode has no formula for the in-place addmm_


def counted_gemm_flops(step) -> int:
    """FLOPs of the GEMMs ``step()`` runs, by torch's FlopCounterMode. The other ops it counts are the per-row
    dot products of the loss math (O(rows V), not GEMMs over H, left out of the model by its convention):
    asserted to be that small."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops})
    with counter, _IntoCustomOps():
        step()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    gemm = sum(flops for op, flops in counts.items() if op in GEMMS)
    other = sum(flops for op, flops in counts.items() if op not in GEMMS)
    assert other * 8 <= gemm, counts
    return gemm


def _fused_wce_step(backend_options, backend="torch"):
    def step(hidden, weight, target):
        fused_wce.linear_cross_entropy(hidden, weight, target, backend=backend, **backend_options).backward()
    return step


def _reference_on_counted_rows(hidden, weight, target):
    """The loss of the counted rows alone, by the float64 reference (logits, then autograd)."""
    counted = target != -100
    fused_wce.reference_linear_cross_entropy(hidden[counted], weight, target[counted]).backward()


def _eager(hidden, weight, target):
    PROVIDERS_BY_NAME["torch_eager"].make("cpu", {})(hidden, weight, target, (target != -100).float()).backward()


def _log_prob_provider(name):
    """A log-prob provider's objective (signed advantages on the counted tokens) and its backward."""
    def step(hidden, weight, target):
        advantage = torch.where(target != -100, torch.linspace(-1.0, 1.0, target.shape[0]), 0.0)
        PROVIDERS_BY_NAME[name].make("cpu", {})(hidden, weight, target, advantage).backward()
    return step


# provider -> (the computation it performs, the dtype to run it in). Not here: torch_compile (compiling costs
# minutes), torch_chunked and trl_chunked (their CPU code paths are other algorithms than the CUDA ones modelled),
# Liger and CCE (CUDA only).
COUNTED = {
    "fused_wce": (_reference_on_counted_rows, torch.float32),  # the Triton path's GEMMs run on counted rows only
    "fused_wce[torch]": (_fused_wce_step({}), torch.float32),
    # the Triton path's cuBLAS plan (under the interpreter its GEMMs are torch ops, so they are counted); lean
    # needs a non-fp32 weight
    "fused_wce_lean": (_fused_wce_step(dict(lean_memory=True), backend="triton"), torch.bfloat16),
    "torch_eager": (_eager, torch.float32),
    # the log-probs' PyTorch path: the statistics pass, then one gradient pass given them (no second statistics
    # pass); and the materialised log_softmax on every row
    "fused_wce_log_prob": (_log_prob_provider("fused_wce_log_prob"), torch.float32),
    "torch_log_softmax": (_log_prob_provider("torch_log_softmax"), torch.float32),
}


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("counted_fraction", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("provider", sorted(COUNTED))
def test_flops_equal_a_count_of_the_computation(provider, counted_fraction, frozen_head):
    tokens, hidden_size, vocab = 48, 24, 200
    counted = round(tokens * counted_fraction)
    step, dtype = COUNTED[provider]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=generator) / 4).to(dtype).requires_grad_(not frozen_head)
    target = torch.randint(0, vocab, (tokens,), generator=generator)
    target[torch.randperm(tokens, generator=generator)[counted:]] = -100
    problem = roofline.Problem("small", hidden_size, vocab, tokens, counted, 2, frozen_head)
    assert roofline.predict(provider, problem, H200).flops == counted_gemm_flops(lambda: step(hidden, weight, target))


def test_flops_scale_linearly_with_every_dimension():
    """A GEMM's FLOPs are bilinear in its sizes: doubling H, V or the tokens (counted ones included) doubles every
    provider's FLOPs, so the small-shape counts above hold at the suite's shapes."""
    base = roofline.Problem("base", 2048, 32000, 4096, 2048)
    for provider in roofline.PROVIDERS:
        for frozen in (False, True):
            flops = roofline.predict(provider, dataclasses.replace(base, frozen_head=frozen), H200).flops
            for doubled in (dict(hidden=4096), dict(vocab=64000), dict(tokens=8192, counted=4096)):
                bigger = dataclasses.replace(base, frozen_head=frozen, **doubled)
                assert roofline.predict(provider, bigger, H200).flops == 2 * flops, (provider, frozen, doubled)


# --- peak memory, measured ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["fused_wce[torch]", "torch_eager"])
@pytest.mark.parametrize("tokens,hidden_size,vocab,counted_fraction,frozen_head",
                         [(256, 64, 2000, 0.5, False), (128, 256, 1000, 0.25, False), (512, 128, 4000, 0.5, True)])
def test_peak_memory_matches_the_cpu_measurement(provider, tokens, hidden_size, vocab, counted_fraction,
                                                 frozen_head):
    """bf16, as modelled, with the CPU budget (several [C, B] blocks at the larger shapes)."""
    generator = torch.Generator().manual_seed(1)
    counted = round(tokens * counted_fraction)
    hidden = torch.randn(tokens, hidden_size, generator=generator).bfloat16().requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).bfloat16()
    weight.requires_grad_(not frozen_head)
    target = torch.randint(0, vocab, (tokens,), generator=generator)
    target[counted:] = -100
    token_weight = (target != -100).float()
    loss_fn = PROVIDERS_BY_NAME[provider.split("[")[0]].make("cpu", {})

    def step():
        loss_fn(hidden, weight, target, token_weight).backward()
        hidden.grad = weight.grad = None

    step()  # first call: lazy initialisation stays out of the measurement
    peak = measure.cpu_allocated_peak_above(step)
    assert peak is not None and peak > 0
    prediction = roofline.predict(provider, roofline.Problem("cpu", hidden_size, vocab, tokens, counted, 2,
                                                             frozen_head, device="cpu"), H200)
    row = roofline.compare(prediction, measured_peak_bytes=peak)
    assert not row["needs_note"], f"measured {peak} B, predicted {prediction.peak_bytes:.0f} B ({row['memory_ratio']}x)"


def test_matches_published_peer_memory():
    """Liger (H200, H 4096, V 128256, N 8192, bf16): 1129 MiB published; CCE (A100, Gemma-2-2B, N 8192): 1164 MB
    published. The model's tensors should land within 10%."""
    liger = roofline.predict("liger", roofline.Problem("l", 4096, 128256, 8192, 8192), H200)
    assert liger.peak_bytes / roofline.MIB == pytest.approx(1129, rel=0.10)
    cce = roofline.predict("cce", roofline.Problem("g", 2304, 256000, 8192, 8192), roofline.CARDS["A100"])
    assert cce.peak_bytes / 1e6 == pytest.approx(1164, rel=0.10)


# --- consistency ----------------------------------------------------------------------------------------------------
def test_bigger_problems_never_predict_less():
    """FLOPs and time never fall as N, V or the counted tokens grow, nor peak memory as N, H or the counted tokens
    grow. (Time may fall as H grows for the providers whose chunks grow with H, and peak memory as V grows where
    a fixed chunk budget then holds fewer rows: properties of those algorithms, not of the model.)"""
    sizes = {"tokens": (4096, 8192, 16384), "vocab": (32000, 128256, 152064, 262144), "hidden": (2048, 2304, 4096)}
    grows = {"tokens": ("flops", "time_s", "peak_bytes"), "vocab": ("flops", "time_s"),
             "hidden": ("flops", "peak_bytes"), "counted": ("flops", "time_s", "peak_bytes")}

    def predict(provider, frozen, hidden, vocab, tokens, counted):
        return roofline.predict(provider, roofline.Problem("p", hidden, vocab, tokens, counted, 2, frozen), H200)

    for provider, frozen in itertools.product(roofline.PROVIDERS, (False, True)):
        for hidden, vocab, tokens in itertools.product(sizes["hidden"], sizes["vocab"], sizes["tokens"]):
            base = dict(hidden=hidden, vocab=vocab, tokens=tokens)
            for dimension in ("tokens", "vocab", "hidden"):
                larger = [size for size in sizes[dimension] if size > base[dimension]]
                if not larger:
                    continue
                bigger = {**base, dimension: larger[0]}
                small = predict(provider, frozen, **base, counted=base["tokens"] // 2)
                large = predict(provider, frozen, **bigger, counted=bigger["tokens"] // 2)
                for quantity in grows[dimension]:
                    assert getattr(large, quantity) >= getattr(small, quantity), (provider, frozen, base, dimension,
                                                                                  quantity)
            counted = [predict(provider, frozen, **base, counted=m) for m in (0, tokens // 4, tokens // 2, tokens)]
            for small, large in zip(counted, counted[1:]):
                for quantity in grows["counted"]:
                    assert getattr(large, quantity) >= getattr(small, quantity), (provider, frozen, base, quantity)


def test_time_lies_between_the_bounds_and_scales_with_the_card():
    """Each phase takes max(compute, memory), so the total lies between max(all compute, all memory) and their sum;
    a card twice as fast at everything halves every time and changes no FLOP, byte or peak."""
    twice = dataclasses.replace(H200, gemm_flops=2 * H200.gemm_flops, fp32_flops=2 * H200.fp32_flops,
                                hbm_bytes_per_s=2 * H200.hbm_bytes_per_s)
    for prediction in roofline.predict_all(cards=("H200", "H100", "A100")):
        assert prediction.time_s > 0 and prediction.peak_bytes > 0 and prediction.flops > 0
        bounds = max(prediction.compute_s, prediction.memory_s), prediction.compute_s + prediction.memory_s
        assert bounds[0] * (1 - 1e-12) <= prediction.time_s <= bounds[1] * (1 + 1e-12), prediction.row()
        if prediction.card.name == H200.name:
            faster = roofline.predict(prediction.provider, prediction.problem, twice)
            assert faster.time_s == pytest.approx(prediction.time_s / 2, rel=1e-12)
            assert (faster.flops, faster.hbm_bytes, faster.peak_bytes) == (prediction.flops, prediction.hbm_bytes,
                                                                           prediction.peak_bytes)


def test_grid_covers_every_card_model_size_and_provider():
    predictions = roofline.predict_all(cards=("H200", "H100", "A100"))
    assert len(predictions) == 3 * len(roofline.MODELS) * 4 * 2 * len(roofline.PROVIDERS)
    assert {p.provider for p in predictions} == set(roofline.PROVIDERS)


def test_frozen_head_and_compare():
    trainable = roofline.predict("fused_wce", roofline.Problem.model("Llama-3-8B", N, 0.5), H200)
    frozen = roofline.predict("fused_wce", roofline.Problem.model("Llama-3-8B", N, 0.5, frozen_head=True), H200)
    assert frozen.flops < trainable.flops and frozen.time_s < trainable.time_s
    assert frozen.peak_bytes < trainable.peak_bytes - V * H * 4  # no fp32 weight-gradient accumulator
    row = roofline.compare(trainable, measured_s=trainable.time_s * 1.1, measured_peak_bytes=trainable.peak_bytes)
    assert row["time_ratio"] == pytest.approx(1.1) and row["memory_ratio"] == 1.0 and not row["needs_note"]
    assert roofline.compare(trainable, measured_s=trainable.time_s * 1.3)["needs_note"]
    assert roofline.compare(trainable, measured_peak_bytes=trainable.peak_bytes * 0.7)["needs_note"]
    with pytest.raises(ValueError, match="provider"):
        roofline.predict("nope", trainable.problem, H200)
    with pytest.raises(ValueError, match="counted"):
        roofline.Problem("x", 8, 8, 4, 5)


def test_lean_memory_stays_below_liger_default():
    """lean_memory's target: its predicted peak <= Liger's default at Llama-3-8B, N 16384, half counted."""
    problem = roofline.Problem.model("Llama-3-8B", N, 0.5)
    lean = roofline.predict("fused_wce_lean", problem, H200)
    liger = roofline.predict("liger", problem, H200)
    default = roofline.predict("fused_wce", problem, H200)
    assert lean.peak_bytes <= liger.peak_bytes < default.peak_bytes
