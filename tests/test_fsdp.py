"""The fused loss under sharded data parallelism, with the LM head as its own FSDP unit (CPU, gloo, 2 processes).

FSDP only unshards a unit's parameters inside that unit's forward and reduce-scatters their gradient after its
backward: the loss must run inside the head's own call (``add_weighted_lm_head`` gives the head a dispatching
forward). The gradients of every parameter are compared with a single-process float64 full-logits reference;
under mixed precision the per-token weights and the normalizer must still reach the loss in float32.
"""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trl_helpers import tiny_model  # noqa: I001  (sets HF_HUB_OFFLINE first)

import torch
import torch.nn.functional as F

from fsdp_worker import TEMPERATURE, log_prob_coefficients, make_batch, make_model
from fused_wce.trl_integration.trainer.lm_head import WeightedLossInputs, add_weighted_lm_head

TESTS = Path(__file__).parent
SCENARIOS = ("fsdp2", "fsdp2_bf16", "fsdp2_bf16_output", "fsdp2_head_in_root", "fsdp1", "fsdp1_bf16", "tp_head",
             "fsdp2_log_prob", "fsdp1_log_prob")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every scenario of tests/fsdp_worker.py, run in one 2-process launch: ``{scenario: result dict}``."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(TESTS.parent)]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(TESTS / "fsdp_worker.py"), str(out), *SCENARIOS]
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"fsdp_worker: {len(SCENARIOS)} scenarios in {time.perf_counter() - start:.1f} s")
    loaded = {name: torch.load(out / f"{name}.pt", weights_only=False) for name in SCENARIOS}
    for name, result in loaded.items():
        assert "error" not in result, f"{name}:\n{result['error']}"
    return loaded


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients of the whole global batch in one process, float64, from the full logits:
    ``sum(w_i * CE_i) / sum(w_i)``, plain autograd."""
    model = make_model().double()
    batch = make_batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    weight = batch["weight"].double()  # zero where the target is -100
    token_loss = F.cross_entropy(logits.transpose(1, 2), batch["target"].clamp_min(0), reduction="none")
    loss = (weight * token_loss).sum() / weight.sum()
    loss.backward()
    return loss.item(), {name: param.grad for name, param in model.named_parameters()}


def _relative_errors(grads, reference_grads) -> dict[str, float]:
    assert set(grads) == set(reference_grads)
    return {name: ((grads[name].double() - ref).norm() / ref.norm()).item() for name, ref in reference_grads.items()}


@pytest.mark.parametrize("scenario", ["fsdp2", "fsdp1", "fsdp2_head_in_root"])
def test_head_as_its_own_unit_gets_the_reduced_gradient(results, reference, scenario):
    """FSDP2 (``fully_shard`` per decoder layer, on lm_head, on the root) and FSDP1 (size-based auto wrap that
    makes lm_head its own unit; the model patched after wrapping): every parameter's gradient, gathered from its
    shards, equals the float64 reference over both ranks' data (so the head's was reduce-scattered). Also FSDP2
    with the head in the root's unit."""
    result = results[scenario]
    reference_loss, reference_grads = reference
    assert result["loss"] == pytest.approx(reference_loss, rel=1e-6)
    for name, ref in reference_grads.items():
        torch.testing.assert_close(result["grads"][name], ref.float(), rtol=1e-4, atol=1e-6, msg=name)
    errors = _relative_errors(result["grads"], reference_grads)
    print(scenario, {name: f"{errors[name]:.1e}" for name in ("lm_head.weight", "model.embed_tokens.weight")})
    seen = result["seen"]
    assert not seen["weight_is_dtensor"] and seen["weight_shape"] == tuple(reference_grads["lm_head.weight"].shape)
    if scenario == "fsdp1":
        assert "(lm_head): FullyShardedDataParallel" in result["structure"]


@pytest.mark.parametrize("scenario", ["fsdp2_bf16", "fsdp1_bf16"])
def test_mixed_precision_keeps_weights_and_normalizer_float32(results, reference, scenario):
    """bf16 parameters and inputs (FSDP2 ``MixedPrecisionPolicy``, FSDP1 ``MixedPrecision`` casting every unit's
    and the root's forward inputs): the loss computes in bf16, yet the per-token weights and the normalizer reach
    it bit-identical in float32; the gradients match the float64 reference to bf16 accuracy (measured: <= 1e-2
    relative, the old full_tensor() path gave 1.0 for the head)."""
    result = results[scenario]
    seen = result["seen"]
    assert seen["hidden_dtype"] == seen["weight_dtype"] == "torch.bfloat16"  # mixed precision is on
    assert seen["token_weight"].dtype == torch.float32 and seen["normalizer"].dtype == torch.float32
    assert torch.equal(seen["token_weight"], result["sent_weight"])
    assert torch.equal(seen["normalizer"], result["sent_normalizer"])
    reference_loss, reference_grads = reference
    assert result["loss"] == pytest.approx(reference_loss, rel=1e-3)
    errors = _relative_errors(result["grads"], reference_grads)
    print(scenario, {name: f"{errors[name]:.1e}" for name in ("lm_head.weight", "model.embed_tokens.weight")},
          f"max {max(errors.values()):.1e}")
    assert max(errors.values()) < 3e-2, errors


def test_loss_and_stats_stay_float32_under_an_output_dtype_cast(results):
    """FSDP2 ``MixedPrecisionPolicy(output_dtype=bfloat16)`` casts the head's returned tuple and the root's output:
    the loss and per-token statistics read through ``in_float32()`` (as the trainer logs them) are the float32
    values of the same run without the cast, bit for bit, and so are the gradients."""
    cast, plain = results["fsdp2_bf16_output"], results["fsdp2_bf16"]
    assert cast["returned_dtype"] == "torch.bfloat16" and plain["returned_dtype"] == "torch.float32"
    assert cast["loss_dtype"] == "torch.float32" and cast["loss"] == plain["loss"]
    for stat in ("token_loss", "entropy"):
        assert cast[stat].dtype == torch.float32 and torch.equal(cast[stat], plain[stat]), stat
        assert not torch.equal(cast[stat].bfloat16().float(), cast[stat])  # values bf16 would round
    for name, grad in plain["grads"].items():
        assert torch.equal(cast["grads"][name], grad), name


@pytest.mark.parametrize("scenario", ["fsdp2_log_prob", "fsdp1_log_prob"])
def test_log_prob_head_as_its_own_unit_gets_the_reduced_gradient(results, scenario):
    """The fused log-probability head (GRPO's) with the LM head its own FSDP2 / FSDP1 unit: a policy-gradient-like
    objective with signed coefficients on the log-probabilities and entropies (temperature 0.8) and every
    parameter's gradient equal a single-process float64 full-logits reference over both ranks' data."""
    model = make_model().double()
    batch = make_batch()
    coefficient, entropy_coefficient, count = log_prob_coefficients(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    log_p = (logits / TEMPERATURE).log_softmax(-1)
    log_prob = log_p.gather(-1, batch["target"].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1) * (batch["target"] != -100)
    objective = ((coefficient.double() * log_prob).sum() + (entropy_coefficient.double() * entropy).sum()) / count
    objective.backward()
    result = results[scenario]
    assert result["objective"] == pytest.approx(objective.item(), rel=1e-6)
    for name, param in model.named_parameters():
        assert param.grad.norm() > 0, name
        torch.testing.assert_close(result["grads"][name], param.grad.float(), rtol=1e-4, atol=1e-6, msg=name)
    if scenario == "fsdp1_log_prob":
        assert "(lm_head): FullyShardedDataParallel" in result["structure"]


def test_sharded_head_weight_inside_the_head_is_a_clear_error(results):
    """A head sharded along its hidden dimension (RowwiseParallel) still holds a DTensor inside its forward: an
    error naming the layout the loss needs, not full_tensor() with an unreduced gradient."""
    message = results["tp_head"]["raised"]
    assert "DTensor" in message and "Shard(dim=1)" in message and "sharded by vocabulary rows" in message


# ------------------------------------------------------------------------------------ single process, no FSDP
def _loss_inputs(model, rows=2, length=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=generator)
    target = input_ids[:, 1:].clone()
    target[0, :3] = -100
    weight = torch.rand(rows, length - 1, generator=generator) * (target != -100)
    return input_ids, WeightedLossInputs(target, weight, weight.sum())


def test_head_keeps_its_plain_forward_and_still_pickles(tokenizer):
    """Patched, the head still computes logits when called without the loss keyword (generation, evaluation);
    it pickles, and a deep copy of the model computes its loss with (and into the gradient of) its own head."""
    model = tiny_model("qwen2", tokenizer)
    input_ids, loss_inputs = _loss_inputs(model)
    expected = model(input_ids=input_ids).logits
    add_weighted_lm_head(model)
    hidden = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(model.lm_head(hidden), F.linear(hidden, model.lm_head.weight), rtol=0, atol=0)
    torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=0)

    head = pickle.loads(pickle.dumps(model.lm_head))
    torch.testing.assert_close(head(hidden), model.lm_head(hidden), rtol=0, atol=0)
    twin = copy.deepcopy(model)
    twin(input_ids=input_ids, fused_wce_loss=loss_inputs).loss.backward()
    assert twin.lm_head.weight.grad is not None and model.lm_head.weight.grad is None


def test_loss_inputs_are_not_entered_by_mixed_precision_casting():
    """The traversal FSDP1/FSDP2 use to cast forward inputs (``_apply_to_tensors``) casts the same tensors in a
    dict, but leaves a WeightedLossInputs alone."""
    from torch.distributed.utils import _apply_to_tensors

    def to_bf16(tensor):
        return tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor

    weight, normalizer = torch.rand(2, 5), torch.tensor(3.3)
    inputs = WeightedLossInputs(torch.zeros(2, 5, dtype=torch.long), weight, normalizer)
    cast_args, cast_kwargs = _apply_to_tensors(to_bf16, ((), {"fused_wce_loss": inputs}))
    assert cast_kwargs["fused_wce_loss"] is inputs and inputs.weight is weight and inputs.normalizer is normalizer
    as_dict = _apply_to_tensors(to_bf16, {"weight": weight, "normalizer": normalizer})
    assert as_dict["weight"].dtype == as_dict["normalizer"].dtype == torch.bfloat16


@pytest.mark.parametrize("hook_first", [True, False], ids=["hook_then_patch", "patch_then_hook"])
def test_fused_call_runs_through_an_accelerate_hook_on_the_head(tokenizer, hook_first):
    """With ``device_map`` accelerate hooks the head (its ``forward`` becomes a wrapper calling ``_old_forward``):
    the fused call still passes through the hook, in either order of hooking and patching."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class CountingHook(ModelHook):
        def __init__(self):
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    model = tiny_model("qwen2", tokenizer)
    input_ids, loss_inputs = _loss_inputs(model)
    plain = tiny_model("qwen2", tokenizer)
    add_weighted_lm_head(plain)
    expected = plain(input_ids=input_ids, fused_wce_loss=loss_inputs).loss

    hook = CountingHook()
    if hook_first:
        add_hook_to_module(model.lm_head, hook)
    add_weighted_lm_head(model)
    if not hook_first:
        add_hook_to_module(model.lm_head, hook)
    loss = model(input_ids=input_ids, fused_wce_loss=loss_inputs).loss
    assert hook.calls == 1
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    model.lm_head(torch.randn(2, model.config.hidden_size))  # the plain forward through the hook too
    assert hook.calls == 2


def test_bad_loss_inputs_are_clear_errors(tokenizer):
    model = tiny_model("llama", tokenizer)
    add_weighted_lm_head(model)
    input_ids, loss_inputs = _loss_inputs(model)
    with pytest.raises(TypeError, match="fused_wce_loss must be a WeightedLossInputs"):
        model(input_ids=input_ids, fused_wce_loss={"target": loss_inputs.target, "weight": loss_inputs.weight})
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        WeightedLossInputs(loss_inputs.weight, loss_inputs.weight, 1.0)
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        WeightedLossInputs(loss_inputs.target, loss_inputs.target, 1.0)
    with pytest.raises(ValueError, match="weight must have target's shape"):
        WeightedLossInputs(loss_inputs.target, loss_inputs.weight[:, 1:], 1.0)
    with pytest.raises(TypeError, match="normalizer must be"):
        WeightedLossInputs(loss_inputs.target, loss_inputs.weight, "1")
