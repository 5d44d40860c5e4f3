"""HybridTrainer: (1 - mu) * GRPO + mu * weighted SFT in one step.

mu = 1 is a WeightedSFTTrainer step, mu = 0 a FusedGRPOTrainer step, 0 < mu < 1 the formula (a float64 full-logits
reference), and 2 processes (DDP, FSDP2 with the LM head as its own unit) equal 1 process. Tiny models (hidden
32, 2 layers, untied head) saved once; fixed completions (``rollout_func``) and a deterministic reward; SGD
without gradient clipping, so recorded gradients are the loss's.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_helpers import (arithmetic_prompts, fixed_rollout, gradient_recorder, grpo_config, logged,  # noqa: I001
                         sft_config, token_parity_reward)

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from fused_wce.trl_integration import TurnWeighting, WeightedSFTTrainer
from fused_wce.trl_integration.chat_data import load_default_dataset
from fused_wce.trl_integration.trainer.collator import shifted_target_weights
from fused_wce.trl_integration.trainer.grpo_trainer import FusedGRPOTrainer
from fused_wce.trl_integration.trainer.hybrid_config import HybridConfig, mu_at
from fused_wce.trl_integration.trainer.hybrid_trainer import HybridTrainer

TESTS = Path(__file__).parent
WEIGHTING = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.3}, decay=0.5)

pytestmark = pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")


def _hybrid(tiny_llama_path, tokenizer, output_dir, sft_dataset, trainer_class=HybridTrainer, callbacks=(), **config):
    recorder = gradient_recorder()
    trainer = trainer_class(tiny_llama_path, reward_funcs=token_parity_reward,
                            args=grpo_config(output_dir, HybridConfig, **config), train_dataset=arithmetic_prompts(8),
                            processing_class=tokenizer, rollout_func=fixed_rollout(tokenizer),
                            sft_dataset=sft_dataset, weighting=WEIGHTING, callbacks=[recorder, *callbacks])
    trainer.train()
    return trainer, recorder.grads


def _assert_same_gradients(actual_steps, expected_steps, rtol, atol):
    assert len(actual_steps) == len(expected_steps) > 0
    for step, (actual, expected) in enumerate(zip(actual_steps, expected_steps)):
        assert set(actual) == set(expected)
        for name, grad in expected.items():
            assert grad.norm() > 0, name
            torch.testing.assert_close(actual[name].double(), grad.double(), rtol=rtol, atol=atol,
                                       msg=f"step {step}: {name}")


# ------------------------------------------------------------------------------------------- the two limits
@pytest.mark.parametrize("reweighting", ["none", "p"], ids=["plain", "dft"])
def test_mu_one_is_a_weighted_sft_trainer_step(tiny_llama_path, tokenizer, tmp_path, reweighting):
    """mu = 1: the step of WeightedSFTTrainer on the same 4 conversations (2 per micro-batch, GA 2, so the
    normaliser spans both micro-batches): the same loss, per-role and per-turn losses and gradients. ``"p"`` is
    WeightedSFTTrainer's ``loss_type="dft"``."""
    conversations = load_default_dataset().select(range(4))
    hybrid, hybrid_grads = _hybrid(tiny_llama_path, tokenizer, tmp_path / "hybrid", conversations, sft_mu=1.0,
                                   max_steps=1, gradient_accumulation_steps=2, sft_per_device_train_batch_size=2,
                                   sft_max_length=256, sft_token_reweighting=reweighting)
    recorder = gradient_recorder()
    sft = WeightedSFTTrainer(tiny_llama_path, args=sft_config(
        tmp_path / "sft", max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=256,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
        loss_type="dft" if reweighting == "p" else "nll"), train_dataset=conversations, processing_class=tokenizer,
        weighting=WEIGHTING, callbacks=[recorder])
    sft.train()
    keys = [key for key in sft.state.log_history[0] if key.startswith("loss/")]
    assert "loss/assistant" in keys and "loss/turn_2" in keys
    for key in ["loss", *keys]:
        assert logged(hybrid, key) == pytest.approx(logged(sft, key), rel=1e-5), key
    assert logged(hybrid, "hybrid/sft_loss") == pytest.approx(logged(sft, "loss"), rel=1e-5)
    _assert_same_gradients(hybrid_grads, recorder.grads, rtol=1e-4, atol=1e-7)


def test_mu_zero_is_the_fused_grpo_step(tiny_llama_path, tokenizer, tmp_path):
    """mu = 0: exactly FusedGRPOTrainer's steps (the SFT term is not computed): the same logs and gradients."""
    hybrid, hybrid_grads = _hybrid(tiny_llama_path, tokenizer, tmp_path / "hybrid", load_default_dataset().select(range(8)),
                                   sft_mu=0.0, beta=0.1)
    recorder = gradient_recorder()
    grpo = FusedGRPOTrainer(tiny_llama_path, reward_funcs=token_parity_reward, args=grpo_config(tmp_path / "grpo", beta=0.1),
                            train_dataset=arithmetic_prompts(8), processing_class=tokenizer,
                            rollout_func=fixed_rollout(tokenizer), callbacks=[recorder])
    grpo.train()
    for key in ("loss", "kl", "entropy", "reward", "clip_ratio/region_mean"):
        assert logged(hybrid, key) == logged(grpo, key), key
    assert logged(hybrid, "hybrid/mu") == [0.0, 0.0] and logged(hybrid, "hybrid/sft_loss") == [0.0, 0.0]
    assert logged(hybrid, "hybrid/grpo_loss") == pytest.approx(logged(grpo, "loss"), rel=1e-6)
    _assert_same_gradients(hybrid_grads, recorder.grads, rtol=0, atol=0)


# -------------------------------------------------------------------------------------- the formula, float64
class _Recording(HybridTrainer):
    """Keeps, per training micro-batch: the optimizer step, the GRPO inputs, the SFT micro-batch and mu."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            step = self._sft_step
            self.recorded.append((self.state.global_step, inputs, step.batches[0], step.mu))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class _ParametersBeforeEachStep(TrainerCallback):
    def __init__(self):
        self.parameters = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.parameters.append({name: p.detach().clone() for name, p in model.named_parameters()})


def _reference_step(tiny_llama_path, parameters, recorded, config):
    """Float64, full logits: ``(1 - mu) * GRPO + mu * SFT`` of one optimizer step from its recorded micro-batches
    (``loss_type="grpo"``, on-policy, the k3 KL to the initial model times the importance ratio; SFT term
    ``sum(w p (1 - p) CE) / sum(w)`` over the step's micro-batches). Returns (loss, grpo term, sft term,
    gradients)."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float64)
    policy.load_state_dict({name: value.double() for name, value in parameters.items()})
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float64)
    accumulation = len(recorded)
    normalizer = sum(shifted_target_weights(batch).double().sum() for _, _, batch, _ in recorded)
    total = grpo_total = sft_total = 0.0
    for _, inputs, batch, mu in recorded:
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        length = completion_ids.size(1)

        def log_probs(model):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -length - 1:-1]
            return (logits / config.temperature).log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)

        log_p = log_probs(policy)
        with torch.no_grad():
            reference_log_p = log_probs(reference)
        ratio = torch.exp(log_p - log_p.detach())
        advantages = inputs["advantages"].double().unsqueeze(1)
        clipped = ratio.clamp(1 - config.epsilon, 1 + config.epsilon)
        kl = torch.exp(reference_log_p - log_p) - (reference_log_p - log_p) - 1
        if config.use_bias_correction_kl:  # TRL's default: the k3 estimate times the importance ratio
            kl = kl * ratio
        per_token = -torch.min(ratio * advantages, clipped * advantages) + config.beta * kl
        mask = completion_mask.double()
        grpo = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean() / accumulation

        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        log_p = logits.log_softmax(-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        p = log_p.exp().detach()
        sft = (shifted_target_weights(batch).double() * p * (1 - p) * -log_p).sum() / normalizer
        total = total + (1 - mu) * grpo + mu * sft
        grpo_total, sft_total = grpo_total + grpo.item(), sft_total + sft.item()
    total.backward()
    return total.item(), grpo_total, sft_total, {name: p.grad for name, p in policy.named_parameters()}


def test_hybrid_loss_matches_a_float64_reference(tiny_llama_path, tokenizer, tmp_path):
    """0 < mu < 1, CHORD-phi reweighting, beta 0.1, GA 2, two steps: each step's loss, per-term losses and
    gradients equal a float64 full-logits statement of the formula (the second step's policy differs from the
    reference model, so the KL term has a gradient)."""
    before = _ParametersBeforeEachStep()
    trainer_class = type("Recording", (_Recording,), {"recorded": []})
    hybrid, grads = _hybrid(tiny_llama_path, tokenizer, tmp_path, load_default_dataset().select(range(8)),
                            trainer_class=trainer_class, callbacks=[before], sft_mu=0.3, beta=0.1,
                            gradient_accumulation_steps=2, sft_per_device_train_batch_size=2,
                            sft_token_reweighting="p(1-p)", learning_rate=2.0, loss_type="grpo")
    assert len(trainer_class.recorded) == 4 and len(before.parameters) == 2
    for step in range(2):
        recorded = [entry for entry in trainer_class.recorded if entry[0] == step]
        loss, grpo, sft, expected = _reference_step(tiny_llama_path, before.parameters[step], recorded, hybrid.args)
        assert logged(hybrid, "loss")[step] == pytest.approx(loss, rel=1e-5, abs=1e-7)
        assert logged(hybrid, "hybrid/grpo_loss")[step] == pytest.approx(grpo, rel=1e-5, abs=1e-7)
        assert logged(hybrid, "hybrid/sft_loss")[step] == pytest.approx(sft, rel=1e-5, abs=1e-9)
        _assert_same_gradients([grads[step]], [expected], rtol=1e-4, atol=1e-6)
    assert logged(hybrid, "kl")[1] > 0


# ------------------------------------------------------------------------------------------- multi-process
def test_two_processes_equal_one_process(tiny_llama_path, tmp_path):
    """torchrun, 2 CPU processes (gloo) x per-device batch 2 == 1 process x 4, GA 2, two SGD steps: the same
    logged losses (total, per term, per role), rewards and KL, and the same parameters; under DDP and under FSDP2
    with every decoder layer and the LM head their own units (the head's weight is a sharded DTensor)."""
    from hybrid_worker import LOGGED, result, train

    out = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(TESTS.parent)]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(TESTS / "hybrid_worker.py"), str(out), tiny_llama_path, "ddp", "fsdp2"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=5400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    one = result(train(tmp_path / "one", tiny_llama_path, per_device=4))
    assert one["logs"]["loss/user"] and one["logs"]["kl"][1] > 0
    for scenario in ("ddp", "fsdp2"):
        two = torch.load(out / f"{scenario}.pt", weights_only=False)
        assert "error" not in two, f"{scenario}:\n{two['error']}"
        assert two["head_sharded"] == (scenario == "fsdp2")
        for key in LOGGED:
            assert two["logs"][key] == pytest.approx(one["logs"][key], rel=1e-5, abs=1e-8), f"{scenario}: {key}"
        for name, param in one["params"].items():
            torch.testing.assert_close(two["params"][name], param, rtol=1e-4, atol=1e-6, msg=f"{scenario}: {name}")


# ------------------------------------------------------------------------------------------- mu and its checks
def test_mu_schedules():
    """Warm-up 0 -> mu, then constant, or linear / cosine decay to mu_end over the decay steps, then mu_end."""
    def config(**values):
        return grpo_config("unused", HybridConfig, max_steps=12, **values)

    constant = config(sft_mu=0.4, sft_mu_warmup_steps=3)
    assert [mu_at(step, constant) for step in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    linear = config(sft_mu=0.9, sft_mu_end=0.1, sft_mu_schedule="linear", sft_mu_decay_steps=4)
    assert [mu_at(step, linear) for step in range(6)] == pytest.approx([0.9, 0.7, 0.5, 0.3, 0.1, 0.1])
    cosine = config(sft_mu=0.9, sft_mu_end=0.1, sft_mu_schedule="cosine", sft_mu_warmup_steps=2)
    values = [mu_at(step, cosine) for step in range(14)]  # decay over max_steps - warm-up = 10 steps
    assert values[:3] == pytest.approx([0.3, 0.6, 0.9])
    assert values[7] == pytest.approx(0.5)  # half way
    assert values[12:] == pytest.approx([0.1, 0.1])
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


@pytest.mark.parametrize("field, value", [("sft_mu", 1.5), ("sft_mu", -0.1), ("sft_mu_end", 2.0),
                                          ("sft_mu_schedule", "step"), ("sft_mu_warmup_steps", -1),
                                          ("sft_per_device_train_batch_size", 0), ("sft_max_length", 1),
                                          ("sft_token_reweighting", "p^2"), ("sft_mu_end", 0.2)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        grpo_config("unused", HybridConfig, **{field: value})


def test_bad_trainer_arguments_are_clear_errors(tiny_llama_path, tokenizer, tmp_path):
    common = dict(reward_funcs=token_parity_reward, train_dataset=arithmetic_prompts(8), processing_class=tokenizer,
                  rollout_func=fixed_rollout(tokenizer))
    conversations = load_default_dataset().select(range(8))
    with pytest.raises(TypeError, match="HybridConfig"):
        HybridTrainer(tiny_llama_path, args=grpo_config(tmp_path), sft_dataset=conversations, **common)
    args = grpo_config(tmp_path, HybridConfig)
    with pytest.raises(ValueError, match="messages"):
        HybridTrainer(tiny_llama_path, args=args, sft_dataset=arithmetic_prompts(8), **common)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        HybridTrainer(tiny_llama_path, args=args, sft_dataset=conversations.to_iterable_dataset(), **common)
    from fused_wce.trl_integration import AdaptiveTurnWeights

    with pytest.raises(ValueError, match="adaptive"):
        HybridTrainer(tiny_llama_path, args=args, sft_dataset=conversations,
                      weighting=TurnWeighting(adaptive=AdaptiveTurnWeights()), **common)
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        HybridTrainer(tiny_llama_path, args=args, sft_dataset=conversations.select(range(3)), **common)


def test_sft_stream_covers_the_expert_set_per_pass_and_resumes(tiny_llama_path, tokenizer, tmp_path):
    """One pass of micro-batches holds every conversation once (6 of 2 from 12, in a new order each pass), and the
    stream started ``k`` micro-batches in (a resumed run) continues exactly where the full stream is."""
    trainer = HybridTrainer(tiny_llama_path, reward_funcs=token_parity_reward,
                            args=grpo_config(tmp_path, HybridConfig, sft_per_device_train_batch_size=2),
                            train_dataset=arithmetic_prompts(8), processing_class=tokenizer,
                            sft_dataset=load_default_dataset().select(range(12)))
    stream = list(itertools.islice(trainer._sft_micro_batches(), 14))
    passes = [[tuple(ids[mask.bool()].tolist()) for batch in stream[start:start + 6]
               for ids, mask in zip(batch["input_ids"], batch["attention_mask"])] for start in (0, 6)]
    every = {tuple(row["input_ids"]) for row in trainer.sft_dataset}
    assert len(every) == 12
    for rows in passes:
        assert len(rows) == 12 and set(rows) == every
    assert passes[0] != passes[1]
    for expected, actual in zip(stream[5:], itertools.islice(trainer._sft_micro_batches(skip=5), 9)):
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.equal(expected[name], actual[name]), name
