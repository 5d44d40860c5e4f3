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

Token alignment. A message's *weighted span* is its content and its end-of-turn marker (the text right after the
content up to the next whitespace, ``<|im_end|>`` in ChatML): those tokens get the message's weight, its role code
and its turn position. Everything else the template renders (role headers, the newline after ``<|im_end|>``, a
tools block, a generation prompt) is *scaffolding*: weight 0, role -1, position -1, or, with
``full_sequence=True``, weight 1 (role and position stay -1). Stock TRL ignores per-message weights, so its two
selections are, token for token: ``TurnWeighting(full_sequence=True, message_weight_key=None)`` (its default
full-sequence loss: every token 1) and ``TurnWeighting(message_weight_key=None)`` (its ``assistant_only_loss``,
on templates with ``{% generation %}`` blocks: weight 1 exactly where ``assistant_masks`` is 1).

A token that straddles a span boundary (e.g. a BPE token fusing a header newline with the content's first
character) belongs to the message. Spans are found by rendering the template on growing prefixes of the
conversation (prefix ``k+1`` must extend prefix ``k``) and locating each message's content in its rendered piece;
characters map to tokens through the fast tokenizer's offsets. When the template has ``{% generation %}`` blocks,
they define the assistant tokens (as in TRL) and are checked against the spans: each block must lie inside the
rendered piece of one assistant message and cover its content. A template that is not prefix-stable still works
through its generation blocks when only assistant messages carry weight (other messages then keep role -1).

Bad data raises :class:`ValueError` naming the message index and key: an unknown role, content that is not a
string, a negative, non-finite or non-numeric ``weight``. A conversation whose weights are all 0 is returned as is
(:class:`~fused_wce.trl_integration.trainer.WeightedSFTTrainer` drops such examples with a warning).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable

ROLE_CODES: dict[str, int] = {"system": 0, "user": 1, "assistant": 2, "tool": 3}  # -1 = scaffolding / no message
TURN_POSITIONS: tuple[str, ...] = ("first", "middle", "last", "only")  # among messages of the same role
SCAFFOLDING = -1

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SENTINEL = "\u2063fused_wce_content_sentinel\u2063"


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


def _render(tokenizer, messages, tools, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


def _message_spans(tokenizer, messages: list[dict], tools, full_text: str) -> list[tuple[int, int, int, int]]:
    """Per message: (piece_start, weighted_start, weighted_end, piece_end) character offsets in ``full_text``.

    ``piece`` is what the message adds to the rendering of the messages before it; ``weighted`` is its content
    plus the end-of-turn marker. Raises ChatTemplateError when rendering is not prefix-stable or the content is
    not rendered verbatim.
    """
    try:
        previous = _render(tokenizer, [], tools)
    except Exception:  # noqa: BLE001 - some templates index messages[0]; their preamble then joins message 0
        previous = ""
    spans = []
    for index, message in enumerate(messages):
        prefix = list(messages[: index + 1])
        try:
            current = full_text if index == len(messages) - 1 else _render(tokenizer, prefix, tools)
            marked = dict(message, content=_SENTINEL)
            with_sentinel = _render(tokenizer, prefix[:-1] + [marked], tools)
        except Exception as error:  # noqa: BLE001 - a template may refuse a prefix (e.g. "must end with user")
            raise ChatTemplateError(
                f"the chat template cannot render the first {index + 1} messages on their own ({error}); per-message "
                "spans need a template that renders every prefix of a conversation (prefix-stable rendering)") from error
        if not current.startswith(previous) or not with_sentinel.startswith(previous):
            raise ChatTemplateError(
                f"the chat template is not prefix-stable: rendering messages[:{index + 1}] does not extend the "
                f"rendering of messages[:{index}] (the template changes earlier turns when later ones are added), so "
                "message spans cannot be found by diffing; a template with {% generation %} blocks still works when "
                "only assistant messages carry weight")
        start = len(previous)
        header = with_sentinel.find(_SENTINEL, start)
        content = message.get("content") or ""
        if header < 0:
            raise ChatTemplateError(f"the chat template does not render the content of message {index} "
                                    f"(role {message['role']!r}) verbatim (it drops or transforms it), so its "
                                    "tokens cannot be located")
        content_start = header
        if current.startswith(content, content_start):
            content_end = content_start + len(content)
        elif current.startswith(content.strip(), content_start):  # templates that strip content
            content_end = content_start + len(content.strip())
        else:
            raise ChatTemplateError(f"the chat template does not render the content of message {index} verbatim "
                                    "(it transforms it), so its tokens cannot be located")
        trailer = current[content_end:]
        eot = trailer.lstrip()
        eot_start = content_end + (len(trailer) - len(eot))
        eot_word = re.match(r"\S*", eot).group(0)
        # The end-of-turn marker joins the span only when it directly follows the content (or its whitespace).
        weighted_end = eot_start + len(eot_word) if eot_word else content_end
        spans.append((start, content_start, weighted_end, len(current)))
        previous = current
    if previous != full_text:
        raise ChatTemplateError("the chat template is not prefix-stable: the full conversation does not render as "
                                "the concatenation of its per-message pieces")
    return spans


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
                          tools: list | None = None) -> dict[str, list]:
    """Tokenize ``messages`` with the chat template and give every token a weight, role and turn position.

    Args:
        tokenizer: a fast (Rust-backed) tokenizer with a chat template.
        messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str, ["weight": float]}, ...]``.
        weighting: the :class:`TurnWeighting`.
        tools: passed to the chat template.

    Returns:
        Equal-length lists: ``input_ids`` (int; exactly ``tokenizer.apply_chat_template(messages, tools=tools,
        tokenize=True)["input_ids"]``), ``token_weights`` (float >= 0, the weight of predicting that token),
        ``token_roles`` (:data:`ROLE_CODES`, -1 for scaffolding), ``token_turn_positions`` (index into
        :data:`TURN_POSITIONS`, -1 for scaffolding), ``token_turn_index`` (0-based index of the message among the
        messages of its role, -1 for scaffolding).

    Raises:
        ValueError: bad messages (see :func:`validate_messages`) or a slow tokenizer.
        ChatTemplateError (a ValueError): the template cannot give the spans needed, naming the missing feature.
    """
    if not isinstance(weighting, TurnWeighting):
        raise TypeError(f"weighting must be a TurnWeighting, got {type(weighting).__name__}")
    message_weights = weighting.message_weights(messages)  # validates messages
    messages = list(messages)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_with_weights needs a fast tokenizer (character offsets map text spans to tokens)")
    generation = has_generation_blocks(tokenizer)
    encoded = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=generation,
        tokenizer_kwargs={"return_offsets_mapping": True})
    input_ids = list(encoded["input_ids"])
    offsets = [tuple(pair) for pair in encoded["offset_mapping"]]
    full_text = _render(tokenizer, messages, tools)
    n_tokens = len(input_ids)
    scaffold_weight = 1.0 if weighting.full_sequence else 0.0
    weights = [scaffold_weight] * n_tokens
    roles = [SCAFFOLDING] * n_tokens
    positions = [SCAFFOLDING] * n_tokens
    turn_index = [SCAFFOLDING] * n_tokens
    role_indices = _role_indices(messages)
    assistant_ids = [i for i, m in enumerate(messages) if m["role"] == "assistant"]

    def assign(tokens, message_index):
        in_role, count = role_indices[message_index]
        for t in tokens:
            weights[t] = message_weights[message_index]
            roles[t] = ROLE_CODES[messages[message_index]["role"]]
            positions[t] = turn_position_code(in_role, count)
            turn_index[t] = in_role

    try:
        spans = _message_spans(tokenizer, messages, tools, full_text)
    except ChatTemplateError as error:
        needs_other_roles = weighting.full_sequence or any(
            w > 0 for w, m in zip(message_weights, messages) if m["role"] != "assistant")
        if not generation or needs_other_roles:
            missing = ("" if generation else " and it has no {% generation %} blocks to fall back on")
            raise ChatTemplateError(f"{error}{missing}") from None
        runs = _runs(encoded["assistant_masks"])
        if len(runs) != len(assistant_ids):
            raise ChatTemplateError(
                f"{error}; falling back on its {{% generation %}} blocks failed: {len(runs)} generation blocks for "
                f"{len(assistant_ids)} assistant messages") from None
        for tokens, message_index in zip(runs, assistant_ids):
            assign(tokens, message_index)
        return _result(input_ids, weights, roles, positions, turn_index)

    for message_index, (_, start, end, _) in enumerate(spans):
        assign(_token_range(offsets, start, end), message_index)

    if generation:  # the generation blocks define the assistant tokens (as TRL uses them); check they fit
        runs = _runs(encoded["assistant_masks"])
        for run in runs:
            owners = [i for i in assistant_ids
                      if set(run) <= set(_token_range(offsets, spans[i][0], spans[i][3]))]
            if len(owners) != 1:
                raise ChatTemplateError(
                    f"a {{% generation %}} block (tokens {run.start}..{run.stop - 1}) does not lie inside the rendering "
                    "of a single assistant message; the template's generation blocks must wrap assistant turns only")
            owner = owners[0]
            content_tokens = set(_token_range(offsets, spans[owner][1], spans[owner][2]))
            content_only = _token_range(offsets, spans[owner][1],
                                        spans[owner][1] + len(messages[owner].get("content") or ""))
            if not set(content_only) <= set(run):
                raise ChatTemplateError(
                    f"the {{% generation %}} block of message {owner} does not cover its content; wrap the assistant "
                    "content (and its end-of-turn token) in {% generation %}...{% endgeneration %}")
            for t in content_tokens - set(run):  # the block is authoritative for assistant tokens
                weights[t], roles[t], positions[t], turn_index[t] = (
                    scaffold_weight, SCAFFOLDING, SCAFFOLDING, SCAFFOLDING)
            assign(run, owner)
        covered = {i for run in runs for i in assistant_ids
                   if set(run) <= set(_token_range(offsets, spans[i][0], spans[i][3]))}
        missing = [i for i in assistant_ids if i not in covered and _token_range(offsets, spans[i][1], spans[i][2])]
        if missing:
            raise ChatTemplateError(f"assistant message {missing[0]} has no {{% generation %}} block around it; the "
                                    "template must wrap every assistant turn in {% generation %}")
    return _result(input_ids, weights, roles, positions, turn_index)


def _result(input_ids, weights, roles, positions, turn_index) -> dict[str, list]:
    return {"input_ids": input_ids, "token_weights": weights, "token_roles": roles,
            "token_turn_positions": positions, "token_turn_index": turn_index}
