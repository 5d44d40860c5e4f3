"""Which characters of a chat template's rendering belong to which message: differential rendering.

Spans come from differential rendering, without assuming the template is prefix-stable: each message's fields
are traced (wrapped in private-use markers) in the full conversation, so templates that rewrite earlier turns
(Qwen3 drops earlier ``<think>`` blocks, Phi-3 closes with ``eos``, Mistral moves the system prompt) are handled;
a message's end-of-turn marker is what follows its fields when it ends a rendered prefix; the generation prompt
is ``messages[:i]`` rendered with ``add_generation_prompt=True`` minus ``messages[:i]``. A template that cannot be
segmented (messages rendered out of order, fields it branches on) raises :class:`ChatTemplateError` naming what is
wrong.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The chat template cannot give the per-message token spans needed (names the missing template feature)."""


# Private-use characters wrapped around a message's fields to trace where the template renders them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_ABSENT, _UNCLEAR = "absent", "unclear"  # a traced message that changes nothing / that changes more than its fields


class ChatTemplate:
    """Renders conversations with one chat template (and tools / template kwargs) and compares renderings.

    Comparisons never end inside an added token (``<|im_end|>`` and ``<|im_start|>`` share ``<|``): a common
    prefix that would split one is shortened to the token's start.
    """

    def __init__(self, tokenizer, tools, chat_template, template_kwargs):
        self.tokenizer, self.tools, self.chat_template = tokenizer, tools, chat_template
        self.kwargs = dict(template_kwargs or {})
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        self.atomic = sorted({token.content for token in added if len(token.content) > 1}, key=len, reverse=True)
        special = {token.content for token in added if token.special} | set(tokenizer.all_special_tokens)
        special = sorted((token for token in special if token), key=len, reverse=True)
        self.special = re.compile("|".join(map(re.escape, special))) if special else None

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=self.tools, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **self.kwargs)

    def render_or_none(self, messages, add_generation_prompt: bool = False) -> str | None:
        """:meth:`render`, or ``None`` where the template refuses the conversation: a template may refuse a prefix
        ("must end with the assistant", "tools need a user message") or a traced field."""
        try:
            return self.render(messages, add_generation_prompt=add_generation_prompt)
        except Exception:  # noqa: BLE001 - any refusal of the template; such renderings are not used
            return None

    def _snap(self, text: str, k: int) -> int:
        """The largest position <= k of ``text`` that does not lie strictly inside an added token."""
        moved = True
        while moved and k > 0:
            moved = False
            for token in self.atomic:
                at = text.find(token, max(0, k - len(token) + 1), k + len(token) - 1)
                if 0 <= at < k:
                    k, moved = at, True
                    break
        return k

    def common_prefix(self, a: str, b: str) -> int:
        """Length of the common prefix of ``a`` and ``b``, cut back to the start of any added token it splits."""
        k = len(os.path.commonprefix([a, b]))
        while True:
            snapped = self._snap(b, self._snap(a, k))
            if snapped == k:
                return k
            k = snapped

    def through_first_special(self, text: str) -> int:
        """Length of ``text`` up to and including its first special token (all of it, less trailing whitespace,
        when it has none): the end-of-turn part of a non-assistant message's trailer."""
        match = self.special.search(text) if self.special is not None else None
        return match.end() if match else len(text.rstrip())


def _wrap(text: str) -> str:
    return _OPEN + text + _CLOSE


def _traced(message: dict) -> dict | None:
    """A copy of ``message`` with :data:`_OPEN`/:data:`_CLOSE` around each string field the template may render
    (content, reasoning, tool-call names and string arguments); ``None`` when it has none."""
    traced, changed = dict(message), False
    for key in _REASONING_KEYS:
        if isinstance(message.get(key), str) and message[key]:
            traced[key], changed = _wrap(message[key]), True
    calls = message.get("tool_calls")
    if isinstance(calls, (list, tuple)):
        traced_calls = []
        for call in calls:
            call = dict(call) if isinstance(call, dict) else call
            if isinstance(call, dict):
                inner = call.get("function") if isinstance(call.get("function"), dict) else call
                inner = dict(inner)
                for key in ("name", "arguments"):
                    if isinstance(inner.get(key), str) and inner[key]:
                        inner[key], changed = _wrap(inner[key]), True
                if isinstance(call.get("function"), dict):
                    call["function"] = inner
                else:
                    call = inner
            traced_calls.append(call)
        traced["tool_calls"] = traced_calls
    content = message.get("content")
    # Empty content is traced only when nothing else is: wrapping it would flip `if content` tests in templates.
    if isinstance(content, str) and (content or not changed):
        traced["content"], changed = _wrap(content), True
    return traced if changed else None


def _locate(base: str, traced: str):
    """Where the traced fields lie in ``base``: ``(start, end)``, :data:`_ABSENT` when the template does not render
    them, :data:`_UNCLEAR` when tracing changed more than the fields (the template branches on them)."""
    if base == traced:
        return _ABSENT
    if _OPEN in base or _CLOSE in base:
        return _UNCLEAR
    p = len(os.path.commonprefix([base, traced]))
    s = len(os.path.commonprefix([base[p:][::-1], traced[p:][::-1]]))
    region, traced_region = base[p:len(base) - s], traced[p:len(traced) - s]
    if traced_region.replace(_OPEN, "").replace(_CLOSE, "").strip() != region.strip():
        return _UNCLEAR
    return p, len(base) - s


@dataclass
class MessageSpan:
    """Character offsets in the full rendering: ``weighted`` is what carries the message's weight, ``body`` where
    its own fields (content, reasoning, tool calls) lie, ``piece_end`` where the text it brings ends."""

    weighted: tuple[int, int]
    body: tuple[int, int] | None
    piece_end: int | None


def message_spans(template: ChatTemplate, messages: list[dict], full_text: str) -> list[MessageSpan]:
    """Segment ``full_text`` (the rendering of ``messages``) into per-message spans by differential rendering.

    For message ``i``: its *body* is found by rendering the conversation with its fields traced (in the full
    conversation, so templates that render a turn differently once later turns follow are handled); its
    *trailer* (end-of-turn marker, separators) is what follows its body when it is the last message of
    ``messages[:i+1]``, as far as the full rendering agrees. An assistant message carries weight from the end
    of the template's generation prompt (``messages[:i]`` rendered with ``add_generation_prompt=True``, less
    ``messages[:i]``) through its trailer: its reasoning, content, tool calls and end-of-turn token, what the
    model generates. Other messages carry weight from their content through their end-of-turn marker (the
    trailer up to its first special token). A message the template folds into another turn (a system prompt
    merged into a user turn) carries weight on its content only.

    Raises ChatTemplateError when the template refuses a prefix of the conversation, renders messages out of
    order, or renders a message in a way that cannot be traced.
    """
    segmentation = _Segmentation(template, messages, full_text)
    spans: list[MessageSpan] = []
    cursor: int | None = None  # end of the previous in-order message's piece
    for i in range(len(messages)):
        span = segmentation.span(i, cursor)
        spans.append(span)
        if span.piece_end is not None:  # dropped and folded messages bring no piece of their own
            cursor = span.piece_end
    return spans


class _Segmentation:
    """One conversation's rendering and the renderings of its prefixes, read message by message."""

    def __init__(self, template: ChatTemplate, messages: list[dict], full_text: str):
        self.template, self.messages, self.full_text = template, messages, full_text
        # prefixes[k]: messages[:k] rendered on their own (None where the template refuses them).
        self.prefixes: list[str | None] = (
            [template.render_or_none(messages[:k]) for k in range(len(messages))] + [full_text])

    def span(self, i: int, cursor: int | None) -> MessageSpan:
        """Message ``i``'s span; ``cursor`` is where the previous in-order message's piece ends."""
        # The shortest renderable prefix that ends with this message (or, where the template refuses that, with
        # the fewest messages after it: its trailer then stops where the next message's fields start).
        j = next(k for k in range(i + 1, len(self.messages) + 1) if self.prefixes[k] is not None)
        trailer_limit = self._next_fields_start(i, j) if j > i + 1 else None
        body_in_prefix, body = self._body(i, j)
        if body == _ABSENT:  # the template drops this message (e.g. a tool turn, an unsupported system prompt)
            return MessageSpan((cursor or 0, cursor or 0), None, None)
        if isinstance(body, tuple) and body_in_prefix == _ABSENT:  # folded into another turn
            return MessageSpan(body, body, None)
        body, after_body, piece_end = self._piece(i, j, body, body_in_prefix, trailer_limit, cursor)
        if self.messages[i]["role"] == "assistant":
            start = self._generation_start(i, cursor, body, piece_end)
            end = (body[1] + len(after_body.rstrip())) if body is not None else \
                start + len(self.full_text[start:piece_end].rstrip())
        else:
            start, end = body[0], body[1] + self.template.through_first_special(after_body)
        return MessageSpan((start, max(start, end)), body, piece_end)

    def _next_fields_start(self, i: int, j: int) -> int:
        """Where message ``i + 1``'s fields start in ``prefixes[j]`` (the first renderable prefix past ``i``)."""
        messages = self.messages
        following = _traced(messages[i + 1])
        located = None if following is None else self.template.render_or_none(
            messages[:i + 1] + [following] + messages[i + 2:j])
        located = _UNCLEAR if located is None else _locate(self.prefixes[j], located)
        if not isinstance(located, tuple):
            raise ChatTemplateError(
                f"the chat template cannot render the first {i + 1} messages on their own, and message {i + 1} "
                "cannot be traced in a longer prefix; per-message spans are found by rendering prefixes of the "
                "conversation")
        return located[0]

    def _body(self, i: int, j: int):
        """(where message ``i``'s traced fields lie in ``prefixes[j]``, where they lie in the full rendering):
        each a ``(start, end)``, :data:`_ABSENT` or :data:`_UNCLEAR`."""
        messages, prefix = self.messages, self.prefixes[j]
        traced = _traced(messages[i])
        if traced is None:
            return _UNCLEAR, _UNCLEAR
        traced_prefix = self.template.render_or_none(messages[:i] + [traced] + messages[i + 1:j])
        body_in_prefix = _UNCLEAR if traced_prefix is None else _locate(prefix, traced_prefix)
        if j == len(messages) or (isinstance(body_in_prefix, tuple) and self.full_text.startswith(prefix)):
            return body_in_prefix, body_in_prefix
        traced_full = self.template.render_or_none(messages[:i] + [traced] + messages[i + 1:])
        return body_in_prefix, (_UNCLEAR if traced_full is None else _locate(self.full_text, traced_full))

    def _piece(self, i, j, body, body_in_prefix, trailer_limit, cursor):
        """(body or None, the text after the body up to the piece's end, the piece's end) of message ``i``."""
        message, full_text = self.messages[i], self.full_text
        if isinstance(body, tuple) and isinstance(body_in_prefix, tuple):
            if cursor is not None and body[0] < cursor:
                raise ChatTemplateError(
                    f"the chat template renders message {i} (role {message['role']!r}) before the end of the message "
                    "before it; messages must be rendered in order for their tokens to be told apart")
            prefix = self.prefixes[j]
            trailer = self.template.common_prefix(prefix[body_in_prefix[1]:trailer_limit], full_text[body[1]:])
            return body, full_text[body[1]:body[1] + trailer], body[1] + trailer
        # Untraceable fields: only a prefix-stable rendering (up to a closing trailer) locates the message.
        piece_end = self._prefix_end(self.prefixes[j], cursor) if j == i + 1 else None
        if piece_end is None or message["role"] != "assistant":
            raise ChatTemplateError(
                f"cannot locate message {i} (role {message['role']!r}) in the rendered conversation: the chat "
                "template renders it differently depending on the turns around it, and its fields cannot be "
                "traced (it branches on their values)")
        return None, "", piece_end

    def _prefix_end(self, prefix: str, cursor: int | None) -> int | None:
        """Where ``prefix`` (a rendering of the first messages) ends in the full rendering, when that extends it,
        possibly less a closing trailer that both end with (Phi-3 closes every rendering with ``eos``)."""
        if self.full_text.startswith(prefix):
            return len(prefix)
        common = self.template.common_prefix(prefix, self.full_text)
        trailer = prefix[common:]
        if trailer and self.full_text.endswith(trailer) and (cursor is None or common >= cursor):
            return common
        return None

    def _generation_start(self, i, cursor, body, piece_end) -> int:
        """Where assistant message ``i``'s generated text starts in the full rendering: after the part of the
        template's generation prompt that the rendering repeats, never after the message's own fields."""
        prompt = ""
        with_prompt = self.template.render_or_none(self.messages[:i], add_generation_prompt=True)
        if with_prompt is not None and self.prefixes[i] is not None:
            prompt = with_prompt[self.template.common_prefix(with_prompt, self.prefixes[i]):]
        limit = body[0] if body is not None else piece_end
        start = cursor
        if start is None:  # the first message of the conversation: find the generation prompt before its fields
            found = self.full_text.rfind(prompt, 0, limit + len(prompt)) if prompt else -1
            start = found if found >= 0 else limit
        return min(start + self.template.common_prefix(prompt, self.full_text[start:]), limit)


def has_generation_blocks(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the (given or the tokenizer's) chat template marks assistant output with ``{% generation %}``."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and _GENERATION_TAG.search(template) is not None
