"""The shipped experiment data: generator output, labels, and that needs_history turns really need the history."""
from __future__ import annotations

import json
import re

import pytest

from fused_wce.trl_integration import history_data
from fused_wce.trl_integration.history_data import (HELDOUT_PATH, TRAIN_PATH, generate_history_conversations,
                                                    generate_splits)


@pytest.fixture(scope="module")
def splits():
    return generate_splits()


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shipped_files_are_the_generator_output(splits):
    train, heldout = splits
    assert _read(TRAIN_PATH) == train and _read(HELDOUT_PATH) == heldout
    assert len(train) == history_data.TRAIN_SIZE and len(heldout) == history_data.HELDOUT_SIZE
    assert TRAIN_PATH.stat().st_size + HELDOUT_PATH.stat().st_size < 450_000  # small enough for the repository


def test_generator_is_deterministic_and_splits_are_disjoint(splits):
    train, heldout = splits
    assert generate_history_conversations(5, 7) == generate_history_conversations(5, 7)
    assert generate_history_conversations(5, 7) != generate_history_conversations(5, 8)
    assert not {json.dumps(c, sort_keys=True) for c in train} & {json.dumps(c, sort_keys=True) for c in heldout}
    with pytest.raises(ValueError, match="n must be"):
        generate_history_conversations(-1, 0)


def test_every_assistant_message_is_labelled(splits):
    needed = other = 0
    for conversation in sum(splits, []):
        messages = conversation["messages"]
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"
        for message in messages:
            if message["role"] == "assistant":
                assert isinstance(message["needs_history"], bool)
                needed += message["needs_history"]
                other += not message["needs_history"]
                assert "expected" not in message or message["expected"] in message["content"]
            else:
                assert set(message) == {"role", "content"}
    assert needed > 500 and other > 500  # both kinds well represented


def _running_counts(messages):
    """Replay the count topic from the user's messages: the total after each message that changes it."""
    total, totals = None, {}
    for index, message in enumerate(messages):
        text = message["content"]
        if message["role"] != "user":
            continue
        if match := re.fullmatch(r"I have (\d+) \w+\.", text):
            total = int(match.group(1))
        elif match := re.search(r"(?:get|gives me) (\d+) more", text):
            total += int(match.group(1))
        elif match := re.search(r"(?:give away|lose) (\d+)", text):
            total -= int(match.group(1))
        totals[index] = total
    return totals


def test_needs_history_turns_need_the_history_and_the_others_do_not(splits):
    """A needs_history answer's fact is absent from its own exchange and comes from earlier turns (stated there,
    or, for running counts, computed from them); an answer without the label takes its fact from its own exchange
    (or states it as the answer to a self-contained question)."""
    checked = 0
    for conversation in sum(splits, []):
        messages = conversation["messages"]
        totals = _running_counts(messages)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or "expected" not in message:
                continue
            fact, question = message["expected"], messages[i - 1]["content"]
            if not message["needs_history"]:
                continue
            assert fact.lower() not in question.lower().split(), (question, fact)
            history = " ".join(m["content"] for m in messages[1:i - 1])
            if fact.isdigit():
                last_count = max(j for j in totals if j < i)
                assert totals[last_count] == int(fact), (messages, i)
            else:
                assert fact in history
                # after a correction the answer is the corrected fact: the last city the user gave
                if message["content"].startswith("You live in"):
                    cities = re.findall(r"I live in (\w+)|home town is (\w+)|based in (\w+)", history)
                    assert fact == [c for c in cities[-1] if c][0]
            checked += 1
    assert checked > 500
