"""Held-out measurements of a causal LM on chat conversations, kept per conversation (for bootstrap intervals).

Every number is a ratio of sums over conversations, ``sum_c s_c / sum_c n_c``, so a resample of the conversations
gives the same statistic again (:mod:`.intervals`). Measured per conversation (a list of chat messages; assistant
messages may carry ``needs_history: true/false`` and ``expected``, see :mod:`~fused_wce.trl_integration.history_data`), each under a metric
name and a group:

``loss``
    cross-entropy (nats) of the conversation's tokens with the full history, per token: groups ``role/<role>``,
    ``turn/<turn_k>`` (the k-th assistant message), ``history/needed`` / ``history/not_needed`` (assistant messages
    by their label) and ``full_sequence`` (every token, template scaffolding included). Messages the data marks
    ``weight: 0`` are left out, whatever a training scheme weighted.
``loss_with_history``, ``loss_without_history``, ``context_dependence``
    for each assistant message with at least one earlier exchange: the cross-entropy of its tokens with the full
    history, and without it (the system prompt, if any, and its own exchange: the messages from the last user
    message before it), and the difference *without minus with*. Positive: the model uses the earlier turns to
    predict this message. Groups ``turn/<turn_k>``, ``history/needed|not_needed`` and ``all``; per token.
``answer_exact``, ``answer_contains``, ``answer_contains_without_history``
    for each assistant message with an ``expected`` fact: the model's greedy reply to the conversation up to that
    message equals the reference message (whitespace-trimmed), contains the expected fact (case-insensitive, as a
    whole word), and contains it when the history is removed as above (the control: what can be guessed; a message
    without an earlier exchange counts its one reply in both). Groups
    ``history/needed|not_needed`` and ``all``; per message.

:func:`evaluate_conversations` returns a :class:`Measurements` (per-conversation sums and counts of each
``(metric, group)``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..chat_weights.tokenize import tokenize_with_weights
from ..chat_weights.turn_weighting import TurnWeighting
from ..token_codes import (DEFAULT_MAX_TURN_INDEX, ROLE_CODES, TOKEN_ROLES, TOKEN_TURN_INDEX, TOKEN_WEIGHTS,
                           role_names, turn_index_names)
from .model_calls import greedy_replies, prompt_ids, replies_in_context, token_losses

ROLES = role_names()
TURNS = turn_index_names(DEFAULT_MAX_TURN_INDEX)
HISTORY_GROUPS = {True: "history/needed", False: "history/not_needed"}
_ASSISTANT = ROLE_CODES["assistant"]


ANSWERS = ("all", "needs_history", "none")


@dataclass(frozen=True)
class EvaluationOptions:
    """``max_length``: tokens of a conversation measured (later ones ignored; None: all); ``answers``: which
    messages with an ``expected`` fact get a greedy reply scored (``all``, those labelled ``needs_history: true``,
    or ``none``: the slow part of an evaluation); ``max_new_tokens``: the longest reply generated."""

    max_length: int | None = None
    answers: str = "all"
    max_new_tokens: int = 20

    def __post_init__(self):
        if self.answers not in ANSWERS:
            raise ValueError(f"answers must be one of {list(ANSWERS)}, got {self.answers!r}")

    def scores(self, message: dict, index: int) -> bool:
        """Whether message ``index`` gets its greedy reply scored."""
        if self.answers == "none" or expected_fact(message, index) is None:
            return False
        return self.answers == "all" or history_label(message, index) is True


class Tally:
    """One conversation's ``(metric, group) -> [sum, count, messages]``."""

    def __init__(self):
        self.entries: dict[tuple[str, str], list[float]] = {}

    def add(self, metric: str, groups, value: float, count: float, messages: int = 0) -> None:
        for group in groups:
            entry = self.entries.setdefault((metric, group), [0.0, 0.0, 0])
            entry[0] += value
            entry[1] += count
            entry[2] += messages


class Measurements:
    """Per-conversation sums, counts and message counts of each ``(metric, group)``: arrays of one entry per
    conversation, in the order of the conversations measured."""

    def __init__(self, sums: dict, counts: dict, messages: dict, conversations: int):
        self.sums, self.counts, self.messages, self.conversations = sums, counts, messages, conversations

    @classmethod
    def from_tallies(cls, tallies: list[Tally]) -> "Measurements":
        keys = sorted({key for tally in tallies for key in tally.entries})
        arrays = [{key: np.zeros(len(tallies)) for key in keys} for _ in range(3)]
        for index, tally in enumerate(tallies):
            for key, entry in tally.entries.items():
                for array, value in zip(arrays, entry):
                    array[key][index] = value
        return cls(*arrays, conversations=len(tallies))

    def keys(self) -> list[tuple[str, str]]:
        return list(self.sums)

    def value(self, metric: str, group: str) -> float:
        """The statistic over every conversation (nan when nothing was measured)."""
        count = self.counts.get((metric, group))
        if count is None or count.sum() <= 0:
            return math.nan
        return float(self.sums[(metric, group)].sum() / count.sum())

    def total(self, metric: str, group: str) -> tuple[int, int]:
        """(count, messages) of a cell: tokens or replies, and messages."""
        if (metric, group) not in self.counts:
            return 0, 0
        return int(self.counts[(metric, group)].sum()), int(self.messages[(metric, group)].sum())


# ------------------------------------------------------------------------------------------------- labels
def history_label(message: dict, index: int) -> bool | None:
    """A message's ``needs_history`` (None when absent); ValueError naming the message when not a bool."""
    label = message.get("needs_history")
    if label is not None and not isinstance(label, bool):
        raise ValueError(f"message {index}: 'needs_history' must be true or false, got {label!r}")
    return label


def expected_fact(message: dict, index: int) -> str | None:
    """A message's ``expected`` fact (None when absent); ValueError naming the message when not a non-empty str."""
    fact = message.get("expected")
    if fact is not None and (not isinstance(fact, str) or not fact.strip()):
        raise ValueError(f"message {index}: 'expected' must be a non-empty string, got {fact!r}")
    return fact


def check_labels(conversations, source: str) -> None:
    """Every message's ``needs_history`` and ``expected`` well-formed; ValueError ``{source}: row i: ...``."""
    for row, messages in enumerate(conversations):
        for index, message in enumerate(messages):
            try:
                history_label(message, index)
                expected_fact(message, index)
            except ValueError as error:
                raise ValueError(f"{source}: row {row}: {error}") from None


def _history_groups(message: dict, index: int) -> list[str]:
    label = history_label(message, index)
    return [] if label is None else [HISTORY_GROUPS[label]]


def _turn_group(ordinal: int) -> str:
    return f"turn/{TURNS[min(ordinal, len(TURNS) - 1)]}"


def _excluded(message: dict) -> bool:
    weight = message.get("weight")
    return weight is not None and weight <= 0


def contains_fact(reply: str, fact: str) -> bool:
    """``fact`` occurs in ``reply`` as a whole word or number, case-insensitively ("12" is not in "120")."""
    return re.search(rf"(?<!\w){re.escape(fact.strip())}(?!\w)", reply, flags=re.IGNORECASE) is not None


def without_history(messages: list[dict], i: int) -> list[dict] | None:
    """Messages ``0..i`` with the history removed: the system prompt (if any) and the exchange of message ``i``
    (from the last user message before it). None when there is no earlier exchange to remove."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    users = [j for j in range(first, i) if messages[j]["role"] == "user"]
    if not users or users[-1] == first:
        return None
    return messages[:first] + messages[users[-1]:i + 1]


# ----------------------------------------------------------------------------------------- per conversation
def conversation_tally(model, tokenizer, messages: list[dict], options: EvaluationOptions) -> Tally:
    """Every measurement of one conversation (see the module docstring)."""
    messages = [dict(m) for m in messages]
    every_message = TurnWeighting(full_sequence=True)  # weight 0 only where the data says "weight": 0
    encoded = tokenize_with_weights(tokenizer, messages, every_message)
    full_ids = encoded["input_ids"][:options.max_length or len(encoded["input_ids"])]
    tally = Tally()
    if len(full_ids) < 2:
        return tally
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    measured = [(ordinal, i) for ordinal, i in enumerate(assistants) if not _excluded(messages[i])]
    targets = [i for _, i in measured if options.scores(messages[i], i)]
    if targets:
        (losses,), cache = token_losses(model, [full_ids], keep_cache=True)
    else:
        (losses,), cache = token_losses(model, [full_ids]), None
    _loss_entries(tally, encoded, losses, len(full_ids), messages, assistants)
    in_context = {}
    for ordinal, i in measured:
        positions = _message_positions(encoded, ordinal, len(encoded["input_ids"]))
        if positions and positions[-1] < len(full_ids) and without_history(messages, i) is not None:
            in_context[i] = (ordinal, losses[positions])
    _context_entries(tally, model, tokenizer, messages, in_context, every_message)
    _answer_entries(tally, model, tokenizer, messages, targets, full_ids, cache, options)
    return tally


def _message_positions(encoded: dict, ordinal: int, limit: int) -> list[int]:
    """Token positions (1 <= t < limit) of the ``ordinal``-th assistant message."""
    return [t for t in range(1, limit)
            if encoded[TOKEN_ROLES][t] == _ASSISTANT and encoded[TOKEN_TURN_INDEX][t] == ordinal]


def _loss_entries(tally: Tally, encoded: dict, losses: np.ndarray, limit: int, messages, assistants) -> None:
    """Each counted token's loss in its groups; a message counts once, at its first token."""
    seen = set()
    for t in range(1, limit):
        if encoded[TOKEN_WEIGHTS][t] <= 0:
            continue
        role, index = encoded[TOKEN_ROLES][t], encoded[TOKEN_TURN_INDEX][t]
        groups = ["full_sequence"]
        if role >= 0:
            groups.append(f"role/{ROLES[role]}")
        if role == _ASSISTANT:
            groups.append(_turn_group(index))
            groups += _history_groups(messages[assistants[index]], assistants[index])
        new_message = role >= 0 and (role, index) not in seen
        seen.add((role, index))
        tally.add("loss", groups, float(losses[t]), 1, int(new_message))


def _context_entries(tally, model, tokenizer, messages, in_context: dict, every_message) -> None:
    """Loss of each message ``i`` of ``in_context`` (``{i: (ordinal, its tokens' losses with the history)}``)
    without its history; the local conversations go through the model in one batch."""
    if not in_context:
        return
    local = {i: tokenize_with_weights(tokenizer, without_history(messages, i), every_message) for i in in_context}
    local_losses = token_losses(model, [encoded["input_ids"] for encoded in local.values()])
    for (i, encoded), losses in zip(local.items(), local_losses):
        ordinal, with_history = in_context[i]
        local_ordinal = max(encoded[TOKEN_TURN_INDEX][t] for t in range(len(encoded["input_ids"]))
                            if encoded[TOKEN_ROLES][t] == _ASSISTANT)
        positions = _message_positions(encoded, local_ordinal, len(encoded["input_ids"]))
        n = len(with_history)
        mean_with, mean_without = float(with_history.mean()), float(losses[positions].mean())
        groups = [_turn_group(ordinal), "all"] + _history_groups(messages[i], i)
        # Token-weighted by the message's length in full context, so both means weigh each message alike.
        tally.add("loss_with_history", groups, mean_with * n, n, 1)
        tally.add("loss_without_history", groups, mean_without * n, n, 1)
        tally.add("context_dependence", groups, (mean_without - mean_with) * n, n, 1)


def _answer_entries(tally, model, tokenizer, messages, targets: list[int], full_ids, cache, options) -> None:
    """Greedy replies to the conversation before each message of ``targets``, with and without the history;
    messages whose prompt does not fit in the measured tokens (``max_length``) are left out."""
    prompts = {i: prompt_ids(tokenizer, messages[:i]) for i in targets}
    targets = [i for i in targets if len(prompts[i]) < len(full_ids)]
    if not targets:
        return
    replies = replies_in_context(model, tokenizer, [prompts[i] for i in targets], full_ids, cache,
                                 options.max_new_tokens)
    # Without an earlier exchange there is no history to remove: the control is the reply itself.
    controls = [i for i in targets if without_history(messages, i) is not None]
    guesses = greedy_replies(model, tokenizer, [prompt_ids(tokenizer, without_history(messages, i)[:-1])
                                                for i in controls], options.max_new_tokens)
    guesses = dict(zip(controls, guesses))
    for i, reply in zip(targets, replies):
        fact, reference = expected_fact(messages[i], i), messages[i]["content"].strip()
        groups = ["all"] + _history_groups(messages[i], i)
        tally.add("answer_exact", groups, float(reply == reference), 1, 1)
        tally.add("answer_contains", groups, float(contains_fact(reply, fact)), 1, 1)
        guess = guesses.get(i, reply)
        tally.add("answer_contains_without_history", groups, float(contains_fact(guess, fact)), 1, 1)


def evaluate_conversations(model, tokenizer, conversations, options: EvaluationOptions | None = None,
                           progress=None) -> Measurements:
    """:class:`Measurements` of ``model`` on ``conversations`` (lists of messages), in eval mode, no gradients.

    ``progress(done, total)`` is called after each conversation when given.
    """
    import torch

    options = options or EvaluationOptions()
    conversations = list(conversations)
    was_training = model.training
    model.eval()
    tallies = []
    try:
        with torch.no_grad():
            for index, messages in enumerate(conversations):
                tallies.append(conversation_tally(model, tokenizer, messages, options))
                if progress is not None:
                    progress(index + 1, len(conversations))
    finally:
        model.train(was_training)
    return Measurements.from_tallies(tallies)
