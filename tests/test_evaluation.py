"""Held-out evaluation: per-conversation measurements against full-logit references, greedy replies (batched,
cached and one by one agree), answer scoring, labels."""
from __future__ import annotations

import math

import numpy as np
import pytest

from trl_helpers import tiny_model  # noqa: I001  (sets HF_HUB_OFFLINE first)

import torch

from fused_wce.trl_integration.chat_weights.tokenize import tokenize_with_weights
from fused_wce.trl_integration.chat_weights.turn_weighting import TurnWeighting
from fused_wce.trl_integration.evaluation import measure, model_calls
from fused_wce.trl_integration.evaluation.measure import (EvaluationOptions, Measurements, Tally, check_labels,
                                                          contains_fact, conversation_tally, evaluate_conversations,
                                                          without_history)

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "My name is Mei."},
    {"role": "assistant", "content": "Your name is Mei.", "needs_history": False},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "3 + 4 = 8.", "weight": 0, "needs_history": False, "expected": "8"},
    {"role": "user", "content": "That is wrong."},
    {"role": "assistant", "content": "3 + 4 = 7.", "needs_history": True, "expected": "7"},
    {"role": "user", "content": "What is my name?"},
    {"role": "assistant", "content": "Your name is Mei.", "needs_history": True, "expected": "Mei"},
]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return tiny_model("llama", tokenizer, seed=3).eval()


def _reference_losses(model, tokenizer, messages, ordinal):
    """Float64 per-token losses of the ``ordinal``-th assistant message given ``messages``, from full logits."""
    encoded = tokenize_with_weights(tokenizer, messages, TurnWeighting(full_sequence=True))
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    positions = [t for t in range(1, ids.shape[1])
                 if encoded["token_roles"][t] == 2 and encoded["token_turn_index"][t] == ordinal]
    return torch.nn.functional.cross_entropy(logits[[t - 1 for t in positions]], ids[0, positions],
                                             reduction="none").numpy()


def test_context_dependence_by_hand(model, tokenizer):
    tally = conversation_tally(model, tokenizer, CONVERSATION, EvaluationOptions(answers="none")).entries
    # Message 6 (3rd assistant, needs history): its exchange is "That is wrong." only.
    with_history = _reference_losses(model, tokenizer, CONVERSATION[:7], 2)
    without = _reference_losses(model, tokenizer, [CONVERSATION[0]] + CONVERSATION[5:7], 0)
    # Message 8 (4th assistant, needs history).
    with_8 = _reference_losses(model, tokenizer, CONVERSATION, 3)
    without_8 = _reference_losses(model, tokenizer, [CONVERSATION[0]] + CONVERSATION[7:], 0)
    n6, n8 = len(with_history), len(with_8)
    expected = (with_history.mean() * n6 + with_8.mean() * n8, n6 + n8, 2)
    assert tally[("loss_with_history", "history/needed")] == pytest.approx(expected, rel=1e-5)
    difference = (without.mean() - with_history.mean()) * n6 + (without_8.mean() - with_8.mean()) * n8
    assert tally[("context_dependence", "history/needed")][0] == pytest.approx(difference, rel=1e-4, abs=1e-6)
    # Message 2 has no earlier exchange; message 4 has weight 0: neither is measured for context.
    assert tally[("context_dependence", "all")][2] == 2 and ("context_dependence", "history/not_needed") not in tally
    assert tally[("context_dependence", "turn/turn_3")][2] == 1 and tally[("context_dependence", "turn/turn_4")][2] == 1


def test_losses_per_group_by_hand(model, tokenizer):
    tally = conversation_tally(model, tokenizer, CONVERSATION, EvaluationOptions(answers="none")).entries
    first = _reference_losses(model, tokenizer, CONVERSATION[:3], 0)
    assert tally[("loss", "turn/turn_1")] == pytest.approx((first.sum(), len(first), 1), rel=1e-5)
    assert tally[("loss", "history/not_needed")] == pytest.approx((first.sum(), len(first), 1), rel=1e-5)
    assert ("loss", "turn/turn_2") not in tally  # weight 0: left out
    assistant = tally[("loss", "role/assistant")]
    assert assistant[2] == 3 and assistant[1] == sum(tally[("loss", f"turn/turn_{k}")][1] for k in (1, 3, 4))
    assert tally[("loss", "role/user")][2] == 4 and tally[("loss", "role/system")][2] == 1
    encoded = tokenize_with_weights(tokenizer, CONVERSATION, TurnWeighting(full_sequence=True))
    counted = sum(w > 0 for w in encoded["token_weights"][1:])
    assert tally[("loss", "full_sequence")][1] == counted


def test_max_length_cuts_the_measurement(model, tokenizer):
    encoded = tokenize_with_weights(tokenizer, CONVERSATION, TurnWeighting(full_sequence=True))
    limit = len(encoded["input_ids"]) - 3  # the last message is cut off
    tally = conversation_tally(model, tokenizer, CONVERSATION, EvaluationOptions(max_length=limit,
                                                                                 answers="none")).entries
    assert tally[("loss", "full_sequence")][1] == sum(w > 0 for w in encoded["token_weights"][1:limit])
    assert tally[("context_dependence", "all")][2] == 1  # only message 6 fits


def test_batched_losses_equal_one_by_one(model, tokenizer):
    sequences = [tokenizer.apply_chat_template(CONVERSATION[:k], tokenize=True, return_dict=True)["input_ids"]
                 for k in (3, 5, 9)]
    with torch.no_grad():
        batched = model_calls.token_losses(model, sequences)
        for sequence, losses in zip(sequences, batched):
            alone = model_calls.token_losses(model, [sequence])[0]
            assert len(losses) == len(sequence) and math.isnan(losses[0])
            np.testing.assert_allclose(losses[1:], alone[1:], rtol=1e-5, atol=1e-6)


def test_greedy_replies_batched_cached_and_alone_agree(model, tokenizer):
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    prompts = [model_calls.prompt_ids(tokenizer, CONVERSATION[:i]) for i in (2, 4, 6, 8)]
    assert all(prompt == full[:len(prompt)] for prompt in prompts)
    with torch.no_grad():
        alone = [model_calls.greedy_replies(model, tokenizer, [prompt], 8)[0] for prompt in prompts]
        batched = model_calls.greedy_replies(model, tokenizer, prompts, 8)
        (_,), cache = model_calls.token_losses(model, [full], keep_cache=True)
        cached = model_calls.replies_in_context(model, tokenizer, prompts, full, cache, 8)
        not_prefix = model_calls.replies_in_context(model, tokenizer, prompts, full[1:], cache, 8)
    assert batched == alone and cached == alone and not_prefix == alone
    assert all(isinstance(reply, str) for reply in alone) and any(alone)
    assert all(len(tokenizer(reply)["input_ids"]) <= 8 for reply in alone)


def test_answer_scores(monkeypatch, model, tokenizer):
    """Exact, contains and the control, from given replies (the model's replies are what the tests above check)."""
    replies = {6: "3 + 4 = 7.", 8: "Your name is mei!"}
    guesses = {6: "It is 17.", 8: "Your name is Mei."}
    monkeypatch.setattr(measure, "replies_in_context", lambda m, t, prompts, *a: [replies[i] for i in (6, 8)])
    monkeypatch.setattr(measure, "greedy_replies", lambda m, t, prompts, n: [guesses[i] for i in (6, 8)][:len(prompts)])
    tally = conversation_tally(model, tokenizer, CONVERSATION, EvaluationOptions()).entries
    assert tally[("answer_exact", "history/needed")] == [1.0, 2, 2]  # message 4 (weight 0) is not scored
    assert tally[("answer_contains", "history/needed")] == [2.0, 2, 2]  # case-insensitive "Mei"
    assert tally[("answer_contains_without_history", "history/needed")] == [1.0, 2, 2]  # "17" does not contain "7"


@pytest.mark.parametrize("reply, fact, found", [
    ("You have 12 coins.", "12", True), ("You have 120 coins.", "12", False), ("12.", "12", True),
    ("It is in NEW DELHI", "New Delhi", True), ("Delhi", "New Delhi", False), ("priya", "Priya", True),
    ("cats", "cat", False), ("a cat-like pet", "cat", True)])
def test_contains_fact(reply, fact, found):
    assert contains_fact(reply, fact) is found


def test_without_history():
    assert without_history(CONVERSATION, 2) is None  # the first exchange has no history
    assert without_history(CONVERSATION, 6) == [CONVERSATION[0]] + CONVERSATION[5:7]
    no_system = CONVERSATION[1:]
    assert without_history(no_system, 1) is None and without_history(no_system, 3) == no_system[2:4]


def test_labels_are_checked():
    check_labels([CONVERSATION], "data.jsonl")
    bad = [dict(m) for m in CONVERSATION]
    bad[2]["needs_history"] = "yes"
    with pytest.raises(ValueError, match=r"data.jsonl: row 1: message 2: 'needs_history' must be true or false"):
        check_labels([CONVERSATION, bad], "data.jsonl")
    bad[2] = {"role": "assistant", "content": "x", "expected": ""}
    with pytest.raises(ValueError, match="'expected' must be a non-empty string"):
        check_labels([bad], "data.jsonl")


def test_measurements_are_ratios_of_sums():
    tallies = [Tally(), Tally(), Tally()]
    tallies[0].add("loss", ["a", "b"], 6.0, 3, 1)
    tallies[1].add("loss", ["a"], 1.0, 1, 1)
    measured = Measurements.from_tallies(tallies)
    assert measured.conversations == 3
    np.testing.assert_array_equal(measured.sums[("loss", "a")], [6.0, 1.0, 0.0])
    assert measured.value("loss", "a") == pytest.approx(7 / 4) and measured.value("loss", "b") == 2.0
    assert measured.total("loss", "a") == (4, 2) and math.isnan(measured.value("loss", "c"))


def test_evaluate_conversations_restores_training_mode(model, tokenizer):
    model.train()
    measured = evaluate_conversations(model, tokenizer, [CONVERSATION, CONVERSATION[:3]],
                                      EvaluationOptions(answers="none"))
    assert model.training and measured.conversations == 2
    model.eval()
    single = conversation_tally(model, tokenizer, CONVERSATION, EvaluationOptions(answers="none")).entries
    assert measured.sums[("loss", "role/user")][0] == pytest.approx(single[("loss", "role/user")][0], rel=1e-6)
