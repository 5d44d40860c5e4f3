"""Which characters of a chat template's rendering belong to which message: differential rendering.

Spans come from differential rendering, without assuming the template is prefix-stable: each message's fields
are traced (wrapped in private-use markers) in the full conversation, so templates that rewrite earlier turns
(Qwen3 drops earlier ``<think>`` blocks, Phi-3 closes with ``eos``, Mistral moves the system prompt) are handled;
a message's end-of-turn marker is what follows its fields when it ends a rendered prefix; the generation prompt
is ``messages[:i]`` rendered with ``add_generation_prompt=True`` minus ``messages[:i]``. A template that cannot be
segmented (messages rendered out of order, fields it branches on) raises :class:`ChatTemplateError` naming what is
wrong.

Linear cost. Rendering every prefix costs time quadratic in the conversation's length (a 1000-message
conversation took over a minute). Instead the prefix ending with message ``i`` is stood for by a *window*:
``messages[:a] + messages[s:i + 1]``, the conversation's head through a first user message ``a - 1`` and the
messages from ``s`` on, where ``a`` and ``s`` lie right after a user message, ``s`` before the user message that
opens ``i``'s round (so a round's messages share their window and its renderings), and the block dropped between
them holds an even number of messages and of plain user/assistant ones (a template that checks role alternation
sees the same parity). Everything the segmentation compares lies after the fields of the message before ``i`` or
within one rendering, so a window answers as the prefix does wherever the template renders a message from the
messages around it and the conversation's head, as every template in tests/chat_templates does (the tests compare
both on long conversations). Each message has its own pair of markers: one rendering of the whole conversation,
every message traced, gives where each message's fields lie in the full text, and a window's rendering traces the
message it ends with. Windows are rendered straight with the compiled template (:class:`.rendering.ChatTemplate`).
Checked: the traced full rendering less its markers must be the rendering itself (tracing changes nothing else),
and a window that renders more of a message than the full rendering does (Qwen3 renders the reasoning of the last
turn only) must be its plain rendering plus markers. Where a check fails (a template that trims or transforms the
fields it is given: Llama-3 and Gemma trim the content, which matters when it has surrounding whitespace), and
where a window cannot answer (an untraceable message, a segmentation error), the prefixes themselves are rendered
(:func:`message_spans` with ``exhaustive=True``). One difference: tracing every message of a window at once also
segments conversations where tracing one message alone changes how a template treats the others (Mistral v0.3
renders its tools before every user message *equal* to the last one, so a repeated user message cannot be traced
alone), which the prefixes refuse.
"""
from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass

from .rendering import ChatTemplate, common_length

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The chat template cannot give the per-message token spans needed (names the missing template feature)."""


# Private-use characters: pairs that the conversation does not use are wrapped around messages' fields to trace
# where the template renders them (BMP first, then the supplementary planes 15 and 16).
_PRIVATE_USE = (range(0xE000, 0xF900), range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_ABSENT, _UNCLEAR = "absent", "unclear"  # a traced message that changes nothing / that changes more than its fields


def _strings(value):
    """Every string in ``value`` (nested dicts, lists and tuples; keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


class _NotLocal(Exception):
    """The windows cannot stand for this conversation's prefixes: render the prefixes themselves."""


class Markers:
    """Pairs of private-use characters that the conversation, its tools, the template, the tokenizer's special
    tokens and the rendering never contain: a message's own text can never be taken for a marker. Pair ``m`` goes
    around the traced fields of message ``m``, so one rendering traces every message at once."""

    def __init__(self, characters: list[str]):
        self.characters = characters
        self._owner = {character: index // 2 for index, character in enumerate(characters)}
        # A character class of exactly these characters (runs of consecutive code points as ranges), so that
        # splitting at it finds the markers and nothing else.
        runs, codes = [], sorted(map(ord, characters))
        for code in codes:
            if runs and runs[-1][1] == code - 1:
                runs[-1][1] = code
            else:
                runs.append([code, code])
        self._pattern = re.compile("([" + "".join(
            re.escape(chr(low)) + ("-" + re.escape(chr(high)) if high > low else "") for low, high in runs) + "])")

    @classmethod
    def unused_in(cls, pairs: int, *values) -> "Markers":
        """``pairs`` pairs of characters found in none of the strings of ``values``."""
        used = set()
        for value in values:
            for text in _strings(value):
                used.update(text)
        free = list(itertools.islice((chr(code) for block in _PRIVATE_USE for code in block
                                      if chr(code) not in used), 2 * pairs))
        if len(free) < 2 * pairs:
            raise ChatTemplateError(f"tracing needs {2 * pairs} private-use characters the conversation does not "
                                    f"use (U+E000-U+F8FF and planes 15 and 16); only {len(free)} are free")
        return cls(free)

    def pair(self, index: int) -> tuple[str, str]:
        return self.characters[2 * index], self.characters[2 * index + 1]

    def strip(self, text: str) -> str:
        return self.read(text)[0]

    def read(self, traced: str) -> tuple[str, dict[int, tuple[int, int, int]]]:
        """``traced`` without its markers, and for each traced message the positions in that text of its first and
        last marker (where its fields start and end) and the number of its markers."""
        parts = self._pattern.split(traced)  # text, marker, text, marker, ..., text
        fields, position, owner_of = {}, 0, self._owner
        for k in range(1, len(parts), 2):
            position += len(parts[k - 1])
            owner = owner_of[parts[k]]
            first, _, count = fields.get(owner, (position, 0, 0))
            fields[owner] = (first, position, count + 1)
        return "".join(parts[0::2]), fields


def _markers(template: ChatTemplate, messages: list[dict], full_text: str, pairs: int) -> Markers:
    return Markers.unused_in(pairs, messages, full_text, template.tools, template.kwargs, template.source(),
                             template.special_tokens)


def _traced(message: dict, pair: tuple[str, str]) -> dict | None:
    """A copy of ``message`` with ``pair`` around each string field the template may render (content, reasoning,
    tool-call names and string arguments); ``None`` when it has none."""
    open_, close = pair

    def wrap(text):
        return open_ + text + close

    traced, changed = dict(message), False
    for key in _REASONING_KEYS:
        if isinstance(message.get(key), str) and message[key]:
            traced[key], changed = wrap(message[key]), True
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
                        inner[key], changed = wrap(inner[key]), True
                if isinstance(call.get("function"), dict):
                    call["function"] = inner
                else:
                    call = inner
            traced_calls.append(call)
        traced["tool_calls"] = traced_calls
    content = message.get("content")
    # Empty content is traced only when nothing else is: wrapping it would flip `if content` tests in templates.
    if isinstance(content, str) and (content or not changed):
        traced["content"], changed = wrap(content), True
    return traced if changed else None


def _locate(base: str, traced: str, markers: Markers):
    """Where the traced fields of one message lie in ``base``: ``(start, end)``, :data:`_ABSENT` when the template
    does not render them, :data:`_UNCLEAR` when tracing changed more than the fields (the template branches on
    them)."""
    if base == traced:
        return _ABSENT
    p = common_length(base, traced)
    s = common_length(base[p:][::-1], traced[p:][::-1])
    region, traced_region = base[p:len(base) - s], traced[p:len(traced) - s]
    if markers.strip(traced_region).strip() != region.strip():
        return _UNCLEAR
    return p, len(base) - s


@dataclass
class MessageSpan:
    """Character offsets in the full rendering: ``weighted`` is what carries the message's weight, ``body`` where
    its own fields (content, reasoning, tool calls) lie, ``piece_end`` where the text it brings ends."""

    weighted: tuple[int, int]
    body: tuple[int, int] | None
    piece_end: int | None


def message_spans(template: ChatTemplate, messages: list[dict], full_text: str, *,
                  exhaustive: bool = False) -> list[MessageSpan]:
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

    The prefixes are stood for by windows (linear cost; see the module docstring); ``exhaustive=True`` renders
    every prefix itself (quadratic): what the windows fall back on, and the reference they are tested against.

    Raises ChatTemplateError when the template refuses a prefix of the conversation, renders messages out of
    order, or renders a message in a way that cannot be traced.
    """
    if not exhaustive and messages:
        try:
            return _segment(template, messages, full_text, _Windows(template, messages, full_text))
        except (_NotLocal, ChatTemplateError):  # the prefixes give the answer, or the error, themselves
            pass
    return _segment(template, messages, full_text, _Prefixes(template, messages, full_text))


def _segment(template: ChatTemplate, messages: list[dict], full_text: str, renderings) -> list[MessageSpan]:
    segmentation = _Segmentation(template, messages, full_text, renderings)
    spans: list[MessageSpan] = []
    cursor: int | None = None  # end of the previous in-order message's piece
    for i in range(len(messages)):
        span = segmentation.span(i, cursor)
        spans.append(span)
        if span.piece_end is not None:  # dropped and folded messages bring no piece of their own
            cursor = span.piece_end
    return spans


class _Prefixes:
    """The renderings differential rendering reads, rendered as they are: every prefix of the conversation, each
    message traced alone. One view for all messages, in the full rendering's coordinates."""

    absolute = True

    def __init__(self, template: ChatTemplate, messages: list[dict], full_text: str):
        self.template, self.messages, self.full_text = template, messages, full_text
        self.markers = _markers(template, messages, full_text, 1)
        self._prefixes: dict[int, str | None] = {len(messages): full_text}

    def view(self, i: int) -> "_Prefixes":
        return self

    def prefix(self, k: int) -> str | None:
        """``messages[:k]`` rendered (the full rendering for ``k = len(messages)``), or None where refused."""
        if k not in self._prefixes:
            self._prefixes[k] = self.template.render_or_none(self.messages[:k])
        return self._prefixes[k]

    def _locate_in(self, m: int, k: int, base: str | None):
        traced = _traced(self.messages[m], self.markers.pair(0))
        rendered = None if traced is None or base is None else self.template.render_or_none(
            self.messages[:m] + [traced] + self.messages[m + 1:k])
        return _UNCLEAR if rendered is None else _locate(base, rendered, self.markers)

    def locate_in_prefix(self, m: int, k: int):
        """Where message ``m``'s fields lie in ``prefix(k)``: ``(start, end)``, :data:`_ABSENT` or :data:`_UNCLEAR`."""
        return self._locate_in(m, k, self.prefix(k))

    def locate_in_full(self, m: int, k: int, in_prefix):
        """Where message ``m``'s fields lie in the full rendering, given where they lie in ``prefix(k)``."""
        if k == len(self.messages) or (isinstance(in_prefix, tuple) and self.full_text.startswith(self.prefix(k))):
            return in_prefix
        return self._locate_in(m, len(self.messages), self.full_text)

    def generation_render(self, k: int) -> str | None:
        """``messages[:k]`` rendered with the generation prompt, or None where refused."""
        return self.template.render_or_none(self.messages[:k], add_generation_prompt=True)


class _Windows:
    """The renderings differential rendering reads, stood for by windows (see the module docstring). Each message
    has its own markers: one rendering of the whole conversation, every message traced, gives where each message's
    fields lie in it; a window's rendering traces the message it ends with (as the prefixes are traced).

    Raises _NotLocal when tracing changes the full rendering beyond its markers."""

    def __init__(self, template: ChatTemplate, messages: list[dict], full_text: str):
        self.template, self.messages, self.full_text = template, messages, full_text
        n = len(messages)
        self.markers = _markers(template, messages, full_text, n)
        traced = [_traced(message, self.markers.pair(m)) for m, message in enumerate(messages)]
        self.traceable = [message is not None for message in traced]
        traced = [t if t is not None else message for t, message in zip(traced, messages)]
        # Rendered straight with the compiled template where that renders the whole conversation as
        # apply_chat_template does (checked on the traced conversation less its markers), else through it.
        self.direct = template.prepare([]) is not None
        if self.direct:
            self.plain, self.traced = template.prepare(messages), template.prepare(traced)
            rendered = self._read(self.traced, False)
        if not self.direct or rendered is None or rendered[0] != full_text:
            self.direct, self.plain, self.traced = False, messages, traced
            rendered = self._read(self.traced, False)
            if rendered is None or rendered[0] != full_text:  # tracing changes more than the markers
                raise _NotLocal
        self.fields = rendered[1]
        self._windows = self._window_choices()
        self._renders_of, self._renders = None, {}  # the renderings of one window, by (k, traced, generation)

    def _window_choices(self) -> tuple[list[int], dict[tuple[int, int], list[int]]]:
        """(the indices of the user messages, the positions right after a user message (window boundaries) by
        parity: of the position and of the number of plain (no tool calls) user and assistant messages before it).
        The block between two boundaries of one parity holds an even number of messages and of plain ones."""
        users, by_parity, plain = [], {}, 0
        for b, message in enumerate(self.messages, start=1):
            plain += message["role"] in ("user", "assistant") and not message.get("tool_calls")
            if message["role"] == "user":
                users.append(b - 1)
                by_parity.setdefault((b % 2, plain % 2), []).append(b)
        return users, by_parity

    def view(self, i: int) -> "_WindowView":
        """Message ``i``'s window: the smallest ``messages[:a] + messages[s:]`` with boundaries ``a < s`` of one
        parity (the block dropped between them is whole rounds that change no alternation check) and ``s`` before
        the user message that opens ``i``'s round (so every message of a round has the same window, and the
        windows of consecutive prefixes are shared); the prefix itself where none is smaller."""
        users, by_parity = self._windows
        at = bisect.bisect_right(users, i) - 1
        best = (i + 1, None, None)
        if at >= 0:
            for boundaries in by_parity.values():
                last = bisect.bisect_right(boundaries, users[at] - 1) - 1
                if last > 0:
                    head, start = boundaries[0], boundaries[last]
                    best = min(best, (head + i + 1 - start, head, start))
        return _WindowView(self, best[1], best[2])

    def render(self, head: int | None, start: int | None, k: int, traced: int | None, generation: bool = False):
        """(text, fields) of the window ``messages[:head] + messages[start:k]`` (``messages[:k]`` for ``head``
        None) with message ``traced`` traced, or None where the template refuses it; _NotLocal where only tracing
        made it refuse."""
        if self._renders_of != (head, start):  # messages come in order: an earlier window is not read again
            self._renders_of, self._renders = (head, start), {}
        key = (k, traced, generation)
        if key not in self._renders:
            def window(source):
                return source[:k] if head is None else source[:head] + source[start:k]

            messages = window(self.plain)
            if traced is not None:
                messages[traced if head is None else head + traced - start] = self.traced[traced]
            rendered = self._read(messages, generation)
            if traced is not None and (rendered is None or rendered[1].get(traced, (0, 0, 0))[2] >
                                       self.fields.get(traced, (0, 0, 0))[2]):
                # Refused, or fields rendered here that the full rendering drops (Qwen3 renders the reasoning of
                # the last turn only): where tracing alone changes the text, the prefixes must say what it means.
                plain = self._read(window(self.plain), generation)
                if (plain is None) != (rendered is None) or (plain is not None and plain[0] != rendered[0]):
                    raise _NotLocal
            self._renders[key] = rendered
        return self._renders[key]

    def located(self, m: int):
        """Where message ``m``'s fields lie in the full rendering, or :data:`_ABSENT`."""
        return self.fields[m][:2] if m in self.fields else _ABSENT

    def _read(self, messages: list[dict], generation: bool):
        """(text, fields) of ``messages`` (prepared for direct rendering or not), or None where refused."""
        if self.direct:
            rendered = self.template.render_prepared(messages, add_generation_prompt=generation)
        else:
            rendered = self.template.render_or_none(messages, add_generation_prompt=generation)
        return None if rendered is None else self.markers.read(rendered)


class _WindowView:
    """The renderings for one message, from its window (coordinates of the window's text, except for the full
    rendering, ``prefix(len(messages))``; the segmentation compares positions within one rendering only)."""

    def __init__(self, windows: _Windows, head: int | None, start: int | None):
        self.windows, self.head, self.start = windows, head, start
        self.absolute = head is None  # nothing dropped: the window is the prefix itself

    def _render(self, k: int, traced: int | None, generation: bool = False):
        return self.windows.render(self.head, self.start, k, traced, generation)

    def prefix(self, k: int) -> str | None:
        windows = self.windows
        if k == len(windows.messages):
            return windows.full_text
        rendered = self._render(k, k - 1 if windows.traceable[k - 1] else None)
        return None if rendered is None else rendered[0]

    def locate_in_prefix(self, m: int, k: int):
        windows = self.windows
        if not windows.traceable[m]:
            return _UNCLEAR
        if k == len(windows.messages):
            return windows.located(m)
        rendered = self._render(k, m)
        return _UNCLEAR if rendered is None else (rendered[1][m][:2] if m in rendered[1] else _ABSENT)

    def locate_in_full(self, m: int, k: int, in_prefix):
        return self.windows.located(m) if self.windows.traceable[m] else _UNCLEAR

    def generation_render(self, k: int) -> str | None:
        rendered = self._render(k, None, generation=True)
        return None if rendered is None else rendered[0]


class _Segmentation:
    """One conversation's spans, message by message, from the renderings of ``renderings`` (:class:`_Prefixes`
    or :class:`_Windows`)."""

    def __init__(self, template: ChatTemplate, messages: list[dict], full_text: str, renderings):
        self.template, self.messages, self.full_text, self.renderings = template, messages, full_text, renderings

    def span(self, i: int, cursor: int | None) -> MessageSpan:
        """Message ``i``'s span; ``cursor`` is where the previous in-order message's piece ends."""
        view = self.renderings.view(i)
        # The shortest renderable prefix that ends with this message (or, where the template refuses that, with
        # the fewest messages after it: its trailer then stops where the next message's fields start).
        j = next(k for k in range(i + 1, len(self.messages) + 1) if view.prefix(k) is not None)
        trailer_limit = self._next_fields_start(view, i, j) if j > i + 1 else None
        body_in_prefix = view.locate_in_prefix(i, j)
        body = view.locate_in_full(i, j, body_in_prefix)
        if body == _ABSENT:  # the template drops this message (e.g. a tool turn, an unsupported system prompt)
            return MessageSpan((cursor or 0, cursor or 0), None, None)
        if isinstance(body, tuple) and body_in_prefix == _ABSENT:  # folded into another turn
            return MessageSpan(body, body, None)
        body, after_body, piece_end = self._piece(view, i, j, body, body_in_prefix, trailer_limit, cursor)
        if self.messages[i]["role"] == "assistant":
            start = self._generation_start(view, i, cursor, body, piece_end)
            end = (body[1] + len(after_body.rstrip())) if body is not None else \
                start + len(self.full_text[start:piece_end].rstrip())
        else:
            start, end = body[0], body[1] + self.template.through_first_special(after_body)
        return MessageSpan((start, max(start, end)), body, piece_end)

    def _next_fields_start(self, view, i: int, j: int) -> int:
        """Where message ``i + 1``'s fields start in ``prefixes[j]`` (the first renderable prefix past ``i``)."""
        located = view.locate_in_prefix(i + 1, j)
        if not isinstance(located, tuple):
            raise ChatTemplateError(
                f"the chat template cannot render the first {i + 1} messages on their own, and message {i + 1} "
                "cannot be traced in a longer prefix; per-message spans are found by rendering prefixes of the "
                "conversation")
        return located[0]

    def _piece(self, view, i, j, body, body_in_prefix, trailer_limit, cursor):
        """(body or None, the text after the body up to the piece's end, the piece's end) of message ``i``."""
        message, full_text = self.messages[i], self.full_text
        if isinstance(body, tuple) and isinstance(body_in_prefix, tuple):
            if cursor is not None and body[0] < cursor:
                raise ChatTemplateError(
                    f"the chat template renders message {i} (role {message['role']!r}) before the end of the message "
                    "before it; messages must be rendered in order for their tokens to be told apart")
            after_fields = view.prefix(j)[body_in_prefix[1]:trailer_limit]
            trailer = self.template.common_prefix_at(after_fields, full_text, body[1])
            return body, full_text[body[1]:body[1] + trailer], body[1] + trailer
        # Untraceable fields: only a prefix-stable rendering (up to a closing trailer) locates the message.
        piece_end = None
        if j == i + 1:
            if not (view.absolute or j == len(self.messages)):
                raise _NotLocal  # positions in a window's text are not the full rendering's
            piece_end = self._prefix_end(view.prefix(j), cursor)
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

    def _generation_start(self, view, i, cursor, body, piece_end) -> int:
        """Where assistant message ``i``'s generated text starts in the full rendering: after the part of the
        template's generation prompt that the rendering repeats, never after the message's own fields."""
        prompt = ""
        with_prompt, without = view.generation_render(i), view.prefix(i)
        if with_prompt is not None and without is not None:
            prompt = with_prompt[self.template.common_prefix(with_prompt, without):]
        limit = body[0] if body is not None else piece_end
        start = cursor
        if start is None:  # the first message of the conversation: find the generation prompt before its fields
            found = self.full_text.rfind(prompt, 0, limit + len(prompt)) if prompt else -1
            start = found if found >= 0 else limit
        return min(start + self.template.common_prefix_at(prompt, self.full_text, start), limit)


def has_generation_blocks(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the (given or the tokenizer's) chat template marks assistant output with ``{% generation %}``."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and _GENERATION_TAG.search(template) is not None
