"""What ``fused-wce compare`` measures on held-out conversations: loss per role and per assistant turn index, and
context dependence per assistant turn index (see :mod:`~fused_wce.trl_integration.commands.compare`), as rows of
``results.csv``."""
from __future__ import annotations

import math

from ..chat_weights.tokenize import tokenize_with_weights
from ..chat_weights.turn_weighting import TurnWeighting
from ..token_codes import (DEFAULT_MAX_TURN_INDEX, ROLE_CODES, TOKEN_ROLES, TOKEN_TURN_INDEX, TOKEN_WEIGHTS,
                           role_names, turn_index_names)

ROLES = role_names()
TURNS = turn_index_names(DEFAULT_MAX_TURN_INDEX)
RESULT_COLUMNS = ("scheme", "stage", "metric", "group", "value", "tokens", "messages")
BEFORE = "initial model"
_ASSISTANT = ROLE_CODES["assistant"]


class GroupSums:
    """Per-group sums of token losses, token counts and message counts."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, group: str, loss_sum: float, tokens: int, messages: int = 0):
        entry = self.values.setdefault(group, [0.0, 0, 0])
        entry[0] += loss_sum
        entry[1] += tokens
        entry[2] += messages

    def mean(self, group: str) -> float:
        total, tokens, _ = self.values.get(group, (0.0, 0, 0))
        return total / tokens if tokens else math.nan


def _token_losses(model, input_ids: list[int]):
    """Float64 ``[T]`` list: entry ``t`` is the cross-entropy of token ``t`` given tokens ``< t`` (entry 0 nan).

    The model's own forward (its logits, with whatever softcap or scale it applies): exact for any causal LM.
    """
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").double().tolist()
    return [math.nan] + losses


def _assistant_tokens(encoded, ordinal: int, limit: int) -> list[int]:
    """Positions (1 <= t < limit) of the tokens of the ``ordinal``-th assistant message."""
    return [t for t in range(1, limit)
            if encoded[TOKEN_ROLES][t] == _ASSISTANT and encoded[TOKEN_TURN_INDEX][t] == ordinal]


def _turn_group(ordinal: int) -> str:
    return f"turn/{TURNS[min(ordinal, len(TURNS) - 1)]}"


def measure(model, tokenizer, conversations, max_length: int | None) -> dict:
    """Held-out losses and context dependence of ``model`` (see the module docstring).

    Returns ``{"loss": GroupSums over "role/<r>", "turn/<turn_k>" (assistant turns), "full_sequence"}`` and
    ``{"context_full": GroupSums, "context_no_history": GroupSums}`` over "turn/<turn_k>" (same tokens in both).
    """
    import torch

    every_message = TurnWeighting(full_sequence=True)  # weight 0 only on messages the data marks "weight": 0
    measured = {"loss": GroupSums(), "context_full": GroupSums(), "context_no_history": GroupSums()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for messages in conversations:
            messages = [dict(m) for m in messages]
            encoded = tokenize_with_weights(tokenizer, messages, every_message)
            limit = min(len(encoded["input_ids"]), max_length or len(encoded["input_ids"]))
            if limit < 2:
                continue
            token_loss = _token_losses(model, encoded["input_ids"][:limit])
            _add_group_losses(measured["loss"], encoded, token_loss, limit)
            for ordinal, i in enumerate(i for i, m in enumerate(messages) if m["role"] == "assistant"):
                _add_context_dependence(measured, model, tokenizer, messages, i, ordinal, encoded, token_loss, limit)
    model.train(was_training)
    return measured


def _add_group_losses(losses: GroupSums, encoded, token_loss, limit: int) -> None:
    """Each weighted token's loss to the full sequence, its role and (assistant tokens) its turn index."""
    for t in range(1, limit):
        if encoded[TOKEN_WEIGHTS][t] <= 0:
            continue
        losses.add("full_sequence", token_loss[t], 1)
        role = encoded[TOKEN_ROLES][t]
        if role >= 0:
            losses.add(f"role/{ROLES[role]}", token_loss[t], 1)
            if role == _ASSISTANT:
                losses.add(_turn_group(encoded[TOKEN_TURN_INDEX][t]), token_loss[t], 1)


def _add_context_dependence(measured, model, tokenizer, messages, i: int, ordinal: int, encoded, token_loss,
                            limit: int) -> None:
    """The mean loss of assistant message ``i`` (the ``ordinal``-th) with the full history and with the system
    prompt and its own exchange only, when it has weight, earlier exchanges, and is not cut off."""
    weight = messages[i].get("weight")
    if weight is not None and weight <= 0:
        return
    users = [j for j in range(i) if messages[j]["role"] == "user"]
    if not users:
        return
    start = users[-1]
    first = 1 if messages[0]["role"] == "system" else 0
    if start <= first:  # nothing before the current exchange: no history to remove
        return
    full_tokens = _assistant_tokens(encoded, ordinal, len(encoded["input_ids"]))
    if not full_tokens or full_tokens[-1] >= limit:
        return  # (partly) cut off by max_length
    local = messages[:first] + messages[start:i + 1]
    local_encoded = tokenize_with_weights(tokenizer, local, TurnWeighting(full_sequence=True))
    local_ordinal = sum(m["role"] == "assistant" for m in local) - 1
    local_tokens = _assistant_tokens(local_encoded, local_ordinal, len(local_encoded["input_ids"]))
    if not local_tokens:
        return
    local_loss = _token_losses(model, local_encoded["input_ids"])
    full_mean = sum(token_loss[t] for t in full_tokens) / len(full_tokens)
    local_mean = sum(local_loss[t] for t in local_tokens) / len(local_tokens)
    # Weighted by the message's token count, so each token of these turns counts once in both.
    measured["context_full"].add(_turn_group(ordinal), full_mean * len(full_tokens), len(full_tokens), 1)
    measured["context_no_history"].add(_turn_group(ordinal), local_mean * len(full_tokens), len(full_tokens), 1)


def result_rows(scheme: str, stage: str, measured: dict) -> list[dict]:
    """The ``results.csv`` rows of one measurement."""
    rows = []
    groups = [f"role/{r}" for r in ROLES] + [f"turn/{t}" for t in TURNS] + ["full_sequence"]
    for group in groups:
        total, tokens, _ = measured["loss"].values.get(group, (0.0, 0, 0))
        if tokens:
            rows.append(dict(scheme=scheme, stage=stage, metric="loss", group=group, value=total / tokens,
                             tokens=tokens, messages=""))
    for turn in TURNS:
        group = f"turn/{turn}"
        full, local = measured["context_full"], measured["context_no_history"]
        if group not in full.values:
            continue
        _, tokens, messages = full.values[group]
        for metric, value in (("loss_with_history", full.mean(group)), ("loss_without_history", local.mean(group)),
                              ("context_dependence", local.mean(group) - full.mean(group))):
            rows.append(dict(scheme=scheme, stage=stage, metric=metric, group=group, value=value, tokens=tokens,
                             messages=messages))
    return rows


def result_value(rows, scheme, metric, group):
    """The value of one (scheme, metric, group) in ``rows`` (nan when absent)."""
    for row in rows:
        if row["scheme"] == scheme and row["metric"] == metric and row["group"] == group:
            return row["value"]
    return math.nan
