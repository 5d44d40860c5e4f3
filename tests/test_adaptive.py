"""Adaptive turn weights: the update rule (EMA, normalisation, bounds, warmup), and inside WeightedSFTTrainer."""
from __future__ import annotations

import math

import pytest

from trl_helpers import logged, sft_config, tiny_model  # noqa: I001  (sets HF_HUB_OFFLINE first)

import torch

from fused_wce.trl_integration import TurnWeighting, WeightedSFTTrainer
from fused_wce.trl_integration.chat_data import load_default_dataset
from fused_wce.trl_integration.chat_weights.adaptive import AdaptiveTurnWeights, AdaptiveWeightState
from fused_wce.trl_integration.token_codes import turn_index_names


def _mean(state: AdaptiveWeightState) -> float:
    """The token-weighted mean of the multipliers over the groups seen so far."""
    counts = state.ema_count
    return sum(c * m for c, m in zip(counts, state.multipliers)) / sum(counts)


def _snapshot(state: AdaptiveWeightState) -> tuple:
    return state.updates, list(state.ema_loss), list(state.ema_count), state.multipliers


# ---------------------------------------------------------------------------------------------- update rule
def test_multipliers_follow_the_loss_and_average_one():
    state = AdaptiveTurnWeights(ema_decay=0.0).new_state()
    assert state.names == ("turn_1", "turn_2", "turn_3", "turn_4", "turn_5+")
    losses, counts = [1.0, 2.0, 3.0, 1.5, 2.5], [40, 30, 20, 10, 5]
    assert state.update([l * c for l, c in zip(losses, counts)], counts)
    multipliers = state.multipliers
    assert _mean(state) == pytest.approx(1.0, abs=1e-12)
    # Unclipped: exactly proportional to the loss.
    ratios = [m / l for m, l in zip(multipliers, losses)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)
    expected_scale = sum(counts) / sum(l * c for l, c in zip(losses, counts))
    assert ratios[0] == pytest.approx(expected_scale, rel=1e-12)


def test_ema_by_hand_and_power():
    state = AdaptiveTurnWeights(groups="role", ema_decay=0.75, power=2.0).new_state()
    assert state.names == ("system", "user", "assistant", "tool")
    state.update([0.0, 0.0, 20.0, 0.0], [0, 0, 10, 0])           # assistant mean 2; first value taken as is
    state.update([0.0, 0.0, 40.0, 30.0], [0, 0, 10, 10])         # assistant mean 4, tool seen first: 3
    assert state.ema_loss == [None, None, 0.75 * 2.0 + 0.25 * 4.0, 3.0]
    assert state.ema_count == [0.0, 0.0, 10.0, 10.0]
    assistant, tool = state.multipliers[2], state.multipliers[3]
    assert assistant / tool == pytest.approx((2.5 / 3.0) ** 2, rel=1e-12)
    assert state.multipliers[:2] == (1.0, 1.0)  # never seen: neutral
    assert _mean(state) == pytest.approx(1.0, abs=1e-12)


def test_bounds_hold_and_the_mean_stays_one():
    config = AdaptiveTurnWeights(ema_decay=0.0, min_weight=0.5, max_weight=2.0)
    state = config.new_state()
    losses, counts = [0.01, 1.0, 1.0, 1.0, 100.0], [10, 10, 10, 10, 10]
    state.update([l * c for l, c in zip(losses, counts)], counts)
    assert min(state.multipliers) == pytest.approx(0.5) and max(state.multipliers) == pytest.approx(2.0)
    assert all(0.5 - 1e-12 <= m <= 2.0 + 1e-12 for m in state.multipliers)
    assert _mean(state) == pytest.approx(1.0, abs=1e-12)


def test_warmup_power_zero_and_empty_steps():
    state = AdaptiveTurnWeights(ema_decay=0.0, warmup_steps=2).new_state()
    sums, counts = [1.0, 4.0, 0.0, 0.0, 0.0], [1, 1, 0, 0, 0]
    for _ in range(2):
        state.update(sums, counts)
        assert state.multipliers == (1.0,) * 5  # warming up: the averages run, the multipliers wait
    state.update(sums, counts)
    assert state.multipliers[1] == pytest.approx(4 * state.multipliers[0])
    before = _snapshot(state)
    assert not state.update([0.0] * 5, [0] * 5)  # a step without counted tokens changes nothing
    assert _snapshot(state) == before

    flat = AdaptiveTurnWeights(power=0.0).new_state()
    flat.update([1.0, 9.0, 3.0, 0.0, 0.0], [1, 1, 1, 0, 0])
    assert flat.multipliers == pytest.approx((1.0,) * 5)


def test_group_codes():
    roles = torch.tensor([[-1, 0, 1, 2, 3, 2]])
    turns = torch.tensor([[-1, 0, 0, 1, 7, 4]])
    by_turn = AdaptiveTurnWeights(max_turn_index=3).new_state()
    assert by_turn.names == turn_index_names(3) == ("turn_1", "turn_2", "turn_3+")
    assert by_turn.group_codes(roles, turns).tolist() == [[0, 1, 1, 2, 3, 3]]
    by_role = AdaptiveTurnWeights(groups="role").new_state()
    assert by_role.group_codes(roles, turns).tolist() == [[0, 1, 2, 3, 4, 3]]
    assert by_role.factor_table().tolist() == [1.0] * 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(groups="turns"), "groups must be one of"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
    (dict(power=-1), "power must be in"),
    (dict(min_weight=0), "min_weight must be in"),
    (dict(max_weight=0.5), "max_weight must be in"),
    (dict(warmup_steps=-1), "warmup_steps must be an int"),
    (dict(max_turn_index=0), "max_turn_index must be an int"),
    (dict(power=float("nan")), "power must be a finite number"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveTurnWeights(**kwargs)


def test_cli_form():
    assert AdaptiveTurnWeights.from_cli(None) is None and AdaptiveTurnWeights.from_cli("none") is None
    assert AdaptiveTurnWeights.from_cli("Role", ema_decay=0.5).groups == "role"
    with pytest.raises(ValueError, match="^--adaptive_power must be"):
        AdaptiveTurnWeights.from_cli("turn", power=-2)
    with pytest.raises(ValueError, match="^--adaptive must be one of"):
        AdaptiveTurnWeights.from_cli("stage")
    with pytest.raises(TypeError, match="adaptive must be an AdaptiveTurnWeights"):
        TurnWeighting(adaptive="turn")


# ------------------------------------------------------------------------------------------------ in training
@pytest.fixture(scope="module")
def conversations():
    return load_default_dataset().select(range(32))


def _train(tokenizer, dataset, output_dir, weighting, **config):
    trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), args=sft_config(output_dir, **config),
                                 train_dataset=dataset, processing_class=tokenizer, weighting=weighting)
    trainer.train()
    return trainer


def test_training_is_deterministic_and_logs_the_multipliers(tokenizer, conversations, tmp_path):
    weighting = TurnWeighting(adaptive=AdaptiveTurnWeights(ema_decay=0.5, min_weight=0.1, max_weight=10.0))
    first = _train(tokenizer, conversations, tmp_path / "a", weighting, max_steps=4, learning_rate=5e-3)
    second = _train(tokenizer, conversations, tmp_path / "b", weighting, max_steps=4, learning_rate=5e-3)
    names = first._adaptive.names
    for key in ["loss", "grad_norm"] + [f"weight/{name}" for name in names]:
        assert logged(first, key) == logged(second, key), key  # bit for bit
    assert _snapshot(first._adaptive) == _snapshot(second._adaptive)
    steps = [[entry[f"weight/{name}"] for name in names] for entry in first.state.log_history if "loss" in entry]
    assert steps[0] == [1.0] * len(names)  # the first step has no history yet
    assert any(abs(m - 1.0) > 1e-3 for m in steps[-1])  # ... later ones moved
    assert _mean(first._adaptive) == pytest.approx(1.0, abs=1e-9)


def test_power_zero_changes_nothing(tokenizer, conversations, tmp_path):
    """Adaptive with power 0 (every multiplier 1) trains exactly like fixed weights; eval is never adapted."""
    plain = _train(tokenizer, conversations, tmp_path / "plain", TurnWeighting(), max_steps=3)
    inert = _train(tokenizer, conversations, tmp_path / "inert", TurnWeighting(adaptive=AdaptiveTurnWeights(power=0)),
                   max_steps=3)
    assert logged(inert, "loss") == logged(plain, "loss")
    assert logged(inert, "grad_norm") == logged(plain, "grad_norm")
    assert not any(key.startswith("weight/") for entry in plain.state.log_history for key in entry)


def test_loss_and_normaliser_use_the_same_multipliers(tokenizer, conversations, tmp_path):
    """In training, loss = sum(w m l) / sum(w m) (float64 full-logits reference); in evaluation the plain weights."""
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5},
                              adaptive=AdaptiveTurnWeights(groups="turn", ema_decay=0.0))
    trainer = WeightedSFTTrainer(tiny_model("llama", tokenizer), args=sft_config(tmp_path), weighting=weighting,
                                 train_dataset=conversations, processing_class=tokenizer)
    state = trainer._adaptive_state()
    state.multipliers = (0.5, 2.0, 1.0, 3.0, 0.25)  # any multipliers: the loss must be their weighted mean
    batch = next(iter(trainer.get_train_dataloader()))
    factors = torch.tensor((1.0,) + state.multipliers, dtype=torch.float64)
    turn = batch["token_turn_index"][:, 1:]
    codes = torch.where(turn >= 0, turn.clamp_max(4) + 1, torch.zeros_like(turn))
    assert (codes >= 2).any()  # later turns present, so the multipliers matter

    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    target = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp_min(0), reduction="none")
    weight = batch["token_weights"][:, 1:].double() * (target != -100)
    adapted = weight * factors[codes]

    trainer.model.train()
    normaliser = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    assert float(normaliser) == pytest.approx(float(adapted.sum()), rel=1e-6)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=normaliser)
    assert float(loss) == pytest.approx(float((adapted * ce).sum() / adapted.sum()), rel=1e-5)
    assert not math.isclose(float(loss), float((weight * ce).sum() / weight.sum()), rel_tol=1e-4)
    # The per-turn sums of the next update (kept on the device until the next step reads them): the unweighted CE
    # and the number of counted tokens of each turn group.
    pending = trainer._adaptive_pending.tolist()
    for group in range(5):
        tokens = (codes == group + 1) & (weight > 0)
        assert pending[group] == pytest.approx(float(ce[tokens].sum()), rel=1e-5), group
        assert pending[5 + group] == int(tokens.sum()), group

    trainer.model.eval()
    with torch.no_grad():
        eval_loss = trainer.compute_loss(trainer.model, dict(batch))
    assert float(eval_loss) == pytest.approx(float((weight * ce).sum() / weight.sum()), rel=1e-5)
