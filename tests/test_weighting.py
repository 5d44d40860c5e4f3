"""TurnWeighting and tokenize_with_weights: weight schemes, token alignment on ChatML (with and without
{% generation %}), template errors and bad data."""
from __future__ import annotations

import math

import pytest

from fused_wce.trl_integration.chat_data import (
    CHATML_TEMPLATE,
    CHATML_TEMPLATE_NO_GENERATION,
    build_tokenizer,
)
from fused_wce.trl_integration import (
    ROLE_CODES,
    TURN_POSITIONS,
    ChatTemplateError,
    TurnWeighting,
    tokenize_with_weights,
)

FIRST, MIDDLE, LAST, ONLY = (TURN_POSITIONS.index(name) for name in ("first", "middle", "last", "only"))


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The same tokenizer with the ChatML template without {% generation %} markers."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE_NO_GENERATION
    return tokenizer


CONVERSATION = [
    {"role": "system", "content": "You are a concise math tutor."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19."},
    {"role": "user", "content": "Use the calculator: what is 597 * 61?"},
    {"role": "assistant", "content": '<tool_call>{"name": "calculator"}</tool_call>'},
    {"role": "tool", "content": '{"result": 36417}'},
    {"role": "assistant", "content": "597 * 61 = 36417.", "weight": 0.5},
    {"role": "user", "content": "Grüße aus Köln 😀, and 東京?"},
    {"role": "assistant", "content": "Hallo! Tokyo: 東京 😀."},
]


def expected_alignment(tokenizer, messages, message_weights, scaffold_weight=0.0):
    """Independent ChatML alignment: encode every rendered piece on its own and label its tokens.

    ChatML renders each message as ``<|im_start|>{role}\\n`` (scaffolding) ``{content}<|im_end|>`` (the message)
    ``\\n`` (scaffolding). With the byte-level pre-tokenizer no token crosses these boundaries for the test
    contents (no leading/trailing whitespace), which the caller asserts by comparing the ids.
    """
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids, weights, roles, owner = [], [], [], []
    for index, (message, weight) in enumerate(zip(messages, message_weights)):
        header = [im_start] + encode(message["role"] + "\n")
        body = encode(message["content"]) + [im_end]
        tail = encode("\n")
        ids += header + body + tail
        weights += [scaffold_weight] * len(header) + [weight] * len(body) + [scaffold_weight] * len(tail)
        roles += [-1] * len(header) + [ROLE_CODES[message["role"]]] * len(body) + [-1] * len(tail)
        owner += [-1] * len(header) + [index] * len(body) + [-1] * len(tail)
    return ids, weights, roles, owner


# ---------------------------------------------------------------------------------------------- token alignment
@pytest.mark.parametrize("template", ["generation", "no_generation"])
def test_alignment_token_by_token(tokenizer, plain_tokenizer, template):
    tok = tokenizer if template == "generation" else plain_tokenizer
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.25, "system": 0.125, "tool": 0.0625})
    out = tokenize_with_weights(tok, CONVERSATION, weighting)
    ids, weights, roles, owner = expected_alignment(tok, CONVERSATION, weighting.message_weights(CONVERSATION))
    assert out["input_ids"] == ids
    assert out["input_ids"] == tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert out["token_weights"] == weights
    assert out["token_roles"] == roles
    # Each weighted run decodes to exactly the message content followed by <|im_end|>.
    for index, message in enumerate(CONVERSATION):
        tokens = [t for t, o in zip(out["input_ids"], owner) if o == index]
        assert tok.decode(tokens) == message["content"] + "<|im_end|>"
    assert set(map(len, out.values())) == {len(ids)}


@pytest.mark.parametrize("template", ["generation", "no_generation"])
def test_content_with_private_use_characters(tokenizer, plain_tokenizer, template):
    """Private-use characters (which tracing wraps around fields) in the content: traced with others, no error."""
    tok = tokenizer if template == "generation" else plain_tokenizer
    private = "".join(chr(code) for code in range(0xE000, 0xE010))
    messages = [{"role": "user", "content": f"Echo {private}."}, {"role": "assistant", "content": f"{private} \ue001"},
                {"role": "user", "content": "\ue000"}, {"role": "assistant", "content": "ok \U000f0000"}]
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5})
    out = tokenize_with_weights(tok, messages, weighting)
    ids, weights, roles, owner = expected_alignment(tok, messages, weighting.message_weights(messages))
    assert out["input_ids"] == ids and out["token_weights"] == weights and out["token_roles"] == roles
    for index, message in enumerate(messages):
        assert tok.decode([t for t, o in zip(ids, owner) if o == index]) == message["content"] + "<|im_end|>"


def test_generation_mask_agrees_with_assistant_tokens(tokenizer):
    """Assistant-only weights are TRL's assistant_masks (from the {% generation %} blocks), token for token."""
    out = tokenize_with_weights(tokenizer, CONVERSATION, TurnWeighting(message_weight_key=None))
    mask = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert out["token_weights"] == [float(bit) for bit in mask["assistant_masks"]]
    assert sum(mask["assistant_masks"]) > 20


def test_templates_with_and_without_generation_agree(tokenizer, plain_tokenizer):
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5}, decay=0.5)
    assert tokenize_with_weights(tokenizer, CONVERSATION, weighting) == \
        tokenize_with_weights(plain_tokenizer, CONVERSATION, weighting)


def test_turn_positions_and_indices(tokenizer):
    out = tokenize_with_weights(tokenizer, CONVERSATION, TurnWeighting())
    _, _, _, owner = expected_alignment(tokenizer, CONVERSATION, [0.0] * len(CONVERSATION))
    # system: only; users: first, middle, last; assistants: first, middle, middle, last; tool: only.
    expected_position = [ONLY, FIRST, FIRST, MIDDLE, MIDDLE, ONLY, MIDDLE, LAST, LAST]
    expected_index = [0, 0, 0, 1, 1, 0, 2, 2, 3]
    for t, o in enumerate(owner):
        assert out["token_turn_positions"][t] == (expected_position[o] if o >= 0 else -1), t
        assert out["token_turn_index"][t] == (expected_index[o] if o >= 0 else -1), t


def test_full_sequence_weights_every_token(tokenizer):
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in CONVERSATION]
    out = tokenize_with_weights(tokenizer, messages, TurnWeighting(full_sequence=True))
    assert out["token_weights"] == [1.0] * len(out["input_ids"])
    _, _, roles, _ = expected_alignment(tokenizer, messages, [1.0] * len(messages))
    assert out["token_roles"] == roles  # scaffolding keeps role -1 for the per-role curves


def test_full_sequence_with_rules(tokenizer):
    """Scaffolding 1, listed roles their weight, unlisted roles 1, per-message weights still multiply."""
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5}, full_sequence=True)
    assert weighting.message_weights(CONVERSATION) == [1.0, 0.5, 1.0, 0.5, 1.0, 1.0, 0.5, 0.5, 1.0]
    out = tokenize_with_weights(tokenizer, CONVERSATION, weighting)
    _, weights, _, _ = expected_alignment(tokenizer, CONVERSATION, weighting.message_weights(CONVERSATION), 1.0)
    assert out["token_weights"] == weights


def test_boundary_whitespace_and_empty_content(tokenizer, plain_tokenizer):
    """Content with leading/trailing whitespace (BPE may fuse it with the header newline) and empty content."""
    messages = [{"role": "user", "content": "\n\n  spaced out  \n"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": " leading space\n"}]
    for tok in (tokenizer, plain_tokenizer):
        out = tokenize_with_weights(tok, messages, TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5}))
        text = tok.apply_chat_template(messages, tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert out["input_ids"] == enc["input_ids"]
        for index, message in enumerate(messages):
            start = _piece_start(text, index)
            header = "<|im_start|>" + message["role"] + "\n"
            assert text.startswith(header + message["content"] + "<|im_end|>\n", start)
            content_start = start + len(header)
            end = content_start + len(message["content"]) + len("<|im_end|>")
            expected = {t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > content_start}
            got = {t for t, r in enumerate(out["token_roles"]) if r >= 0 and out["token_turn_index"][t] == index // 2
                   and r == ROLE_CODES[message["role"]]}
            assert got == expected, (index, message)
            assert {out["token_weights"][t] for t in got} == {1.0 if message["role"] == "assistant" else 0.5}
        # The empty assistant message still teaches its end of turn: exactly one <|im_end|> token.
        empty = [t for t, r in enumerate(out["token_roles"]) if r == ROLE_CODES["assistant"]
                 and out["token_turn_index"][t] == 0]
        assert [tok.convert_ids_to_tokens(out["input_ids"][t]) for t in empty] == ["<|im_end|>"]


def _piece_start(text, index):
    """Character where the ``index``-th ``<|im_start|>`` begins."""
    position = -1
    for _ in range(index + 1):
        position = text.index("<|im_start|>", position + 1)
    return position


def test_tools_block_is_scaffolding(tokenizer):
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "tool": 0.5})
    out = tokenize_with_weights(tokenizer, CONVERSATION, weighting, tools=tools)
    plain = tokenize_with_weights(tokenizer, CONVERSATION, weighting)
    reference = tokenizer.apply_chat_template(CONVERSATION, tools=tools, tokenize=True)["input_ids"]
    assert out["input_ids"] == reference
    extra = len(out["input_ids"]) - len(plain["input_ids"])
    assert extra > 10 and out["input_ids"][extra:] == plain["input_ids"]
    assert out["token_weights"][:extra] == [0.0] * extra and out["token_roles"][:extra] == [-1] * extra
    assert out["token_weights"][extra:] == plain["token_weights"]


# ---------------------------------------------------------------------------------------------- weight schemes
CHAT = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u0"}, {"role": "assistant", "content": "a0"},
    {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
    {"role": "tool", "content": "t0"},
    {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"},
]


def test_default_is_assistant_only():
    assert TurnWeighting().message_weights(CHAT) == [0, 0, 1, 0, 1, 0, 0, 1]


def test_role_weights():
    weighting = TurnWeighting(role_weights={"assistant": 2.0, "user": 0.5, "tool": 0.25})
    assert weighting.message_weights(CHAT) == [0, 0.5, 2, 0.5, 2, 0.25, 0.5, 2]


def test_last_n_counts_within_each_role():
    assert TurnWeighting(last_n=1).message_weights(CHAT) == [0, 0, 0, 0, 0, 0, 0, 1]
    assert TurnWeighting(last_n=2).message_weights(CHAT) == [0, 0, 0, 0, 1, 0, 0, 1]
    both = TurnWeighting(role_weights={"assistant": 1.0, "user": 1.0, "system": 1.0}, last_n=2)
    assert both.message_weights(CHAT) == [1, 0, 0, 1, 1, 0, 1, 1]


def test_decay():
    assert TurnWeighting(decay=0.5).message_weights(CHAT) == [0, 0, 0.25, 0, 0.5, 0, 0, 1]
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5}, decay=0.1)
    assert weighting.message_weights(CHAT) == pytest.approx([0, 0.005, 0.01, 0.05, 0.1, 0, 0.5, 1])


def test_per_message_weight_multiplies():
    chat = [dict(m) for m in CHAT]
    chat[2]["weight"], chat[4]["weight"], chat[3]["weight"], chat[7]["weight"] = 0, 0.5, 3, None
    assert TurnWeighting(decay=0.5).message_weights(chat) == [0, 0, 0, 0, 0.25, 0, 0, 1]
    assert TurnWeighting(role_weights={"user": 1.0}).message_weights(chat) == [0, 1, 0, 3, 0, 0, 1, 0]
    assert TurnWeighting(message_weight_key=None).message_weights(chat) == [0, 0, 1, 0, 1, 0, 0, 1]
    chat[7]["loss_weight"] = 0.75
    assert TurnWeighting(message_weight_key="loss_weight").message_weights(chat) == [0, 0, 1, 0, 1, 0, 0, 0.75]


def test_weight_fn_arguments_and_product():
    calls = []

    def weight_fn(index, count, role, message):
        calls.append((index, count, role, message["content"]))
        return 1.0 + index

    weighting = TurnWeighting(role_weights={"assistant": 1.0, "tool": 1.0}, decay=0.5, weight_fn=weight_fn)
    assert weighting.message_weights(CHAT) == [0, 0, 0.25, 0, 1.0, 1.0, 0, 3.0]
    assert calls == [(0, 1, "system", "s"), (0, 3, "user", "u0"), (0, 3, "assistant", "a0"),
                     (1, 3, "user", "u1"), (1, 3, "assistant", "a1"), (0, 1, "tool", "t0"),
                     (2, 3, "user", "u2"), (2, 3, "assistant", "a2")]


def test_combination_on_tokens(tokenizer):
    """Role weights, last_n, decay, a per-message weight and weight_fn at once, checked token by token."""
    chat = [dict(m, content=f"message number {i}") for i, m in enumerate(CHAT)]
    chat[4]["weight"] = 0.5
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5, "tool": 1.0}, last_n=2, decay=0.5,
                              weight_fn=lambda index, count, role, message: 2.0 if role == "tool" else 1.0)
    expected_message = [0, 0, 0, 0.25, 0.25, 2.0, 0.5, 1.0]
    assert weighting.message_weights(chat) == expected_message
    out = tokenize_with_weights(tokenizer, chat, weighting)
    ids, weights, _, _ = expected_alignment(tokenizer, chat, expected_message)
    assert out["input_ids"] == ids and out["token_weights"] == weights


def test_conversation_without_weighted_token_is_returned_all_zero(tokenizer):
    messages = [{"role": "system", "content": "hi"}, {"role": "user", "content": "hello"}]
    out = tokenize_with_weights(tokenizer, messages, TurnWeighting())
    assert len(out["input_ids"]) > 5 and out["token_weights"] == [0.0] * len(out["input_ids"])


# ------------------------------------------------------------------------------------------------ CLI parsing
def test_from_cli():
    assert TurnWeighting.from_cli(None, False, None, None) == TurnWeighting()
    weighting = TurnWeighting.from_cli(" assistant=1, user=0.1 ,tool=0", True, 3, 0.5)
    assert weighting == TurnWeighting(role_weights={"assistant": 1.0, "user": 0.1, "tool": 0.0},
                                      full_sequence=True, last_n=3, decay=0.5)
    for bad, match in [("assistant", "role=weight"), ("assistant=x", "not a number"),
                       ("bot=1", "unknown role 'bot'"), ("user=1,user=2", "twice"),
                       ("user=-1", r"^--role_weights: the weight of 'user' must be a finite number >= 0, got -1.0$")]:
        with pytest.raises(ValueError, match=match):
            TurnWeighting.from_cli(bad, False, None, None)
    # In the words of the flags (the Python API's messages say "must be None or ...")
    with pytest.raises(ValueError, match=r"^--last_n must be an int >= 1, got 0$"):
        TurnWeighting.from_cli(None, False, 0, None)
    with pytest.raises(ValueError, match=r"^--decay must be a number in \(0, 1\], got -0.5$"):
        TurnWeighting.from_cli(None, False, None, -0.5)


# ---------------------------------------------------------------------------------------------------- bad data
@pytest.mark.parametrize("kwargs, match", [
    (dict(role_weights={"bot": 1.0}), "unknown role 'bot'"),
    (dict(role_weights={"user": -1.0}), r"role_weights\['user'\]"),
    (dict(role_weights={"user": math.nan}), "finite"),
    (dict(role_weights={"user": "1"}), "number"),
    (dict(last_n=0), "last_n"),
    (dict(last_n=1.5), "last_n"),
    (dict(decay=0.0), "decay"),
    (dict(decay=2.0), "decay"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TurnWeighting(**kwargs)


def test_bad_setting_types():
    with pytest.raises(TypeError, match="weight_fn"):
        TurnWeighting(weight_fn=3)
    with pytest.raises(TypeError, match="role_weights"):
        TurnWeighting(role_weights=[("assistant", 1.0)])


@pytest.mark.parametrize("message, match", [
    ({"role": "bot", "content": "x"}, r"message 1: unknown 'role' 'bot'"),
    ({"content": "x"}, r"message 1 has no 'role'"),
    ({"role": "assistant", "content": "x", "weight": -1}, r"message 1 key 'weight'.*>= 0"),
    ({"role": "assistant", "content": "x", "weight": "1"}, r"message 1 key 'weight' must be a number"),
    ({"role": "assistant", "content": "x", "weight": math.inf}, r"message 1 key 'weight'.*finite"),
    ({"role": "assistant", "content": ["x"]}, r"message 1: 'content' must be a string"),
    ("hello", r"message 1 must be a dict"),
])
def test_bad_messages(tokenizer, message, match):
    messages = [{"role": "user", "content": "hi"}, message]
    with pytest.raises(ValueError, match=match):
        TurnWeighting().message_weights(messages)
    with pytest.raises(ValueError, match=match):
        tokenize_with_weights(tokenizer, messages, TurnWeighting())


def test_bad_weight_fn_result():
    with pytest.raises(ValueError, match=r"weight_fn\(...\) for message 0"):
        TurnWeighting(weight_fn=lambda *args: -0.5).message_weights(CHAT)
    with pytest.raises(ValueError, match="weight_fn"):
        TurnWeighting(weight_fn=lambda *args: None).message_weights(CHAT)


def test_messages_not_a_list(tokenizer):
    with pytest.raises(ValueError, match="messages must be a list"):
        tokenize_with_weights(tokenizer, "hello", TurnWeighting())
    with pytest.raises(TypeError, match="weighting"):
        tokenize_with_weights(tokenizer, CHAT, {"assistant": 1.0})


# ------------------------------------------------------------------------------------------- template errors
def _with_template(template):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


# Renders a message count up front: every prefix renders differently from the full conversation.
COUNTING = "{{ messages | length }}\n" + CHATML_TEMPLATE
COUNTING_NO_GENERATION = "{{ messages | length }}\n" + CHATML_TEMPLATE_NO_GENERATION
# Renders the length of the whole conversation's JSON up front: tracing any message changes it, so no message can
# be located (the template branches on every field).
JSON_LENGTH = "{{ messages | tojson | length }}\n" + CHATML_TEMPLATE
JSON_LENGTH_NO_GENERATION = "{{ messages | tojson | length }}\n" + CHATML_TEMPLATE_NO_GENERATION


@pytest.mark.parametrize("template", [COUNTING, COUNTING_NO_GENERATION])
def test_template_that_is_not_prefix_stable_is_segmented(tokenizer, template):
    """Differential rendering in the full conversation: the same spans as plain ChatML, behind the count."""
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5, "tool": 0.25}, decay=0.5)
    out = tokenize_with_weights(_with_template(template), CONVERSATION, weighting)
    reference = tokenize_with_weights(tokenizer, CONVERSATION, weighting)
    shift = len(out["input_ids"]) - len(reference["input_ids"])
    assert shift > 0 and out["input_ids"][shift:] == reference["input_ids"]
    for key in ("token_weights", "token_roles", "token_turn_positions", "token_turn_index"):
        assert out[key][shift:] == reference[key] and set(out[key][:shift]) <= {0.0, -1}


def test_untraceable_template_without_generation_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match=r"cannot locate message 0.*no \{% generation %\}"):
        tokenize_with_weights(_with_template(JSON_LENGTH_NO_GENERATION), CHAT, TurnWeighting())


def test_untraceable_template_falls_back_on_generation_for_assistant_only(tokenizer):
    untraceable = _with_template(JSON_LENGTH)
    out = tokenize_with_weights(untraceable, CONVERSATION, TurnWeighting(decay=0.5))
    mask = untraceable.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == mask["input_ids"]
    reference = tokenize_with_weights(tokenizer, CONVERSATION, TurnWeighting(decay=0.5))
    shift = len(out["input_ids"]) - len(reference["input_ids"])
    assert shift > 0 and out["token_weights"][shift:] == reference["token_weights"]
    assert {r for r in out["token_roles"]} == {-1, ROLE_CODES["assistant"]}
    with pytest.raises(ChatTemplateError, match="cannot locate"):
        tokenize_with_weights(untraceable, CONVERSATION, TurnWeighting(role_weights={"assistant": 1, "user": 0.5}))


def test_template_that_transforms_content_is_traced(tokenizer):
    """Content the template transforms (here: upper-cased) is still located by tracing it."""
    upper = _with_template(CHATML_TEMPLATE_NO_GENERATION.replace(
        "message['content'] if message['content'] is not none else ''",
        "(message['content'] if message['content'] is not none else '') | upper"))
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5})
    out = tokenize_with_weights(upper, CHAT, weighting)
    for index, message in enumerate(CHAT):
        tokens = [t for t, r, k in zip(out["input_ids"], out["token_roles"], out["token_turn_index"])
                  if r == ROLE_CODES[message["role"]] and k == sum(m["role"] == message["role"] for m in CHAT[:index])]
        if weighting.message_weights(CHAT)[index] > 0:
            assert upper.decode(tokens) == message["content"].upper() + "<|im_end|>"


def test_generation_block_that_misses_content_is_a_clear_error():
    broken = _with_template(CHATML_TEMPLATE.replace(
        "{%- generation %}{{- message['content'] if message['content'] is not none else '' }}",
        "{{- message['content'] if message['content'] is not none else '' }}{%- generation %}"))
    with pytest.raises(ChatTemplateError, match="does not cover its content"):
        tokenize_with_weights(broken, CHAT, TurnWeighting())


def test_template_refusing_prefixes(tokenizer):
    """A template that renders only conversations ending with the assistant: a refused prefix is replaced by the
    next renderable one, the message's trailer stopping where the next message starts."""
    strict = _with_template("{% if messages[-1]['role'] != 'assistant' %}{{ raise_exception('must end with "
                            "assistant') }}{% endif %}" + CHATML_TEMPLATE_NO_GENERATION)
    messages = [m for m in CHAT if m["role"] != "tool"]
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5, "system": 0.25})
    out = tokenize_with_weights(strict, messages, weighting)
    assert out == tokenize_with_weights(_with_template(CHATML_TEMPLATE_NO_GENERATION), messages, weighting)


# ------------------------------------------------------------------------------------ span and token bookkeeping
def test_token_ranges_match_a_scan_of_the_offsets():
    """The tokens under a character span (bisection over rising offsets, a scan otherwise) are those of the
    definition: from the first non-empty token ending after the start through the tokens starting before the end."""
    import random

    from fused_wce.trl_integration.chat_weights.tokenize import _TokenRanges

    def by_definition(offsets, start, end):
        if end <= start:
            return []
        first = next((t for t, (a, b) in enumerate(offsets) if b > start and b > a), None)
        if first is None or offsets[first][0] >= end:
            return []
        last = first
        while last + 1 < len(offsets) and offsets[last + 1][0] < end:
            last += 1
        return list(range(first, last + 1))

    rng = random.Random(0)
    for trial in range(300):
        offsets, at = [], 0
        for _ in range(rng.randint(0, 12)):
            width = rng.choice([0, 1, 2, 3])
            offsets.append((at, at + width))
            at += width + rng.choice([0, 0, 1])
        if trial % 3 == 0 and offsets:  # special tokens at (0, 0) in the middle: not sorted
            offsets.insert(rng.randrange(len(offsets)), (0, 0))
        ranges = _TokenRanges(offsets)
        for _ in range(10):
            start, end = rng.randint(0, at + 1), rng.randint(0, at + 2)
            assert list(ranges.overlapping(start, end)) == by_definition(offsets, start, end), (offsets, start, end)


def test_common_prefix_never_ends_inside_an_added_token(tokenizer):
    """ChatTemplate.common_prefix against its definition: the common prefix, moved back to the start of an added
    token that straddles its end in either text (longest token first), until none does."""
    import random

    from fused_wce.trl_integration.chat_weights.rendering import ChatTemplate

    chat = ChatTemplate(tokenizer, None, None, None)
    tokens = chat.atomic + ["<|im", "_end|>", "<", "|", "a", "\n"]

    def snap(text, k):
        moved = True
        while moved and k > 0:
            moved = False
            for token in chat.atomic:
                at = text.find(token, max(0, k - len(token) + 1), k + len(token) - 1)
                if 0 <= at < k:
                    k, moved = at, True
                    break
        return k

    def by_definition(a, b):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        while snap(b, snap(a, k)) != k:
            k = snap(b, snap(a, k))
        return k

    rng = random.Random(1)
    for _ in range(3000):
        a = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 6)))
        b = a[:rng.randint(0, len(a))] + "".join(rng.choice(tokens) for _ in range(rng.randint(0, 4)))
        assert chat.common_prefix(a, b) == by_definition(a, b), (a, b)
