"""Per-token weights, roles and turn codes of a conversation: :func:`tokenize_with_weights`.

:class:`~fused_wce.trl_integration.chat_weights.turn_weighting.TurnWeighting` gives one weight per message;
:func:`tokenize_with_weights` renders the conversation with the tokenizer's chat template and spreads those weights
over the tokens, exactly the tokens ``tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)``
returns.

Token alignment. Every token gets the weight, role code and turn position of the message it belongs to, or is
*scaffolding* (role headers, separators, a tools preamble, a default system prompt): weight 0, role -1, position
-1, or, with ``full_sequence=True``, weight 1 (role and position stay -1). What belongs to a message:

* an **assistant** message: everything the model generates after the template's generation prompt: its
  reasoning (``reasoning_content`` / ``<think>`` blocks as rendered), content, tool calls (the call JSON) and its
  end-of-turn token(s) (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, the closing ``eos`` of Phi-3);
* any other message: its content through its end-of-turn marker (up to the first special token after it);
* a message the template folds into another turn (Gemma-3's and Mistral's system prompt): its text only.

The character spans come from :mod:`~fused_wce.trl_integration.chat_weights.template_spans`. When the template has
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
(:class:`~fused_wce.trl_integration.trainer.sft_trainer.WeightedSFTTrainer` drops such examples with a warning).
"""
from __future__ import annotations

import bisect

from ..token_codes import (ROLE_CODES, SCAFFOLDING, TOKEN_ROLES, TOKEN_TURN_INDEX, TOKEN_TURN_POSITIONS,
                           TOKEN_WEIGHTS, turn_position_code)
from .messages import role_indices
from .rendering import ChatTemplate
from .template_spans import ChatTemplateError, MessageSpan, has_generation_blocks, message_spans
from .turn_weighting import TurnWeighting


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
        (float >= 0, the weight of predicting that token), ``token_roles`` (``token_codes.ROLE_CODES``, -1 for
        scaffolding), ``token_turn_positions`` (index into ``token_codes.TURN_POSITIONS``, -1 for scaffolding),
        ``token_turn_index`` (0-based index of the message among the messages of its role, -1 for scaffolding).

    Raises:
        ValueError: bad messages (see :func:`~.messages.validate_messages`) or a slow tokenizer.
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
    template = ChatTemplate(tokenizer, tools, chat_template, template_kwargs)
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
    codes = _TokenCodes(len(input_ids), messages, message_weights, 1.0 if weighting.full_sequence else 0.0)
    try:
        spans = message_spans(template, messages, full_text)
    except ChatTemplateError as error:
        needs_other_roles = weighting.full_sequence or any(
            w > 0 for w, m in zip(message_weights, messages) if m["role"] != "assistant")
        if not generation or needs_other_roles:
            missing = ("" if generation else " (and it has no {% generation %} blocks to fall back on)")
            raise ChatTemplateError(f"{error}{missing}") from None
        _assign_generation_blocks_only(codes, encoded["assistant_masks"], error)
        return codes.columns(input_ids)

    tokens = _TokenRanges([tuple(pair) for pair in encoded["offset_mapping"]])
    _assign_spans(codes, spans, tokens)
    if generation:  # the generation blocks define the assistant tokens (as TRL uses them); check they fit
        body_tokens = [set(tokens.overlapping(*span.body)) if span.body else set() for span in spans]
        _apply_generation_blocks(codes, encoded["assistant_masks"], body_tokens)
    owners = set(codes.owner)
    for message_index, message in enumerate(messages):
        if message_weights[message_index] > 0 and message_index not in owners:
            raise ChatTemplateError(
                f"message {message_index} (role {message['role']!r}) has weight {message_weights[message_index]:g} "
                "but the chat template renders none of it (it drops the message); remove it or give it weight 0")
    return codes.columns(input_ids)


class _TokenCodes:
    """Per-token weight, role code, turn position, turn index and owning message (-1: scaffolding)."""

    def __init__(self, n_tokens: int, messages: list[dict], message_weights: list[float], scaffold_weight: float):
        self.messages, self.message_weights, self.scaffold_weight = messages, message_weights, scaffold_weight
        self.role_indices = role_indices(messages)
        self.assistant_ids = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        self.is_assistant = set(self.assistant_ids)
        self.weights = [scaffold_weight] * n_tokens
        self.roles = [SCAFFOLDING] * n_tokens
        self.positions = [SCAFFOLDING] * n_tokens
        self.turn_index = [SCAFFOLDING] * n_tokens
        self.owner = [SCAFFOLDING] * n_tokens  # message index of each token

    def assign(self, tokens, message_index: int) -> None:
        in_role, count = self.role_indices[message_index]
        for t in tokens:
            self.weights[t] = self.message_weights[message_index]
            self.roles[t] = ROLE_CODES[self.messages[message_index]["role"]]
            self.positions[t] = turn_position_code(in_role, count)
            self.turn_index[t] = in_role
            self.owner[t] = message_index

    def clear(self, tokens) -> None:
        for t in tokens:
            self.weights[t], self.roles[t], self.positions[t], self.turn_index[t], self.owner[t] = (
                self.scaffold_weight, SCAFFOLDING, SCAFFOLDING, SCAFFOLDING, SCAFFOLDING)

    def columns(self, input_ids: list[int]) -> dict[str, list]:
        return {"input_ids": input_ids, TOKEN_WEIGHTS: self.weights, TOKEN_ROLES: self.roles,
                TOKEN_TURN_POSITIONS: self.positions, TOKEN_TURN_INDEX: self.turn_index}


def _assign_generation_blocks_only(codes: _TokenCodes, assistant_masks, error: ChatTemplateError) -> None:
    """The template cannot be segmented, but only assistant messages carry weight: its generation blocks give them
    (one block per assistant message, in order)."""
    runs = _runs(assistant_masks)
    if len(runs) != len(codes.assistant_ids):
        raise ChatTemplateError(
            f"{error}; falling back on its {{% generation %}} blocks failed: {len(runs)} generation blocks for "
            f"{len(codes.assistant_ids)} assistant messages") from None
    for tokens, message_index in zip(runs, codes.assistant_ids):
        codes.assign(tokens, message_index)


def _assign_spans(codes: _TokenCodes, spans: list[MessageSpan], tokens: "_TokenRanges") -> None:
    """Each message's weighted span to its tokens, in text order (a token straddling two stays with the first);
    ChatTemplateError when two spans overlap."""
    ranges = [tokens.overlapping(*span.weighted) for span in spans]
    for message_index in sorted(range(len(spans)), key=lambda i: spans[i].weighted):
        codes.assign([t for t in ranges[message_index] if codes.owner[t] == SCAFFOLDING], message_index)
    ordered = sorted((span.weighted, i) for i, span in enumerate(spans) if span.weighted[1] > span.weighted[0])
    for (first, a), (second, b) in zip(ordered, ordered[1:]):
        if second[0] < first[1]:
            raise ChatTemplateError(f"messages {a} and {b} overlap in the rendered conversation; the chat template "
                                    "cannot be segmented into per-message spans")


def _apply_generation_blocks(codes: _TokenCodes, assistant_masks, body_tokens: list[set]) -> None:
    """Make the ``{% generation %}`` blocks the assistant tokens, after checking that each lies over exactly one
    assistant message, covers no other message's fields, and covers all of its own."""
    bodies_at: dict[int, list[int]] = {}  # token -> the messages whose fields it shows, in message order
    for message_index, body in enumerate(body_tokens):
        for t in body:
            if t in bodies_at:
                bodies_at[t].append(message_index)
            else:
                bodies_at[t] = [message_index]
    owned = set()
    for run in _runs(assistant_masks):
        owners = sorted({codes.owner[t] for t in run if codes.owner[t] in codes.is_assistant})
        if len(owners) != 1:
            raise ChatTemplateError(
                f"a {{% generation %}} block (tokens {run.start}..{run.stop - 1}) does not lie over exactly one "
                f"assistant message (it overlaps messages {owners}); the template's generation blocks must wrap "
                "each assistant turn on its own")
        message_index = owners[0]
        intruders = sorted({j for t in run for j in bodies_at.get(t, ()) if j != message_index})
        if intruders:
            raise ChatTemplateError(
                f"the {{% generation %}} block of assistant message {message_index} covers the content of "
                f"message {intruders[0]} (role {codes.messages[intruders[0]]['role']!r})")
        owned |= set(run)
        codes.assign(run, message_index)
    tokens_of: dict[int, set] = {message_index: set() for message_index in codes.assistant_ids}
    for t, owner in enumerate(codes.owner):
        if owner in codes.is_assistant:
            tokens_of[owner].add(t)
    for message_index in codes.assistant_ids:
        mine = tokens_of[message_index]
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
        codes.clear(mine - owned)  # the blocks are authoritative for assistant tokens


class _TokenRanges:
    """The tokens under character spans of the text, from the tokens' character offsets."""

    def __init__(self, offsets: list[tuple[int, int]]):
        self.offsets = offsets
        self.nonempty = [t for t, (a, b) in enumerate(offsets) if b > a]
        self.ends = [offsets[t][1] for t in self.nonempty]
        self.starts = [a for a, _ in offsets]
        # Offsets of one text rise with the token index; otherwise each span is found by a scan
        self.sorted = all(x <= y for x, y in zip(self.ends, self.ends[1:])) and \
            all(x <= y for x, y in zip(self.starts, self.starts[1:]))

    def overlapping(self, start: int, end: int) -> range:
        """Tokens whose character offsets overlap [start, end): from the first non-empty token ending after
        ``start`` through the tokens that start before ``end`` (empty range if none)."""
        if end <= start:
            return range(0)
        if self.sorted:
            at = bisect.bisect_right(self.ends, start)
            first = self.nonempty[at] if at < len(self.nonempty) else None
        else:
            first = next((t for t, (a, b) in enumerate(self.offsets) if b > start and b > a), None)
        if first is None or self.offsets[first][0] >= end:
            return range(0)
        if self.sorted:
            return range(first, bisect.bisect_left(self.starts, end))
        last = first
        while last + 1 < len(self.offsets) and self.offsets[last + 1][0] < end:
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
