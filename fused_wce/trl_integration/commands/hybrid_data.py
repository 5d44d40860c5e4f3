"""The RL side of ``fused-wce hybrid``: prompts taken from expert conversations and rule-based rewards that run
offline on CPU.

Each assistant message of a conversation that answers with a checkable final answer (not a tool call, weight not
0) gives one prompt: the conversation before it (system prompt, earlier turns, tool results: multi-turn context)
and its ``answer``, the final answer of the expert's reply: its last number, or its last word when that is
capitalised (a name: ``"The capital of Norway is Oslo."`` -> ``Oslo``); replies with neither are not prompts. The
rewards compare a sampled completion with that:

* ``answer``: 1 when the answer appears in the completion as a whole word (numbers: not inside a longer number);
* ``format``: 0.5 when the completion is one line ending in ``.``, ``!`` or ``?``, without a tool call, and at most
  twice as long as the expert's reply plus 10 characters.

TRL sums the reward functions' values (``reward_weights`` can weigh them).
"""
from __future__ import annotations

import re

from .options import UsageError

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SENTENCE_END = (".", "!", "?")


def final_answer(reply: str) -> str | None:
    """The checkable final answer of an expert reply (see the module), or None."""
    if not isinstance(reply, str) or reply.lstrip().startswith("<tool_call>"):
        return None
    numbers = _NUMBER.findall(reply)
    if numbers:
        return numbers[-1]
    words = re.findall(r"[A-Za-z][\w'-]*", reply)
    if words and words[-1][0].isupper() and len(words) > 1:
        return words[-1]
    return None


def prompts_from_conversations(conversations) -> list[dict]:
    """``[{"prompt": messages before the reply, "answer": str, "reference": the reply}]``, one per checkable
    assistant reply of ``conversations`` (an iterable of message lists, or of ``{"messages": ...}`` rows)."""
    rows = []
    for conversation in conversations:
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        for index, message in enumerate(messages):
            if index == 0 or message.get("role") != "assistant" or message.get("weight") == 0:
                continue
            answer = final_answer(message.get("content"))
            if answer is None:
                continue
            prompt = [{"role": m["role"], "content": m.get("content") or ""} for m in messages[:index]]
            rows.append({"prompt": prompt, "answer": answer, "reference": message["content"]})
    return rows


def _text(completion) -> str:
    """A completion's text: TRL passes conversational completions as ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, list):
        return "".join(message.get("content") or "" for message in completion)
    return completion


def answer_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 where the completion contains its prompt's ``answer`` as a whole word, else 0.0."""
    return [1.0 if re.search(rf"(?<![\w.-]){re.escape(key)}(?![\w]|\.\d)", _text(completion)) else 0.0
            for completion, key in zip(completions, answer, strict=True)]


def format_reward(completions, reference, **kwargs) -> list[float]:
    """0.5 where the completion is one line ending in '.', '!' or '?', has no tool call and is at most twice as
    long as the expert's reply plus 10 characters, else 0.0."""
    rewards = []
    for completion, expert in zip(completions, reference, strict=True):
        text = _text(completion).strip()
        good = (bool(text) and "\n" not in text and text.endswith(_SENTENCE_END) and "<tool_call>" not in text
                and len(text) <= 2 * len(expert) + 10)
        rewards.append(0.5 if good else 0.0)
    return rewards


REWARDS = {"answer": answer_reward, "format": format_reward}


def reward_functions(names: str) -> list:
    """The reward functions named in ``names`` (comma-separated, among :data:`REWARDS`); UsageError otherwise."""
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in REWARDS]
    if not chosen or unknown or len(set(chosen)) != len(chosen):
        raise UsageError(f"--rewards: expected distinct names among {sorted(REWARDS)}, got {names!r}")
    return [REWARDS[name] for name in chosen]
