"""Per-token loss weights from chat conversations.

:class:`TurnWeighting` turns a conversation (a list of ``{"role", "content"[, "weight"]}`` messages) into one
weight per message; :func:`tokenize_with_weights` renders the conversation with the tokenizer's chat template and
spreads those weights over the tokens, exactly the tokens ``tokenizer.apply_chat_template(messages, tools=tools,
tokenize=True)`` returns.

Weight of message ``i`` (role ``r``, the ``j``-th of the ``n_r`` messages of role ``r``, ``k = n_r - 1 - j`` of
them after it)::

    role_weights.get(r, 1.0 if full_sequence else 0.0)
    * (0 if last_n is not None and k >= last_n else 1)
    * (decay ** k if decay is not None else 1)
    * message[message_weight_key]          # 1 when the key is absent or None; any finite float >= 0
    * weight_fn(j, n_r, r, message)        # when given; must return a finite float >= 0

``last_n`` and ``decay`` count turns *within each role*: with ``role_weights={"assistant": 1, "user": 0.3}`` and
``decay=0.5`` the last assistant and the last user message get factor 1, the ones before them 0.5, and so on. For
the default (assistant only) this is exactly "the assistant turn k positions from the end gets decay**k".
``weight_fn`` receives the same role-relative index and count as ``last_n``/``decay``.

Token alignment. Every token gets the weight, role code and turn position of the message it belongs to, or is
*scaffolding* (role headers, separators, a tools preamble, a default system prompt): weight 0, role -1, position
-1, or, with ``full_sequence=True``, weight 1 (role and position stay -1). What belongs to a message:

* an **assistant** message: everything the model generates after the template's generation prompt: its
  reasoning (``reasoning_content`` / ``<think>`` blocks as rendered), content, tool calls (the call JSON) and its
  end-of-turn token(s) (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, the closing ``eos`` of Phi-3);
* any other message: its content through its end-of-turn marker (up to the first special token after it);
* a message the template folds into another turn (Gemma-3's and Mistral's system prompt): its text only.

Spans come from differential rendering, without assuming the template is prefix-stable: each message's fields
are traced (wrapped in private-use markers) in the full conversation, so templates that rewrite earlier turns
(Qwen3 drops earlier ``<think>`` blocks, Phi-3 closes with ``eos``, Mistral moves the system prompt) are handled;
a message's end-of-turn marker is what follows its fields when it ends a rendered prefix; the generation prompt
is ``messages[:i]`` rendered with ``add_generation_prompt=True`` minus ``messages[:i]``. When the template has
``{% generation %}`` blocks (TRL's training templates), they define the assistant tokens, exactly as TRL's
``assistant_masks`` (e.g. the ``\n`` after ``<|im_start|>assistant`` on Qwen2.5, ``<｜Assistant｜>`` on
DeepSeek), after a check that each block lies over one assistant message and covers its fields. Stock TRL
ignores per-message weights, so its two selections are, token for token:
``TurnWeighting(full_sequence=True, message_weight_key=None)`` (its default full-sequence loss) and
``TurnWeighting(message_weight_key=None)`` on the training template (its ``assistant_only_loss``). A token
straddling two spans belongs to the first. A template that cannot be segmented (messages rendered out of order,
fields it branches on, a dropped message that has weight) raises :class:`ChatTemplateError` naming what is wrong;
when it has generation blocks and only assistant messages carry weight, those blocks are used instead.

Bad data raises :class:`ValueError` naming the message index and key: an unknown role, content that is not a
string, a negative, non-finite or non-numeric ``weight``. A conversation whose weights are all 0 is returned as is
(:class:`~fused_wce.trl_integration.trainer.WeightedSFTTrainer` drops such examples with a warning).
"""
from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

ROLE_CODES: dict[str, int] = {"system": 0, "user": 1, "assistant": 2, "tool": 3}  # -1 = scaffolding / no message
TURN_POSITIONS: tuple[str, ...] = ("first", "middle", "last", "only")  # among messages of the same role
SCAFFOLDING = -1

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _check_weight(value: Any, what: str) -> float:
    """``value`` as a finite float >= 0, else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number >= 0, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return value


def turn_position_code(index: int, count: int) -> int:
    """Code in :data:`TURN_POSITIONS` of the ``index``-th (0-based) of ``count`` messages of one role."""
    if count == 1:
        return TURN_POSITIONS.index("only")
    if index == 0:
        return TURN_POSITIONS.index("first")
    return TURN_POSITIONS.index("last" if index == count - 1 else "middle")


def _role_indices(messages: list[dict]) -> list[tuple[int, int]]:
    """For each message: (its 0-based index among messages of its role, the number of messages of that role)."""
    counts: dict[str, int] = {}
    indices = []
    for message in messages:
        role = message["role"]
        indices.append(counts.get(role, 0))
        counts[role] = counts.get(role, 0) + 1
    return [(index, counts[message["role"]]) for index, message in zip(indices, messages)]


def validate_messages(messages: Any) -> None:
    """Raise ValueError (naming the message index and key) unless ``messages`` is a list of chat messages."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"message {index} has no 'role' key (keys: {sorted(message)})")
        if message["role"] not in ROLE_CODES:
            raise ValueError(f"message {index}: unknown 'role' {message['role']!r}; expected one of {list(ROLE_CODES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"message {index}: 'content' must be a string (or None), got {type(content).__name__}")


@dataclass
class TurnWeighting:
    """How much each message of a conversation teaches; see the module docstring for the exact formula.

    Args:
        role_weights: weight per role (keys among :data:`ROLE_CODES`, values finite >= 0). Roles not listed get 0,
            or 1 with ``full_sequence``. Default ``{"assistant": 1.0}``: TRL's ``assistant_only_loss``.
        full_sequence: scaffolding tokens (headers, separators) get weight 1 and unlisted roles get 1: TRL's
            default full-sequence loss.
        last_n: only the last ``last_n`` (>= 1) messages of each role count; earlier ones get 0.
        decay: in (0, 1]; the message ``k`` messages before the last one of its role gets ``decay**k``.
        weight_fn: ``(index_in_role, count_in_role, role, message) -> float >= 0``, multiplied in.
        message_weight_key: the per-message weight key (OpenAI format: ``"weight"``, 0 or 1; any finite float
            >= 0 here), multiplied in; absent or ``None`` values mean 1. ``None`` ignores per-message weights
            (as stock TRL does).
        adaptive: an :class:`~fused_wce.trl_integration.adaptive.AdaptiveTurnWeights`: per-turn (or per-role) loss
            multipliers that follow the running per-group loss during training (applied by the trainer at loss
            time; tokenization ignores it). ``None``: fixed weights.
    """

    role_weights: dict[str, float] = field(default_factory=lambda: {"assistant": 1.0})
    full_sequence: bool = False
    last_n: int | None = None
    decay: float | None = None
    weight_fn: Callable[[int, int, str, dict], float] | None = None
    message_weight_key: str | None = "weight"
    adaptive: Any = None

    def __post_init__(self):
        if self.adaptive is not None:
            from .adaptive import AdaptiveTurnWeights

            if not isinstance(self.adaptive, AdaptiveTurnWeights):
                raise TypeError(f"adaptive must be an AdaptiveTurnWeights or None, got {type(self.adaptive).__name__}")
        if not isinstance(self.role_weights, dict):
            raise TypeError(f"role_weights must be a dict {{role: weight}}, got {type(self.role_weights).__name__}")
        checked = {}
        for role, value in self.role_weights.items():
            if role not in ROLE_CODES:
                raise ValueError(f"role_weights: unknown role {role!r}; expected one of {list(ROLE_CODES)}")
            checked[role] = _check_weight(value, f"role_weights[{role!r}]")
        self.role_weights = checked
        if not isinstance(self.full_sequence, bool):
            raise TypeError(f"full_sequence must be a bool, got {self.full_sequence!r}")
        if self.last_n is not None and (isinstance(self.last_n, bool) or not isinstance(self.last_n, int)
                                        or self.last_n < 1):
            raise ValueError(f"last_n must be None or an int >= 1, got {self.last_n!r}")
        if self.decay is not None:
            if isinstance(self.decay, bool) or not isinstance(self.decay, numbers.Real) or not 0 < self.decay <= 1:
                raise ValueError(f"decay must be None or a number in (0, 1], got {self.decay!r}")
            self.decay = float(self.decay)
        if self.weight_fn is not None and not callable(self.weight_fn):
            raise TypeError(f"weight_fn must be callable or None, got {type(self.weight_fn).__name__}")
        if self.message_weight_key is not None and not isinstance(self.message_weight_key, str):
            raise TypeError(f"message_weight_key must be a str or None, got {self.message_weight_key!r}")

    @classmethod
    def from_cli(cls, role_weights: str | None, full_sequence: bool = False, last_n: int | None = None,
                 decay: float | None = None, **kwargs) -> "TurnWeighting":
        """From ``--role_weights "assistant=1,user=0.1,tool=0"`` (``None`` or empty: assistant only) and the
        other flags; ``kwargs`` go to the constructor (e.g. ``message_weight_key``)."""
        weights = {"assistant": 1.0}
        if role_weights is not None and role_weights.strip():
            weights = {}
            for item in role_weights.split(","):
                role, sep, value = item.partition("=")
                role = role.strip()
                if not sep or not role:
                    raise ValueError(f"--role_weights: expected 'role=weight' items separated by commas, got {item!r} "
                                     f"in {role_weights!r}")
                if role in weights:
                    raise ValueError(f"--role_weights: role {role!r} given twice in {role_weights!r}")
                try:
                    weights[role] = float(value)
                except ValueError:
                    raise ValueError(f"--role_weights: weight of {role!r} is not a number: {value.strip()!r}") from None
        try:
            return cls(role_weights=weights, full_sequence=bool(full_sequence), last_n=last_n, decay=decay, **kwargs)
        except ValueError as error:
            raise ValueError(f"--{str(error)}" if str(error).startswith(("role_weights", "last_n", "decay"))
                             else str(error)) from None

    def message_weights(self, messages: list[dict]) -> list[float]:
        """One validated weight (finite float >= 0) per message; raises ValueError naming the message and key."""
        validate_messages(messages)
        default = 1.0 if self.full_sequence else 0.0
        weights = []
        for index, (message, (in_role, count)) in enumerate(zip(messages, _role_indices(messages))):
            role = message["role"]
            from_end = count - 1 - in_role
            weight = self.role_weights.get(role, default)
            if self.last_n is not None and from_end >= self.last_n:
                weight = 0.0
            if self.decay is not None:
                weight *= self.decay ** from_end
            if self.message_weight_key is not None and message.get(self.message_weight_key) is not None:
                weight *= _check_weight(message[self.message_weight_key],
                                        f"message {index} key {self.message_weight_key!r}")
            if self.weight_fn is not None:
                weight *= _check_weight(self.weight_fn(in_role, count, role, message),
                                        f"weight_fn(...) for message {index}")
            weights.append(weight)
        return weights


# ------------------------------------------------------------------------------------------- template spans
class ChatTemplateError(ValueError):
    """The chat template cannot give the per-message token spans needed (names the missing template feature)."""


# Private-use characters wrapped around a message's fields to trace where the template renders them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_ABSENT, _UNCLEAR = "absent", "unclear"  # a traced message that changes nothing / that changes more than its fields


class _Template:
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


def _traced(message: dict) -> dict | None:
    """A copy of ``message`` with :data:`_OPEN`/:data:`_CLOSE` around each string field the template may render
    (content, reasoning, tool-call names and string arguments); ``None`` when it has none."""
    def wrap(text):
        return _OPEN + text + _CLOSE

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
class _MessageSpan:
    """Character offsets in the full rendering: ``weighted`` is what carries the message's weight, ``body`` where
    its own fields (content, reasoning, tool calls) lie, ``piece_end`` where the text it brings ends."""

    weighted: tuple[int, int]
    body: tuple[int, int] | None
    piece_end: int | None


def _message_spans(template: _Template, messages: list[dict], full_text: str) -> list[_MessageSpan]:
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
    n = len(messages)

    def render_or_none(conversation, **kwargs):
        try:
            return template.render(conversation, **kwargs)
        except Exception:  # noqa: BLE001 - a template may refuse a prefix ("must end with the assistant", "tools
            return None    # need a user message") or a traced field; such renderings are not used

    # prefixes[k]: messages[:k] rendered on their own (None where the template refuses them).
    prefixes: list[str | None] = [render_or_none(messages[:k]) for k in range(n)] + [full_text]

    spans: list[_MessageSpan] = []
    cursor: int | None = None  # end of the previous in-order message's piece
    for i, message in enumerate(messages):
        is_assistant = message["role"] == "assistant"
        # The shortest renderable prefix that ends with this message (or, where the template refuses that, with
        # the fewest messages after it: its trailer then stops where the next message's fields start).
        j = next(k for k in range(i + 1, n + 1) if prefixes[k] is not None)
        prefix, trailer_limit = prefixes[j], None
        traced = _traced(message)
        body_in_prefix = body = _UNCLEAR
        if j > i + 1:
            following = _traced(messages[i + 1])
            located = None if following is None else render_or_none(messages[:i + 1] + [following] + messages[i + 2:j])
            located = _UNCLEAR if located is None else _locate(prefix, located)
            if not isinstance(located, tuple):
                raise ChatTemplateError(
                    f"the chat template cannot render the first {i + 1} messages on their own, and message {i + 1} "
                    "cannot be traced in a longer prefix; per-message spans are found by rendering prefixes of the "
                    "conversation")
            trailer_limit = located[0]
        if traced is not None:
            traced_prefix = render_or_none(messages[:i] + [traced] + messages[i + 1:j])
            body_in_prefix = _UNCLEAR if traced_prefix is None else _locate(prefix, traced_prefix)
            if j == n or (isinstance(body_in_prefix, tuple) and full_text.startswith(prefix)):
                body = body_in_prefix
            else:
                traced_full = render_or_none(messages[:i] + [traced] + messages[i + 1:])
                body = _UNCLEAR if traced_full is None else _locate(full_text, traced_full)

        if body == _ABSENT:  # the template drops this message (e.g. a tool turn, an unsupported system prompt)
            spans.append(_MessageSpan((cursor or 0, cursor or 0), None, None))
            continue
        if isinstance(body, tuple) and body_in_prefix == _ABSENT:  # folded into another turn
            spans.append(_MessageSpan(body, body, None))
            continue

        if isinstance(body, tuple) and isinstance(body_in_prefix, tuple):
            if cursor is not None and body[0] < cursor:
                raise ChatTemplateError(
                    f"the chat template renders message {i} (role {message['role']!r}) before the end of the message "
                    "before it; messages must be rendered in order for their tokens to be told apart")
            trailer = template.common_prefix(prefix[body_in_prefix[1]:trailer_limit], full_text[body[1]:])
            piece_end = body[1] + trailer
            after_body = full_text[body[1]:piece_end]
        else:  # untraceable fields: only a prefix-stable rendering (up to a closing trailer) locates the message
            piece_end = _prefix_end(template, prefix, full_text, cursor) if j == i + 1 else None
            if piece_end is None or not is_assistant:
                raise ChatTemplateError(
                    f"cannot locate message {i} (role {message['role']!r}) in the rendered conversation: the chat "
                    "template renders it differently depending on the turns around it, and its fields cannot be "
                    "traced (it branches on their values)")
            body, after_body = None, ""

        if is_assistant:
            start = _generation_start(template, messages, prefixes, i, full_text, cursor, body, piece_end)
            end = (body[1] + len(after_body.rstrip())) if body is not None else \
                start + len(full_text[start:piece_end].rstrip())
        else:
            start, end = body[0], body[1] + template.through_first_special(after_body)
        spans.append(_MessageSpan((start, max(start, end)), body, piece_end))
        cursor = piece_end
    return spans


def _prefix_end(template: _Template, prefix: str, full_text: str, cursor: int | None) -> int | None:
    """Where ``prefix`` (a rendering of the first messages) ends in ``full_text``, when ``full_text`` extends it,
    possibly less a closing trailer that both end with (Phi-3 closes every rendering with ``eos``)."""
    if full_text.startswith(prefix):
        return len(prefix)
    common = template.common_prefix(prefix, full_text)
    trailer = prefix[common:]
    if trailer and full_text.endswith(trailer) and (cursor is None or common >= cursor):
        return common
    return None


def _generation_start(template, messages, prefixes, i, full_text, cursor, body, piece_end) -> int:
    """Where assistant message ``i``'s generated text starts in ``full_text``: after the part of the template's
    generation prompt that the rendering repeats, never after the message's own fields."""
    prompt = ""
    try:
        with_prompt = template.render(messages[:i], add_generation_prompt=True)
    except Exception:  # noqa: BLE001
        with_prompt = None
    if with_prompt is not None and prefixes[i] is not None:
        prompt = with_prompt[template.common_prefix(with_prompt, prefixes[i]):]
    limit = body[0] if body is not None else piece_end
    start = cursor
    if start is None:  # the first message of the conversation: find the generation prompt before its fields
        found = full_text.rfind(prompt, 0, limit + len(prompt)) if prompt else -1
        start = found if found >= 0 else limit
    return min(start + template.common_prefix(prompt, full_text[start:]), limit)


def _token_range(offsets: list[tuple[int, int]], start: int, end: int) -> range:
    """Tokens whose character offsets overlap [start, end) (empty range if none)."""
    if end <= start:
        return range(0)
    first = next((i for i, (a, b) in enumerate(offsets) if b > start and b > a), None)
    if first is None or offsets[first][0] >= end:
        return range(0)
    last = first
    while last + 1 < len(offsets) and offsets[last + 1][0] < end:
        last += 1
    return range(first, last + 1)


def _runs(mask: list[int]) -> list[range]:
    runs, start = [], None
    for i, bit in enumerate(list(mask) + [0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append(range(start, i))
            start = None
    return runs


def has_generation_blocks(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the (given or the tokenizer's) chat template marks assistant output with ``{% generation %}``."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and _GENERATION_TAG.search(template) is not None


def tokenize_with_weights(tokenizer, messages: list[dict], weighting: TurnWeighting, *,
                          tools: list | None = None, chat_template: str | None = None,
                          template_kwargs: dict | None = None) -> dict[str, list]:
    """Tokenize ``messages`` with the chat template and give every token a weight, role and turn position.

    Args:
        tokenizer: a fast (Rust-backed) tokenizer with a chat template.
        messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str, ["weight": float],
            ["reasoning_content": str], ["tool_calls": [...]]}, ...]``.
        weighting: the :class:`TurnWeighting`.
        tools: passed to the chat template.
        chat_template: a template to use instead of the tokenizer's (as ``apply_chat_template(chat_template=)``,
            e.g. TRL's training template with ``{% generation %}`` blocks).
        template_kwargs: extra template variables (e.g. ``{"enable_thinking": False}``).

    Returns:
        Equal-length lists: ``input_ids`` (int; exactly ``tokenizer.apply_chat_template(messages, tools=tools,
        chat_template=chat_template, tokenize=True, **template_kwargs)["input_ids"]``), ``token_weights``
        (float >= 0, the weight of predicting that token), ``token_roles`` (:data:`ROLE_CODES`, -1 for
        scaffolding), ``token_turn_positions`` (index into :data:`TURN_POSITIONS`, -1 for scaffolding),
        ``token_turn_index`` (0-based index of the message among the messages of its role, -1 for scaffolding).

    Raises:
        ValueError: bad messages (see :func:`validate_messages`) or a slow tokenizer.
        ChatTemplateError (a ValueError): the template cannot give the spans needed, naming what is wrong.
    """
    if not isinstance(weighting, TurnWeighting):
        raise TypeError(f"weighting must be a TurnWeighting, got {type(weighting).__name__}")
    message_weights = weighting.message_weights(messages)  # validates messages
    messages = list(messages)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_with_weights needs a fast tokenizer (character offsets map text spans to tokens)")
    if template_kwargs is not None and not isinstance(template_kwargs, dict):
        raise TypeError(f"template_kwargs must be a dict or None, got {type(template_kwargs).__name__}")
    template = _Template(tokenizer, tools, chat_template, template_kwargs)
    generation = has_generation_blocks(tokenizer, chat_template)
    try:
        full_text = template.render(messages)
        encoded = tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=chat_template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=generation, tokenizer_kwargs={"return_offsets_mapping": True},
            **template.kwargs)
    except Exception as error:  # noqa: BLE001 - the template rejects the conversation itself
        raise ChatTemplateError(f"the chat template cannot render this conversation: {error}") from error
    input_ids = list(encoded["input_ids"])
    offsets = [tuple(pair) for pair in encoded["offset_mapping"]]
    n_tokens = len(input_ids)
    scaffold_weight = 1.0 if weighting.full_sequence else 0.0
    weights = [scaffold_weight] * n_tokens
    roles = [SCAFFOLDING] * n_tokens
    positions = [SCAFFOLDING] * n_tokens
    turn_index = [SCAFFOLDING] * n_tokens
    owner = [SCAFFOLDING] * n_tokens  # message index of each token
    role_indices = _role_indices(messages)
    assistant_ids = [i for i, m in enumerate(messages) if m["role"] == "assistant"]

    def assign(tokens, message_index):
        in_role, count = role_indices[message_index]
        for t in tokens:
            weights[t] = message_weights[message_index]
            roles[t] = ROLE_CODES[messages[message_index]["role"]]
            positions[t] = turn_position_code(in_role, count)
            turn_index[t] = in_role
            owner[t] = message_index

    def clear(tokens):
        for t in tokens:
            weights[t], roles[t], positions[t], turn_index[t], owner[t] = (
                scaffold_weight, SCAFFOLDING, SCAFFOLDING, SCAFFOLDING, SCAFFOLDING)

    try:
        spans = _message_spans(template, messages, full_text)
    except ChatTemplateError as error:
        needs_other_roles = weighting.full_sequence or any(
            w > 0 for w, m in zip(message_weights, messages) if m["role"] != "assistant")
        if not generation or needs_other_roles:
            missing = ("" if generation else " (and it has no {% generation %} blocks to fall back on)")
            raise ChatTemplateError(f"{error}{missing}") from None
        runs = _runs(encoded["assistant_masks"])
        if len(runs) != len(assistant_ids):
            raise ChatTemplateError(
                f"{error}; falling back on its {{% generation %}} blocks failed: {len(runs)} generation blocks for "
                f"{len(assistant_ids)} assistant messages") from None
        for tokens, message_index in zip(runs, assistant_ids):
            assign(tokens, message_index)
        return _result(input_ids, weights, roles, positions, turn_index)

    # Regions are assigned in text order; a token straddling two regions stays with the first.
    ranges = [_token_range(offsets, *span.weighted) for span in spans]
    for message_index in sorted(range(len(spans)), key=lambda i: spans[i].weighted):
        assign([t for t in ranges[message_index] if owner[t] == SCAFFOLDING], message_index)
    ordered = sorted((span.weighted, i) for i, span in enumerate(spans) if span.weighted[1] > span.weighted[0])
    for (first, a), (second, b) in zip(ordered, ordered[1:]):
        if second[0] < first[1]:
            raise ChatTemplateError(f"messages {a} and {b} overlap in the rendered conversation; the chat template "
                                    "cannot be segmented into per-message spans")
    body_tokens = [set(_token_range(offsets, *span.body)) if span.body else set() for span in spans]

    if generation:  # the generation blocks define the assistant tokens (as TRL uses them); check they fit
        owned = set()
        for run in _runs(encoded["assistant_masks"]):
            owners = sorted({owner[t] for t in run if owner[t] in assistant_ids})
            if len(owners) != 1:
                raise ChatTemplateError(
                    f"a {{% generation %}} block (tokens {run.start}..{run.stop - 1}) does not lie over exactly one "
                    f"assistant message (it overlaps messages {owners}); the template's generation blocks must wrap "
                    "each assistant turn on its own")
            message_index = owners[0]
            intruders = [j for j in range(len(messages)) if j != message_index and body_tokens[j] & set(run)]
            if intruders:
                raise ChatTemplateError(
                    f"the {{% generation %}} block of assistant message {message_index} covers the content of "
                    f"message {intruders[0]} (role {messages[intruders[0]]['role']!r})")
            owned |= set(run)
            assign(run, message_index)
        for message_index in assistant_ids:
            mine = {t for t in range(n_tokens) if owner[t] == message_index}
            if not mine:
                continue
            if not mine & owned:
                raise ChatTemplateError(
                    f"assistant message {message_index} has no {{% generation %}} block around it; the template "
                    "must wrap every assistant turn in {% generation %}...{% endgeneration %}")
            if not body_tokens[message_index] <= owned:
                raise ChatTemplateError(
                    f"the {{% generation %}} block of message {message_index} does not cover its content; wrap the "
                    "assistant content (and its end-of-turn token) in {% generation %}...{% endgeneration %}")
            clear(mine - owned)  # the blocks are authoritative for assistant tokens

    for message_index, (message, span) in enumerate(zip(messages, spans)):
        if message_weights[message_index] > 0 and not any(o == message_index for o in owner):
            raise ChatTemplateError(
                f"message {message_index} (role {message['role']!r}) has weight {message_weights[message_index]:g} "
                "but the chat template renders none of it (it drops the message); remove it or give it weight 0")
    return _result(input_ids, weights, roles, positions, turn_index)


def _result(input_ids, weights, roles, positions, turn_index) -> dict[str, list]:
    return {"input_ids": input_ids, "token_weights": weights, "token_roles": roles,
            "token_turn_positions": positions, "token_turn_index": turn_index}
