"""FusedGRPOTrainer against stock TRL GRPOTrainer, and the fused log-probability head against TRL's head and a
float64 reference.

Tiny models (hidden 32, 2 layers, untied head) on the shipped tokenizer; completions come from a fixed
``rollout_func`` and rewards from a deterministic function, so both trainers see the same completions, rewards
and advantages. Two SGD steps per run with two steps per generation: the second step's importance ratio differs
from 1 and the clipping (``epsilon`` 0.002) is active, so the clipped branches of the loss are compared too.
"""
from __future__ import annotations

import copy

import pytest

from trl_helpers import (arithmetic_prompts, fixed_rollout, gradient_recorder, grpo_config, logged,  # noqa: I001
                         materialised_linear_log_prob, tiny_model, token_parity_reward)

import torch
from trl import GRPOTrainer
from trl.trainer import utils as trl_utils
from trl.trainer.utils import add_fused_lm_head

import fused_wce
from fused_wce.trl_integration.trainer.grpo_trainer import FusedGRPOTrainer
from fused_wce.trl_integration.trainer.log_prob_head import add_log_prob_lm_head


class _CallCounter:
    """Wraps ``fused_wce.linear_log_prob``; counts the calls made with and without gradient tracking."""

    def __init__(self, function):
        self.function, self.with_grad, self.without_grad = function, 0, 0

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            self.with_grad += 1
        else:
            self.without_grad += 1
        return self.function(*args, **kwargs)


def _train(cls, tiny_llama_path, tokenizer, output_dir, **config):
    recorder = gradient_recorder()
    trainer = cls(tiny_llama_path, reward_funcs=token_parity_reward, args=grpo_config(output_dir, **config),
                  train_dataset=arithmetic_prompts(8), processing_class=tokenizer,
                  rollout_func=fixed_rollout(tokenizer), callbacks=[recorder])
    trainer.train()
    return trainer, recorder.grads


def _never_called(*args, **kwargs):
    raise AssertionError("TRL's chunked log-prob head ran")


@pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")
@pytest.mark.parametrize("beta", [0.0, 0.1], ids=["beta0", "beta0.1"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_matches_stock_grpo_trainer(tiny_llama_path, tokenizer, tmp_path, loss_type, beta):
    """Same completions and rewards: the same logged losses, KL, entropy and clip ratios, and every parameter's
    gradient before each of the two optimizer steps, to float32 precision."""
    stock, stock_grads = _train(GRPOTrainer, tiny_llama_path, tokenizer, tmp_path / "stock", loss_type=loss_type,
                                beta=beta)
    counter = _CallCounter(fused_wce.linear_log_prob)
    with pytest.MonkeyPatch.context() as patch:  # the fused run never reaches TRL's own head
        patch.setattr(fused_wce, "linear_log_prob", counter)
        patch.setattr(trl_utils._ChunkedLogProbFunction, "apply", _never_called)
        fused, fused_grads = _train(FusedGRPOTrainer, tiny_llama_path, tokenizer, tmp_path / "fused",
                                    loss_type=loss_type, beta=beta)
    # One call with gradients per optimizer step; the old-policy (and reference) log-probs of the generation batch
    # (two micro-batches) without.
    assert counter.with_grad == 2 and counter.without_grad == (4 if beta else 2)
    keys = ["loss", "entropy", "reward", "clip_ratio/region_mean"] + (["kl"] if beta else [])
    for key in keys:
        expected, actual = logged(stock, key), logged(fused, key)
        assert len(expected) == len(actual) > 0, key  # rewards are logged on generation steps only
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6), key
    assert logged(stock, "clip_ratio/region_mean")[1] > 0  # the clipped branch was taken at step 2
    assert len(stock_grads) == len(fused_grads) == 2
    for step, (expected, actual) in enumerate(zip(stock_grads, fused_grads)):
        assert set(expected) == set(actual)
        for name, grad in expected.items():
            assert grad.norm() > 0, name
            torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-7, msg=f"step {step}: {name}")


# --------------------------------------------------------------------------------------------- the fused head
def _softcapped_model(tokenizer):
    """A tiny Gemma-2 (final-logit softcapping 2.0, so the softcap matters) with an untied head and a bias-free
    head; the logits also get a scale through ``logit_scale`` on the config."""
    model = tiny_model("gemma2", tokenizer, final_logit_softcapping=2.0, tie_word_embeddings=False)
    model.config.logit_scale = 1.7
    return model


def _scored_batch(tokenizer, rows=3, length=10):
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, len(tokenizer), (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt is not scored
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_prob_head_matches_trl_head_and_float64_reference(tokenizer, temperature):
    """``model(..., labels=, fused_lm_head=True)``: log-probs and entropies (softcap, logit scale, temperature)
    equal TRL's own fused head and a float64 full-logits reference; with random signed upstream gradients on both
    outputs, every parameter's gradient equals the reference's."""
    base = _softcapped_model(tokenizer)
    input_ids, attention_mask, labels = _scored_batch(tokenizer)
    generator = torch.Generator().manual_seed(3)
    upstream = torch.randn(2, *labels[:, 1:].shape, generator=generator)

    def run(patch, dtype=torch.float32):
        model = copy.deepcopy(base).to(dtype)
        patch(model)
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        ((upstream[0].to(dtype) * out.log_probs).sum() + (upstream[1].to(dtype) * out.entropy).sum()).backward()
        return out, {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}

    ours, our_grads = run(lambda m: add_log_prob_lm_head(m, temperature=temperature))
    trl, trl_grads = run(lambda m: add_fused_lm_head(m, temperature=temperature, outputs=("log_probs", "entropy")))

    def reference_patch(model):
        add_log_prob_lm_head(model, temperature=temperature)

    with pytest.MonkeyPatch.context() as patch:  # the same definition with float64 logits
        patch.setattr(fused_wce, "linear_log_prob",
                      lambda *args, **kwargs: materialised_linear_log_prob(*args, dtype=torch.float64, **kwargs),
                      raising=False)
        reference, reference_grads = run(reference_patch, torch.float64)

    mask = labels[:, 1:] != -100
    assert torch.equal(ours.label_mask, mask)
    assert (ours.log_probs[~mask] == 0).all() and (ours.entropy[~mask] == 0).all()
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(ours, name).double(), getattr(reference, name), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(getattr(ours, name), getattr(trl, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss.double(), reference.loss, rtol=1e-5, atol=1e-6)
    assert set(our_grads) == set(reference_grads) == set(trl_grads)
    for name, grad in reference_grads.items():
        assert grad.norm() > 0, name
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(our_grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_log_prob_head_leaves_other_calls_alone(tokenizer):
    """Without ``fused_lm_head`` the model's own forward runs (logits, generation); under ``no_grad`` the fused
    call gives the same log-probs as with gradients, without a graph."""
    model = tiny_model("llama", tokenizer)
    input_ids, attention_mask, labels = _scored_batch(tokenizer)
    with torch.no_grad():
        expected_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    add_log_prob_lm_head(model, entropy=False)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        generated = model.generate(input_ids[:1, :4], max_new_tokens=3, do_sample=False)
        without_grad = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    assert generated.shape == (1, 7)
    assert without_grad.entropy is None and not without_grad.log_probs.requires_grad
    with_grad = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    assert with_grad.log_probs.requires_grad
    torch.testing.assert_close(without_grad.log_probs, with_grad.log_probs.detach(), rtol=0, atol=0)
    reference = materialised_linear_log_prob(
        model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1],
        model.lm_head.weight, labels[:, 1:], dtype=torch.float64)
    torch.testing.assert_close(with_grad.log_probs.double(), reference.detach(), rtol=1e-5, atol=1e-5)


def test_log_prob_head_bad_calls_are_clear_errors(tokenizer):
    model = tiny_model("llama", tokenizer)
    with pytest.raises(ValueError, match="temperature"):
        add_log_prob_lm_head(model, temperature=0.0)
    add_log_prob_lm_head(model)
    input_ids, attention_mask, labels = _scored_batch(tokenizer)
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True)
    with pytest.raises(NotImplementedError, match="pre-shifted labels"):
        model(input_ids=input_ids, attention_mask=attention_mask, shift_labels=labels, fused_lm_head=True)


def test_log_prob_head_copies_pickles_and_stacks_with_the_weighted_head(tokenizer):
    """Patched with both fused heads (as HybridTrainer patches its policy), a model deep-copies and pickles as a
    patched model of itself: the copy's fused calls run its own weights; the signature shows both keywords."""
    import inspect
    import pickle

    from fused_wce.trl_integration.trainer.lm_head import WeightedLossInputs, add_weighted_lm_head

    model = tiny_model("llama", tokenizer)
    add_log_prob_lm_head(model, temperature=0.7)
    add_weighted_lm_head(model)
    add_log_prob_lm_head(model, temperature=0.7)  # patching again replaces the options, keeps the stack
    assert {"fused_lm_head", "fused_wce_loss", "labels"} <= set(inspect.signature(model.forward).parameters)
    input_ids, attention_mask, labels = _scored_batch(tokenizer)
    loss_inputs = WeightedLossInputs(labels[:, 1:], (labels[:, 1:] != -100).float(), None)

    def run(m):
        with torch.no_grad():
            return (m(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True).log_probs,
                    m(input_ids=input_ids, attention_mask=attention_mask, fused_wce_loss=loss_inputs).loss)

    expected = run(model)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        for value, reference in zip(run(twin), expected):
            torch.testing.assert_close(value, reference, rtol=0, atol=0)
        with torch.no_grad():
            twin.lm_head.weight.mul_(1.5)
        changed = run(twin)
        assert not torch.equal(changed[0], expected[0]) and not torch.equal(changed[1], expected[1])
        for value, reference in zip(run(model), expected):  # the original is untouched
            torch.testing.assert_close(value, reference, rtol=0, atol=0)
