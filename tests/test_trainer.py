"""WeightedSFTTrainer against stock TRL, gradient accumulation, data parallelism, packing, LoRA, architectures.

Tiny models (hidden 32, 2 layers) on the shipped tokenizer and conversations; a few optimizer steps each.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from trl_helpers import logged, sft_config, tiny_model  # noqa: I001  (sets HF_HUB_OFFLINE first)

import torch
from datasets import Dataset
from trl import SFTTrainer

from fused_wce.trl_integration.chat_data import load_default_dataset
from fused_wce.trl_integration import (ROLE_CODES, TurnWeighting, WeightedDataCollator, WeightedSFTTrainer,
                                       tokenize_with_weights)

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def conversations():
    return load_default_dataset().select(range(48))


def _train_pair(tokenizer, dataset, tmp_path, *, kind="llama", trainer_kwargs=None, **config):
    """Train stock SFTTrainer and WeightedSFTTrainer(weighting=None) from the same init; return both trainers."""
    trainers = []
    for name, cls in (("stock", SFTTrainer), ("weighted", WeightedSFTTrainer)):
        trainer = cls(tiny_model(kind, tokenizer), args=sft_config(tmp_path / name, **config), train_dataset=dataset,
                      processing_class=tokenizer, **(trainer_kwargs or {}))
        trainer.train()
        trainers.append(trainer)
    return trainers


def _assert_same_logs(stock, weighted, keys=("loss", "entropy", "mean_token_accuracy", "grad_norm")):
    for key in keys:
        expected, actual = logged(stock, key), logged(weighted, key)
        assert len(expected) == len(actual) > 0, key
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------------------------------- stock equivalence
@pytest.mark.parametrize("assistant_only_loss", [True, False], ids=["assistant_only", "full_sequence"])
def test_matches_stock_sft_trainer(tokenizer, conversations, tmp_path, assistant_only_loss):
    """Weight 1 on exactly TRL's labels reproduces SFTTrainer's loss, grad norm, entropy and accuracy per step."""
    stock, weighted = _train_pair(tokenizer, conversations, tmp_path, assistant_only_loss=assistant_only_loss)
    _assert_same_logs(stock, weighted)
    assert logged(stock, "num_tokens") == logged(weighted, "num_tokens")
    # The per-role curves are there, and only for roles that carry weight.
    roles = {key[len("loss/"):] for entry in weighted.state.log_history for key in entry if key.startswith("loss/")}
    assert "assistant" in roles and "turn_last" in roles
    if assistant_only_loss:
        assert not roles & {"user", "system", "scaffolding"}
    else:
        assert {"user", "scaffolding"} <= roles
    # Evaluation (a dataset passed to evaluate() is prepared the same way) matches too, with per-role metrics.
    held_out = load_default_dataset().select(range(48, 56))
    expected, actual = stock.evaluate(held_out), weighted.evaluate(held_out)
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-5), key
    assert "eval_loss/assistant" in actual


@pytest.mark.parametrize("setting", [
    dict(packing=True, packing_strategy="bfd", max_length=128),
    dict(packing=True, packing_strategy="wrapped", max_length=64),
    dict(padding_free=True, max_length=None),
    dict(max_length=40, truncation_mode="keep_end"),
], ids=["packing_bfd", "packing_wrapped", "padding_free", "truncate_keep_end"])
def test_matches_stock_with_packing_padding_free_and_truncation(tokenizer, conversations, tmp_path, setting):
    stock, weighted = _train_pair(tokenizer, conversations, tmp_path, assistant_only_loss=True, **setting)
    _assert_same_logs(stock, weighted)
    assert isinstance(weighted.data_collator, WeightedDataCollator)


@pytest.mark.parametrize("kind", ["qwen2", "gemma2", "gemma2_softcap", "mixtral"])
def test_other_architectures_match_stock(tokenizer, conversations, tmp_path, kind):
    """Qwen2 (here with gradient checkpointing, SFTConfig's GPU default), Gemma-2 without and with its final logit
    softcapping (computed inside the fused loss), and Mixtral (MoE: the router load-balancing loss is added like
    TRL adds it)."""
    overrides = {"gemma2": {"final_logit_softcapping": None}, "gemma2_softcap": {"final_logit_softcapping": 2.0}}
    trainers = []
    for name, cls in (("stock", SFTTrainer), ("weighted", WeightedSFTTrainer)):
        config = sft_config(tmp_path / name, max_steps=2, gradient_checkpointing=kind == "qwen2")
        model = tiny_model(kind.split("_")[0], tokenizer, **overrides.get(kind, {}))
        trainer = cls(model, args=config, train_dataset=conversations, processing_class=tokenizer)
        trainer.train()
        trainers.append(trainer)
    _assert_same_logs(*trainers)
    if kind == "mixtral":
        assert len(logged(trainers[1], "aux_loss")) == 2
        assert logged(trainers[1], "aux_loss") == pytest.approx(logged(trainers[0], "aux_loss"), rel=1e-5)


@pytest.mark.parametrize("variant", [dict(loss_type="dft"), dict(label_smoothing_factor=0.1)],
                         ids=["dft", "label_smoothing"])
def test_loss_variants_match_stock(tokenizer, conversations, tmp_path, variant):
    """TRL's DFT loss and label smoothing (stock: full logits + LabelSmoother) computed inside the fused loss."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates label_smoothing_factor
        stock, weighted = _train_pair(tokenizer, conversations, tmp_path, max_steps=2, assistant_only_loss=True,
                                      gradient_accumulation_steps=2, per_device_train_batch_size=2, **variant)
    _assert_same_logs(stock, weighted, keys=("loss", "grad_norm"))


def test_untied_head_gets_its_gradient(tokenizer, conversations, tmp_path):
    """An untied LM head (Qwen2 default here: tie_word_embeddings=False) trains like stock."""
    stock, weighted = _train_pair(tokenizer, conversations, tmp_path, kind="qwen2", max_steps=2,
                                  assistant_only_loss=True)
    head_stock = stock.model.get_output_embeddings().weight
    head_weighted = weighted.model.get_output_embeddings().weight
    assert head_stock.data_ptr() != stock.model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(head_weighted, head_stock, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- the loss itself, by hand
def _reference_batch_loss(model, batch):
    """sum(w * CE) / sum(w) from the full logits in float64: the definition the trainer must implement."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    target = batch["labels"][:, 1:]
    weight = batch["token_weights"][:, 1:].double() * (target != -100)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp_min(0), reduction="none")
    return (weight * ce).sum() / weight.sum()


def test_weighted_loss_matches_full_logits_reference(tokenizer, conversations, tmp_path):
    """Non-uniform weights (decay, user turns at 0.25): the trainer's loss equals the float64 full-logits value."""
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.25}, decay=0.5)
    trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), args=sft_config(tmp_path), weighting=weighting,
                                 train_dataset=conversations, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    weights = batch["token_weights"]
    assert len(set(weights[weights > 0].tolist())) > 2  # really non-uniform
    trainer.model.eval()
    expected = _reference_batch_loss(trainer.model, batch)
    with torch.no_grad():
        actual = trainer.compute_loss(trainer.model, dict(batch))
    assert float(actual) == pytest.approx(float(expected), rel=1e-5)
    # A stock-normalised loss (by the token count) would differ: the normaliser is the sum of weights.
    count = (batch["labels"][:, 1:] != -100).sum()
    assert not math.isclose(float(expected) * float(weights[:, 1:].sum()) / float(count), float(expected), rel_tol=1e-3)


def test_never_divides_by_zero(tokenizer, conversations, tmp_path):
    """A (micro-)batch whose weights are all 0 gives loss 0 and zero gradients, not NaN."""
    trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), args=sft_config(tmp_path),
                                 train_dataset=conversations, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    batch["token_weights"] = torch.zeros_like(batch["token_weights"])
    for num_items in (None, torch.tensor(0.0)):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
        loss.backward()
        assert float(loss) == 0.0
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() and not g.any() for g in grads)


# ------------------------------------------------------------------------- the LM head on another device
def test_loss_inputs_move_to_the_head_device():
    """Targets keep their integer dtype, weights become float32, a tensor normaliser moves; values unchanged."""
    from fused_wce.trl_integration.trainer.lm_head import WeightedLossInputs, loss_inputs_on

    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 50, (2, 7), dtype=torch.int32, generator=generator)
    weight = (torch.rand(2, 7, generator=generator) + 0.1).to(torch.bfloat16)
    normalizer = torch.tensor(12.5, dtype=torch.float64)
    moved = loss_inputs_on(WeightedLossInputs(target, weight, normalizer), torch.device("meta"))
    assert [t.device.type for t in (moved.target, moved.weight, moved.normalizer)] == ["meta"] * 3
    assert (moved.target.dtype, moved.weight.dtype, moved.normalizer.dtype) == (torch.int32, torch.float32,
                                                                                  torch.float64)
    here = loss_inputs_on(WeightedLossInputs(target, weight, normalizer), torch.device("cpu"))
    assert torch.equal(here.target, target) and torch.equal(here.weight, weight.float())
    assert torch.equal(here.normalizer, normalizer)
    for plain in (None, 3.5):
        assert loss_inputs_on(WeightedLossInputs(target, weight, plain), torch.device("meta")).normalizer == plain


def test_trainer_gives_the_loss_its_inputs_on_the_head_device(tokenizer, conversations, tmp_path, monkeypatch):
    """With `device_map` the LM head can sit on another device than the labels. Here the untied head's weight is
    on `meta` while the backbone and the batch are on the CPU: the hidden states, targets, weights and the
    normaliser compute_loss builds on the labels' device all reach the fused loss on the head's device."""
    import fused_wce

    trainer = WeightedSFTTrainer(tiny_model("qwen2", tokenizer), args=sft_config(tmp_path),
                                 train_dataset=conversations, processing_class=tokenizer)
    trainer.model.get_output_embeddings().to("meta")
    seen = {}

    class Seen(Exception):
        pass

    def observe(hidden, weight, target, token_weight, **kwargs):
        seen.update(hidden=hidden, weight=weight, target=target, token_weight=token_weight,
                    normalizer=kwargs["normalizer"])
        raise Seen

    monkeypatch.setattr(fused_wce, "linear_cross_entropy", observe)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["labels"].device.type == "cpu"
    with pytest.raises(Seen):
        trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(10.0))
    assert {name: value.device.type for name, value in seen.items()} == dict.fromkeys(seen, "meta")
    assert len(seen) == 5


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices (backbone on cuda:0, LM head on cuda:1); the placement logic is "
                           "checked on CPU by the two tests above")
def test_head_on_another_gpu_gives_the_one_device_loss_and_gradients(tokenizer):
    """`device_map`: backbone on cuda:0, untied head on cuda:1, and the targets, weights and normaliser on cuda:0
    (where the trainer builds them from the labels): loss and gradients equal those of the model on cuda:0."""
    from accelerate import dispatch_model

    from fused_wce.trl_integration.trainer.lm_head import WeightedLossInputs, add_weighted_lm_head

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, len(tokenizer), (2, 24), generator=generator)
    target = input_ids[:, 1:].clone()
    target[0, :5] = -100
    weight = torch.rand(target.shape, generator=generator) + 0.1
    normalizer = (weight * (target != -100)).sum()
    labels_device = torch.device("cuda:0")
    results = []
    for device_map in ({"": 0}, {"model": 0, "lm_head": 1}):
        model = dispatch_model(tiny_model("qwen2", tokenizer), device_map=device_map)
        add_weighted_lm_head(model)
        assert model.get_output_embeddings().weight.device.index == device_map.get("lm_head", 0)
        loss_inputs = WeightedLossInputs(target.to(labels_device), weight.to(labels_device),
                                         normalizer.to(labels_device))
        out = model(input_ids=input_ids.to(labels_device), fused_wce_loss=loss_inputs)
        out.loss.backward()
        results.append((out.loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    (loss_one, grads_one), (loss_two, grads_two) = results
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-5, atol=1e-6)
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_two[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------ gradient accumulation and ranks
def _parameters_after(tokenizer, dataset, output_dir, weighting, **config):
    trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), args=sft_config(output_dir, **config),
                                 weighting=weighting, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_gradient_accumulation_equals_large_batch(tokenizer, conversations, tmp_path):
    """bs=1 x GA=4 == bs=4 (SGD, so parameter updates are linear in the gradient), with non-uniform weights."""
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.3}, decay=0.5)
    common = dict(max_steps=2, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant")
    big, params_big = _parameters_after(tokenizer, conversations, tmp_path / "big", weighting,
                                        per_device_train_batch_size=4, **common)
    accumulated, params_acc = _parameters_after(tokenizer, conversations, tmp_path / "ga", weighting,
                                                per_device_train_batch_size=1, gradient_accumulation_steps=4,
                                                **common)
    assert logged(accumulated, "loss") == pytest.approx(logged(big, "loss"), rel=1e-5)
    initial = {name: p.detach() for name, p in tiny_model("llama", tokenizer).named_parameters()}
    for name, param in params_big.items():
        update_big, update_acc = param - initial[name], params_acc[name] - initial[name]
        assert update_big.abs().max() > 0, name
        torch.testing.assert_close(update_acc, update_big, rtol=1e-4, atol=1e-6, msg=name)


def test_two_process_data_parallel_equals_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo) x bs=2  ==  1 process x bs=4: same losses and parameters."""
    worker = TESTS / "ddp_worker.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(TESTS.parent)]))}
    results = {}
    for processes, batch in ((2, 2), (1, 4)):
        out = tmp_path / f"p{processes}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(worker), str(out), str(batch)]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        results[processes] = (json.loads((out / "losses.json").read_text()), torch.load(out / "params.pt"))
    (losses_2, params_2), (losses_1, params_1) = results[2], results[1]
    assert losses_2 == pytest.approx(losses_1, rel=1e-5)
    for name in params_1:
        torch.testing.assert_close(params_2[name], params_1[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ logged metrics
def _group_reference(model, batches):
    """Float64 full-logits reference of the logged metrics over ``batches`` (evaluation: fixed parameters).

    Per-group mean CE of the counted targets (label != -100 and weight > 0), grouped by the batch's own codes; the
    entropy and top-1 accuracy of the counted targets per micro-batch, averaged over the micro-batches."""
    from fused_wce.trl_integration.token_codes import TURN_POSITIONS

    roles = ["scaffolding", *sorted(ROLE_CODES, key=ROLE_CODES.get)]
    sums, entropies, accuracies = {}, [], []
    for batch in batches:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        logits, target = logits[:, :-1], batch["labels"][:, 1:]
        counted = (target != -100) & (batch["token_weights"][:, 1:] > 0)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
        log_p = logits.log_softmax(-1)
        entropies.append(float(-(log_p.exp() * log_p).sum(-1)[counted].mean()))
        accuracies.append(float((logits.argmax(-1) == target)[counted].double().mean()))
        codes = {name: batch[name][:, 1:] for name in ("token_roles", "token_turn_positions", "token_turn_index")}
        for b, t in counted.nonzero().tolist():
            role, position, index = (int(codes[name][b, t]) for name in codes)
            groups = [roles[role + 1], f"turn_{min(index, 4) + 1}" + ("+" if index >= 4 else "")] if index >= 0 \
                else [roles[role + 1]]
            groups += [f"turn_{TURN_POSITIONS[position]}"] if position >= 0 else []
            for group in groups:
                total = sums.setdefault(group, [0.0, 0])
                total[0] += float(ce[b, t])
                total[1] += 1
    return ({name: total / count for name, (total, count) in sums.items()},
            sum(entropies) / len(entropies), sum(accuracies) / len(accuracies))


def test_logged_metrics_match_a_float64_reference(tokenizer, conversations, tmp_path):
    """Per-role, per-turn-position and per-turn-index losses, entropy and accuracy of an evaluation over three
    micro-batches (summed on the device, read at the log) equal the full-logits float64 values."""
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5, "tool": 0.3}, full_sequence=False)
    trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), weighting=weighting,
                                 args=sft_config(tmp_path, per_device_eval_batch_size=4),
                                 train_dataset=conversations, eval_dataset=conversations.select(range(12)),
                                 processing_class=tokenizer)
    batches = list(trainer.get_eval_dataloader())
    assert len(batches) == 3
    trainer.model.eval()
    groups, entropy, accuracy = _group_reference(trainer.model, batches)
    logged_values = trainer.evaluate()
    logged_groups = {key[len("eval_loss/"):]: value for key, value in logged_values.items()
                     if key.startswith("eval_loss/")}
    assert set(logged_groups) == set(groups) and {"user", "tool", "turn_2", "turn_last"} <= set(groups)
    for name, value in groups.items():
        assert logged_groups[name] == pytest.approx(value, rel=1e-5), name
    assert logged_values["eval_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert logged_values["eval_mean_token_accuracy"] == pytest.approx(accuracy, rel=1e-9)


def _cast_outputs_to_bf16(module, args, output):
    """What FSDP2's ``MixedPrecisionPolicy(output_dtype=torch.bfloat16)`` does after a unit's forward."""
    from torch.distributed.utils import _apply_to_tensors

    return _apply_to_tensors(lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, output)


def test_logged_values_stay_float32_when_a_policy_casts_the_outputs(tokenizer, conversations, tmp_path):
    """With the model's and the head's outputs cast to bf16 (FSDP2 ``output_dtype``), the logged loss, group
    losses, entropy and gradient norm are those of the run without the cast, bit for bit."""
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5})
    runs = []
    for cast in (False, True):
        trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), weighting=weighting,
                                     args=sft_config(tmp_path / str(cast)), train_dataset=conversations,
                                     processing_class=tokenizer)
        if cast:
            trainer.model.register_forward_hook(_cast_outputs_to_bf16)
            trainer.model.lm_head.register_forward_hook(_cast_outputs_to_bf16)
        trainer.train()
        runs.append(trainer)
    plain, cast = runs
    for key in ("loss", "loss/assistant", "loss/user", "entropy", "grad_norm"):
        values = logged(plain, key)
        assert len(values) == 3 and logged(cast, key) == values, key
        assert any(float(torch.tensor(v).bfloat16()) != v for v in values), key  # bf16 would have rounded them


class _HostSyncs:
    """Counts the tensor -> host conversions (``item``, ``tolist``, ``bool()``, ``float()``, ``int()``,
    ``numpy``, ``cpu``) made outside a model call (the backbone and the fused loss op may synchronise)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")

    def __init__(self, monkeypatch, model):
        self.calls, self.paused = [], 0
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        forward = model.forward

        def forward_not_counted(*args, **kwargs):
            self.paused += 1
            try:
                return forward(*args, **kwargs)
            finally:
                self.paused -= 1

        monkeypatch.setattr(model, "forward", forward_not_counted)

    def _counting(self, name, original):
        def counting(tensor, *args, **kwargs):
            if not self.paused:
                self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return counting


def test_metrics_synchronise_once_per_logging_step_not_per_micro_batch(tokenizer, conversations, tmp_path,
                                                                        monkeypatch):
    """compute_loss reads nothing back to the host outside the model call (adaptive weights, padding-free and
    MoE included); the logging step reads the window back once."""
    from fused_wce.trl_integration import AdaptiveTurnWeights

    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5}, adaptive=AdaptiveTurnWeights())
    for kind, config in (("llama", {}), ("mixtral", {"padding_free": True, "max_length": None})):
        trainer = WeightedSFTTrainer(tiny_model(kind, tokenizer), args=sft_config(tmp_path / kind, **config),
                                     weighting=weighting, train_dataset=conversations, processing_class=tokenizer)
        loader = iter(trainer.get_train_dataloader())
        batches = [next(loader), next(loader)]
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = len(batches)  # set by the training loop
        normaliser = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
        syncs = _HostSyncs(monkeypatch, trainer.model)
        for batch in batches:
            trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=normaliser).backward()
        assert syncs.calls == [], kind
        logs = {"loss": 1.0}
        trainer.log(logs)
        assert syncs.calls == ["tolist"], kind
        assert "loss/assistant" in logs and trainer.state.log_history[-1]["num_tokens"] > 0
        assert kind != "mixtral" or "aux_loss" in trainer.state.log_history[-1]
        monkeypatch.undo()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode); the CPU test "
                                                          "above counts host conversions instead")
def test_metrics_do_not_synchronise_the_gpu_per_micro_batch(tokenizer, conversations, tmp_path, monkeypatch):
    """On CUDA with sync debug mode "error", compute_loss outside the model call does not synchronise."""
    from fused_wce.trl_integration import AdaptiveTurnWeights

    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5}, adaptive=AdaptiveTurnWeights())
    trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), args=sft_config(tmp_path, use_cpu=False),
                                 weighting=weighting, train_dataset=conversations, processing_class=tokenizer)
    loader = iter(trainer.get_train_dataloader())
    batches = [next(loader), next(loader)]
    assert batches[0]["input_ids"].is_cuda
    trainer.model.train()
    normaliser = trainer._get_num_items_in_batch(batches, batches[0]["input_ids"].device)
    forward = trainer.model.forward

    def forward_may_synchronise(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(trainer.model, "forward", forward_may_synchronise)
    try:
        for batch in batches:
            torch.cuda.set_sync_debug_mode("error")
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=normaliser)
            torch.cuda.set_sync_debug_mode(0)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert "loss/assistant" in logs


# ------------------------------------------------------------------------------- alignment through packing
def _segments(row):
    """Split a packed row back into its documents with ``seq_lengths``."""
    start = 0
    for length in row["seq_lengths"]:
        yield {key: row[key][start:start + length] for key in ("input_ids", "token_weights", "token_roles",
                                                                "token_turn_positions", "token_turn_index")}
        start += length


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packing_keeps_weights_roles_and_turns_aligned(tokenizer, conversations, tmp_path, strategy):
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5}, decay=0.7)
    trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), weighting=weighting, train_dataset=conversations,
                                 processing_class=tokenizer,
                                 args=sft_config(tmp_path, packing=True, packing_strategy=strategy, max_length=96))
    originals = [tokenize_with_weights(tokenizer, m, weighting) for m in conversations["messages"]]
    stream = {key: [v for o in originals for v in o[key]] for key in originals[0]}
    packed = trainer.train_dataset
    assert {"token_weights", "token_roles", "token_turn_positions", "token_turn_index", "labels"} <= set(
        packed.column_names)
    if strategy == "wrapped":  # one stream cut into rows: the concatenation is the original stream, in some order
        rows = sorted((row for row in packed), key=lambda r: r["input_ids"])
        assert sum(len(r["input_ids"]) for r in rows) == len(stream["input_ids"])
    checked = 0
    for row in packed:
        assert len(row["token_weights"]) == len(row["input_ids"]) == len(row["labels"])
        assert [lab != -100 for lab in row["labels"]] == [w > 0 for w in row["token_weights"]]
        if strategy != "bfd":
            continue
        for segment in _segments(row):  # each document is a prefix of one original conversation, all columns
            length = len(segment["input_ids"])
            match = [o for o in originals if o["input_ids"][:length] == segment["input_ids"]]
            assert match, "packed document matches no conversation"
            assert any(all(o[key][:length] == segment[key] for key in segment) for o in match)
            checked += 1
    assert strategy != "bfd" or checked >= len(conversations)

    # The collator pads (wrapped) or flattens (bfd: padding-free) the per-token columns like the input ids.
    batch = trainer.data_collator([packed[0], packed[1]])
    for key in ("token_weights", "token_roles", "token_turn_positions", "token_turn_index"):
        assert batch[key].shape == batch["input_ids"].shape
    if strategy == "bfd":
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
        starts = batch["position_ids"] == 0
        assert not batch["token_weights"][starts].any()  # a document's first token is never a target


def test_truncation_keeps_columns_aligned_and_drops_unweighted(tokenizer, tmp_path):
    weighting = TurnWeighting(role_weights={"assistant": 1.0})
    messages = [[{"role": "user", "content": "tell me about python code please " * 3},
                 {"role": "assistant", "content": "the cat sat on a mat"}],
                [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]]
    dataset = Dataset.from_dict({"messages": messages})
    encoded = [tokenize_with_weights(tokenizer, m, weighting) for m in messages]
    first_weighted = [next(i for i, w in enumerate(e["token_weights"]) if w > 0) for e in encoded]
    max_length = first_weighted[1] + 3  # keeps 3 weighted tokens of the short one, none of the long one
    assert first_weighted[0] >= max_length
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), weighting=weighting, train_dataset=dataset,
                                     processing_class=tokenizer, args=sft_config(tmp_path, max_length=max_length))
    (row,) = list(trainer.train_dataset)
    original = encoded[1]
    for key in ("input_ids", "token_weights", "token_roles", "token_turn_positions", "token_turn_index"):
        assert row[key] == original[key][:max_length]


# ---------------------------------------------------------------------------------------------------- LoRA
def test_lora_with_frozen_head_trains_adapters_only(tokenizer, conversations, tmp_path):
    from peft import LoraConfig

    model = tiny_model("qwen2", tokenizer)
    head_before = model.get_output_embeddings().weight.detach().clone()
    trainer = WeightedSFTTrainer(model, args=sft_config(tmp_path, max_steps=3, learning_rate=1e-2),
                                 train_dataset=conversations, processing_class=tokenizer,
                                 peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                 weighting=TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5}))
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    head = trainer.model.get_output_embeddings().weight
    assert not head.requires_grad and head.grad is None
    torch.testing.assert_close(head, head_before, rtol=0, atol=0)
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
    changed = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, lora[n])]
    assert changed  # the adapters were trained


def test_lora_on_the_head_itself_is_a_clear_error(tokenizer):
    """A LoRA adapter on lm_head would be ignored by a loss that reads the head's weight: refuse it loudly (TRL's
    SFTTrainer already refuses it at init; add_weighted_lm_head is public and must refuse it too)."""
    from peft import LoraConfig, get_peft_model

    from fused_wce.trl_integration.trainer.lm_head import WeightedLossInputs, add_weighted_lm_head

    model = get_peft_model(tiny_model("qwen2", tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    add_weighted_lm_head(model.get_base_model())
    input_ids = torch.randint(3, 100, (2, 12))
    target = input_ids[:, 1:]
    loss_inputs = WeightedLossInputs(target, torch.ones(target.shape), torch.tensor(22.0))
    with pytest.raises(NotImplementedError, match="LoRA adapters on the LM head"):
        model(input_ids=input_ids, fused_wce_loss=loss_inputs)


def test_lean_memory_trains_like_the_default(tokenizer, conversations, tmp_path):
    """bf16 head, lean_memory=True: the loss and the trained head match the default plan up to bf16 rounding."""
    trainers = []
    for lean in (False, True):
        model = tiny_model("qwen2", tokenizer).to(torch.bfloat16)
        trainer = WeightedSFTTrainer(model, args=sft_config(tmp_path / str(lean), max_steps=2), lean_memory=lean,
                                     train_dataset=conversations, processing_class=tokenizer)
        trainer.train()
        trainers.append(trainer)
    default, lean = trainers
    assert logged(lean, "loss") == pytest.approx(logged(default, "loss"), rel=1e-2)
    head_default = default.model.get_output_embeddings().weight.float()
    head_lean = lean.model.get_output_embeddings().weight.float()
    torch.testing.assert_close(head_lean, head_default, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------------------------------ bad data
@pytest.mark.parametrize("bad, match", [
    ({"role": "assistant", "content": "x", "weight": -1}, "train dataset row 5: message 1 key 'weight'"),
    ({"role": "bot", "content": "x"}, "train dataset row 5: message 1: unknown 'role' 'bot'"),
])
def test_bad_row_in_a_dataset_names_its_index(tokenizer, conversations, tmp_path, bad, match):
    rows = [[{"role": "user", "content": f"hi {k}"}, {"role": "assistant", "content": "hello"}] for k in range(8)]
    rows[5] = [{"role": "user", "content": "hi"}, bad]
    with pytest.raises(ValueError, match=match):
        WeightedSFTTrainer(tiny_model("llama", tokenizer), args=sft_config(tmp_path, max_steps=1),
                           train_dataset=Dataset.from_dict({"messages": rows}), processing_class=tokenizer,
                           weighting=TurnWeighting())


def test_conversation_without_weighted_token_is_dropped_with_a_warning(tokenizer, conversations, tmp_path):
    no_assistant = [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "hello"}]
    dataset = Dataset.from_dict({"messages": list(conversations["messages"][:8]) + [no_assistant]})
    with pytest.warns(UserWarning, match="dropped 1 of 9"):
        trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), args=sft_config(tmp_path, max_steps=1),
                                     train_dataset=dataset, processing_class=tokenizer,
                                     weighting=TurnWeighting(role_weights={"assistant": 1.0}))
    assert len(trainer.train_dataset) == 8
    trainer.train()
    assert math.isfinite(logged(trainer, "loss")[0])


def test_dataset_with_nothing_weighted_is_an_error(tokenizer, tmp_path):
    dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": "hello"}]] * 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match="nothing to train on"):
            WeightedSFTTrainer(tiny_model("llama", tokenizer), args=sft_config(tmp_path), train_dataset=dataset,
                               processing_class=tokenizer, weighting=TurnWeighting())


def test_missing_messages_column_is_a_clear_error(tokenizer, tmp_path):
    dataset = Dataset.from_dict({"conversation_text": ["hello there", "general kenobi"]})
    with pytest.raises(ValueError, match="messages"):
        WeightedSFTTrainer(tiny_model("llama", tokenizer), args=sft_config(tmp_path), train_dataset=dataset,
                           processing_class=tokenizer, weighting=TurnWeighting())


def test_text_dataset_without_weighting_falls_back_to_trl_labels(tokenizer, tmp_path):
    """No `messages` and no explicit weighting: TRL's own preparation, weight 1 on its labels == stock."""
    dataset = Dataset.from_dict({"text": ["the cat sat on a mat " * 3, "hello world how is your code " * 2] * 8})
    stock, weighted = _train_pair(tokenizer, dataset, tmp_path, max_steps=2)
    _assert_same_logs(stock, weighted)


def test_role_codes_cover_logged_roles():
    """The logged role names are the weighting module's (guards against the two code tables drifting apart)."""
    from fused_wce.trl_integration.trainer.metrics import ROLE_GROUPS

    assert set(ROLE_GROUPS) == {"scaffolding", *ROLE_CODES}
