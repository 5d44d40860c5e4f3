"""tokenize_with_weights on real chat templates (tests/chat_templates, see its README), token by token.

For each family an independent, hand-written expectation of the rendering marks which characters carry which
message's weight (``⟦k|...⟧``: message ``k``; everything else is scaffolding). The test checks that the markup-free
text is exactly the template's rendering, then compares every token's weight, role and turn position. Where TRL
ships a training template with ``{% generation %}`` blocks, assistant-only weights must equal its assistant mask
token by token.
"""
from __future__ import annotations

import functools
import json
import random
import re

import pytest

from chat_template_helpers import family_tokenizer, read_template
from fused_wce.trl_integration import ROLE_CODES, ChatTemplateError, TurnWeighting, tokenize_with_weights
from fused_wce.trl_integration.chat_weights import template_spans
from fused_wce.trl_integration.chat_weights import tokenize as tokenize_module
from fused_wce.trl_integration.chat_weights.rendering import ChatTemplate
from fused_wce.trl_integration.chat_weights.template_spans import message_spans
from fused_wce.trl_integration.token_codes import turn_position_code

SYSTEM = "You are a terse calculator."
U1, A1, U2, U3, A3, A4 = ("What is 2 + 3?", "2 + 3 = 5.", "Now 597 * 61, use the tool.", "Thanks!",
                          "597 * 61 = 36417.", "You are welcome.")
R1, R3 = "Add 2 and 3.", "The tool says 36417."
ARGS = {"a": 597, "b": 61}
TOOLS = [{"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
CORPUS = (SYSTEM, U1, A1, U2, U3, A3, A4, R1, R3, "multiply", "assistant", "user", "system", "function")
WEIGHTING = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5, "system": 0.25, "tool": 0.125})


def conversation(*, system=True, tools=True, reasoning=False, think_in_content=False, string_args=False):
    """system?, user, assistant, [user, assistant tool call, tool, assistant,] user, assistant."""
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    first = {"role": "assistant", "content": A1}
    if reasoning:
        first["reasoning_content"] = R1
    if think_in_content:
        first["content"] = f"<think>\n{R1}\n</think>\n\n{A1}"
    messages += [{"role": "user", "content": U1}, first]
    if tools:
        call = {"type": "function", "id": "call00001",
                "function": {"name": "multiply", "arguments": json.dumps(ARGS) if string_args else dict(ARGS)}}
        last = {"role": "assistant", "content": A3}
        if reasoning:
            last["reasoning_content"] = R3
        messages += [{"role": "user", "content": U2}, {"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call00001", "name": "multiply", "content": "36417"}, last]
    return messages + [{"role": "user", "content": U3}, {"role": "assistant", "content": A4}]


# ------------------------------------------------------------------------------------- expected renderings
QWEN_TOOLS = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
              "with function signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(TOOLS[0]) +
              "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call>")
QWEN_CALL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 597, "b": 61}}\n</tool_call>'
LLAMA_TOOLS = ("Given the following functions, please respond with a JSON for a function call with its proper "
               "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
               "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n"
               + json.dumps(TOOLS[0], indent=4) + "\n\n")
LLAMA_DATE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


def chatml(turns, header="<|im_start|>{role}\n", eot="<|im_end|>", after="\n"):
    """``turns``: (role, annotated body without end-of-turn); body and end-of-turn carry the weight."""
    text = ""
    for role, body in turns:
        head, _, rest = body.partition("⟦")
        text += header.format(role=role) + head + "⟦" + rest[:-1] + eot + "⟧" + after
    return text


def numbered(*bodies):
    """Annotate body ``k`` as message ``k`` (``⟦k|body⟧``); a body may start with scaffolding before ``|``."""
    out = []
    for k, body in enumerate(bodies):
        scaffold, sep, own = body.rpartition("\x00")
        out.append(scaffold + f"⟦{k}|" + own + "⟧")
    return out


def expected_qwen2_5():
    b = numbered(SYSTEM + QWEN_TOOLS, U1, A1, U2, QWEN_CALL, "<tool_response>\n\x0036417\n</tool_response>", A3,
                 U3, A4)
    roles = ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user", "assistant"]
    return chatml(zip(roles, b))


def expected_qwen3_reasoning():
    b = numbered(SYSTEM + QWEN_TOOLS, U1, A1, U2, QWEN_CALL, "<tool_response>\n\x0036417\n</tool_response>", A3,
                 U3, "<think>\n\n</think>\n\n" + A4)  # earlier reasoning is dropped by the template
    roles = ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user", "assistant"]
    return chatml(zip(roles, b))


def expected_smollm2():
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            + chatml(zip(["user", "assistant", "user", "assistant"], numbered(U1, A1, U3, A4))))


def expected_llama3_1():
    b = numbered(SYSTEM, U1, A1, U2, '{"name": "multiply", "parameters": {"a": 597, "b": 61}}', '"\x0036417"', A3,
                 U3, A4)
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    text = "<|begin_of_text|>" + header.format("system") + "Environment: ipython\n" + LLAMA_DATE
    text += b[0][:-1] + "<|eot_id|>⟧"
    text += header.format("user") + LLAMA_TOOLS + b[1][:-1] + "<|eot_id|>⟧"
    for role, body in zip(["assistant", "user", "assistant", "ipython", "assistant", "user", "assistant"], b[2:]):
        text += header.format(role) + body[:-1] + "<|eot_id|>⟧"
    return text


def expected_llama3():
    b = numbered(SYSTEM, U1, A1, U3, A4)
    return "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{role}<|end_header_id|>\n\n" + body[:-1] + "<|eot_id|>⟧"
        for role, body in zip(["system", "user", "assistant", "user", "assistant"], b))


def expected_mistral_v0_3():
    # The system prompt goes into the *last* user turn, and only when the conversation ends with a user turn:
    # here it is not rendered at all.
    b = numbered(SYSTEM, U1, " " + A1, U2, '[TOOL_CALLS] [{"name": "multiply", "arguments": {"a": 597, "b": 61}, '
                 '"id": "call00001"}]', '[TOOL_RESULTS] {"content":\x00 36417, "call_id": "call00001"}', " " + A3,
                 U3, " " + A4)
    tools = ('[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "multiply", "description": "Multiply two '
             'integers.", "parameters": ' + json.dumps(TOOLS[0]["function"]["parameters"]) + '}}][/AVAILABLE_TOOLS]')
    return ("<s>[INST] " + b[1][:-1] + "[/INST]⟧" + b[2][:-1] + "</s>⟧[INST] " + b[3][:-1] + "[/INST]⟧"
            + b[4][:-1] + "</s>⟧" + b[5][:-1] + "[/TOOL_RESULTS]⟧" + b[6][:-1] + "</s>⟧" + tools + "[INST] "
            + b[7][:-1] + "[/INST]⟧" + b[8][:-1] + "</s>⟧")


def expected_mistral_small_3_1():
    b = numbered(U1, A1, U3, A4)
    return ("<s>[SYSTEM_PROMPT]" + _MISTRAL_SMALL_DEFAULT + "[/SYSTEM_PROMPT]"
            + "".join("[INST]" + b[k][:-1] + "[/INST]⟧" + b[k + 1][:-1] + "</s>⟧" for k in (0, 2)))


def expected_gemma():
    b = numbered(U1, A1, U3, A4)
    return "<bos>" + chatml(zip(["user", "model", "user", "model"], b), "<start_of_turn>{role}\n", "<end_of_turn>")


def expected_gemma3():
    # The system prompt is folded into the first user turn: only its text carries its weight.
    b = numbered(SYSTEM, U1, A1, U3, A4)
    return ("<bos><start_of_turn>user\n" + b[0] + "\n\n" + b[1][:-1] + "<end_of_turn>⟧\n"
            + chatml(zip(["model", "user", "model"], b[2:]), "<start_of_turn>{role}\n", "<end_of_turn>"))


def expected_phi3():
    b = numbered(SYSTEM, U1, A1, U3, A4)
    text = chatml(zip(["system", "user", "assistant", "user", "assistant"], b), "<|{role}|>\n", "<|end|>")
    return text[:-len("⟧\n")] + "\n<|endoftext|>⟧"  # the closing eos is part of the last assistant turn


def expected_phi4():
    b = numbered(SYSTEM, U1, A1, U3, A4)
    return ("<|im_start|>system<|im_sep|>" + b[0][:-1] + "<|im_end|>⟧"
            + "".join("<|im_start|>user<|im_sep|>" + b[k][:-1] + "<|im_end|>⟧<|im_start|>assistant<|im_sep|>"
                      + b[k + 1][:-1] + "<|im_end|>⟧" for k in (1, 3)))


def expected_deepseekv3():
    b = numbered(SYSTEM, U1, A1, U2, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>multiply\n"
                 "```json\n" + json.dumps(ARGS) + "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                 "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>\x0036417<｜tool▁output▁end｜>", A3, U3, A4)
    eos = "<｜end▁of▁sentence｜>"
    return ("<｜begin▁of▁sentence｜>" + b[0] + "<｜User｜>" + b[1] + "<｜Assistant｜>" + b[2][:-1] + eos + "⟧"
            + "<｜User｜>" + b[3] + "<｜Assistant｜>" + b[4][:-1] + eos + "⟧"
            + b[5][:-1] + "<｜tool▁outputs▁end｜>⟧" + b[6][:-1] + eos + "⟧"
            + "<｜User｜>" + b[7] + "<｜Assistant｜>" + b[8][:-1] + eos + "⟧")


def expected_deepseek_r1():
    # The template drops the reasoning (everything up to </think>) of assistant turns.
    b = numbered(SYSTEM, U1, "\n\n" + A1, U3, A4)
    eos = "<｜end▁of▁sentence｜>"
    return ("<｜begin▁of▁sentence｜>" + b[0] + "<｜User｜>" + b[1] + "<｜Assistant｜>" + b[2][:-1] + eos + "⟧"
            + "<｜User｜>" + b[3] + "<｜Assistant｜>" + b[4][:-1] + eos + "⟧")


_MISTRAL_SMALL_DEFAULT = None  # filled from the template (it embeds today's date)

# name: (template, tokenizer family, conversation kwargs, pass tools?, expected, TRL training template or None)
FAMILIES = {
    "qwen2_5": ("qwen2_5", "qwen", {}, True, expected_qwen2_5, "qwen2_5_training"),
    "qwen3_reasoning": ("qwen3", "qwen", {"reasoning": True}, True, expected_qwen3_reasoning, "qwen3_training"),
    "smollm2": ("smollm2", "smollm2", {"system": False, "tools": False}, False, expected_smollm2, None),
    "llama3": ("llama3", "llama3", {"tools": False}, False, expected_llama3, "llama3_training"),
    "llama3_1": ("llama3_1", "llama3", {}, True, expected_llama3_1, None),
    "llama3_2": ("llama3_2", "llama3", {}, True, None, None),
    "mistral_v0_3": ("mistral_v0_3", "mistral", {}, True, expected_mistral_v0_3, None),
    "mistral_small_3_1": ("mistral_small_3_1", "mistral", {"system": False, "tools": False}, False,
                          expected_mistral_small_3_1, None),
    "gemma2": ("gemma", "gemma", {"system": False, "tools": False}, False, expected_gemma, "gemma_training"),
    "gemma3": ("gemma3", "gemma", {"tools": False}, False, expected_gemma3, "gemma3_training"),
    "phi3": ("phi3", "phi3", {"tools": False}, False, expected_phi3, "phi3_training"),
    "phi3_5": ("phi3_5", "phi3", {"tools": False}, False, expected_phi3, "phi3_5_training"),
    "phi4": ("phi4", "phi4", {"tools": False}, False, expected_phi4, None),
    "deepseek_v3": ("deepseekv3", "deepseek", {"string_args": True}, True, expected_deepseekv3, None),
    "deepseek_r1": ("deepseek_r1_distill", "deepseek", {"tools": False, "think_in_content": True}, False,
                    expected_deepseek_r1, "deepseek_r1_distill_training"),
}


@pytest.fixture(scope="module")
def tokenizers():
    cache = {}

    def get(template, family):
        if (template, family) not in cache:
            cache[template, family] = family_tokenizer(template, family, CORPUS)
        return cache[template, family]
    return get


def parse_annotated(annotated: str) -> tuple[str, list[int | None]]:
    """Markup-free text and, per character, the message index that owns it (None: scaffolding)."""
    text, owners, owner = [], [], None
    for piece in re.split(r"(⟦\d+\||⟧)", annotated):
        if piece.startswith("⟦"):
            owner = int(piece[1:-1])
        elif piece == "⟧":
            owner = None
        else:
            text.append(piece)
            owners += [owner] * len(piece)
    return "".join(text), owners


def expected_tokens(tokenizer, messages, annotated, weighting):
    """Per token (weight, role, turn position) from the annotated rendering: a token belongs to the message
    owning any of its characters."""
    text, owners = parse_annotated(annotated)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    weights = weighting.message_weights(messages)
    counts = {role: sum(m["role"] == role for m in messages) for role in ROLE_CODES}
    index_in_role = [sum(m["role"] == message["role"] for m in messages[:k]) for k, message in enumerate(messages)]
    rows = []
    for start, end in encoded["offset_mapping"]:
        mine = {o for o in owners[start:end] if o is not None}
        assert len(mine) <= 1, (start, end, mine)
        if not mine:
            rows.append((0.0, -1, -1))
            continue
        k = mine.pop()
        role = messages[k]["role"]
        rows.append((weights[k], ROLE_CODES[role], turn_position_code(index_in_role[k], counts[role])))
    return text, encoded["input_ids"], rows


@pytest.mark.parametrize("name", [name for name, spec in FAMILIES.items() if spec[4] is not None])
def test_family_token_by_token(tokenizers, name):
    global _MISTRAL_SMALL_DEFAULT
    template, family, kwargs, with_tools, expected, _ = FAMILIES[name]
    tokenizer = tokenizers(template, family)
    messages = conversation(**kwargs)
    tools = TOOLS if with_tools else None
    weighting = WEIGHTING
    if name == "mistral_v0_3":  # it drops the system prompt here (see expected_mistral_v0_3)
        weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5, "tool": 0.125})
    if name == "mistral_small_3_1":
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        _MISTRAL_SMALL_DEFAULT = full[len("<s>[SYSTEM_PROMPT]"):full.index("[/SYSTEM_PROMPT]")]
    out = tokenize_with_weights(tokenizer, messages, weighting, tools=tools)
    text, ids, rows = expected_tokens(tokenizer, messages, expected(), weighting)
    assert text == tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert out["input_ids"] == ids == tokenizer.apply_chat_template(messages, tools=tools)["input_ids"]
    got = list(zip(out["token_weights"], out["token_roles"], out["token_turn_positions"]))
    mismatches = [(t, tokenizer.decode([ids[t]]), got[t], rows[t]) for t in range(len(ids)) if got[t] != rows[t]]
    assert not mismatches, mismatches[:5]
    # Every assistant message with text has its end-of-turn token weighted (the model learns to stop).
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            mine = [t for t, r in enumerate(rows) if r[1] == ROLE_CODES["assistant"]
                    and out["token_turn_index"][t] == sum(m["role"] == "assistant" for m in messages[:k])]
            special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
            assert mine and tokenizer.convert_ids_to_tokens(ids[mine[-1]]) in special, (name, k)


@pytest.mark.parametrize("name", [name for name, spec in FAMILIES.items() if spec[5] is not None])
def test_training_template_masks_equal_assistant_weights(tokenizers, name):
    """On TRL's training template, assistant-only weights are its {% generation %} mask, token for token, and the
    other messages keep the spans they have on the original template."""
    template, family, kwargs, with_tools, _, training = FAMILIES[name]
    tokenizer = tokenizers(template, family)
    messages = conversation(**kwargs)
    tools = TOOLS if with_tools else None
    chat_template = read_template(training)
    mask = tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat_template, return_dict=True,
                                         return_assistant_tokens_mask=True)
    out = tokenize_with_weights(tokenizer, messages, TurnWeighting(message_weight_key=None), tools=tools,
                                chat_template=chat_template)
    assert out["input_ids"] == mask["input_ids"]
    assert out["token_weights"] == [float(bit) for bit in mask["assistant_masks"]]
    assert sum(mask["assistant_masks"]) > 10

    def others(tokens):  # decoded text of each non-assistant message
        return [tokenizer.decode([i for i, r, k in zip(tokens["input_ids"], tokens["token_roles"],
                                                         tokens["token_turn_index"]) if r == code and k == index])
                for code, index in {(ROLE_CODES[m["role"]], sum(x["role"] == m["role"] for x in messages[:j]))
                                    for j, m in enumerate(messages) if m["role"] != "assistant"}]
    on_training = tokenize_with_weights(tokenizer, messages, WEIGHTING, tools=tools, chat_template=chat_template)
    on_original = tokenize_with_weights(tokenizer, messages, WEIGHTING, tools=tools)
    assert sorted(others(on_training)) == sorted(others(on_original))


def test_llama3_2_tool_turns(tokenizers):
    """Llama-3.2 (same layout as 3.1, dated header): the call JSON and <|eot_id|> carry the assistant weight."""
    tokenizer = tokenizers("llama3_2", "llama3")
    messages = conversation()
    out = tokenize_with_weights(tokenizer, messages, TurnWeighting(), tools=TOOLS)
    weighted = tokenizer.decode([i for i, w in zip(out["input_ids"], out["token_weights"]) if w > 0])
    assert weighted == "".join([A1 + "<|eot_id|>", '{"name": "multiply", "parameters": {"a": 597, "b": 61}}<|eot_id|>',
                                A3 + "<|eot_id|>", A4 + "<|eot_id|>"])


def test_qwen3_multi_turn_reasoning_on_training_template(tokenizers):
    """With TRL's Qwen3 training template every turn keeps its reasoning, and it is weighted with the turn."""
    tokenizer = tokenizers("qwen3", "qwen")
    messages = conversation(reasoning=True)
    out = tokenize_with_weights(tokenizer, messages, TurnWeighting(), tools=TOOLS,
                                chat_template=read_template("qwen3_training"))
    weighted = tokenizer.decode([i for i, w in zip(out["input_ids"], out["token_weights"]) if w > 0])
    assert weighted == (f"<think>\n{R1}\n</think>\n\n{A1}<|im_end|>\n" + "<think>\n\n</think>\n\n" + QWEN_CALL
                        + "<|im_end|>\n" + f"<think>\n{R3}\n</think>\n\n{A3}<|im_end|>\n"
                        + f"<think>\n\n</think>\n\n{A4}<|im_end|>\n")


def test_dropped_message_with_weight_is_an_error(tokenizers):
    """Mistral v0.3 renders the system prompt only when the conversation ends with a user turn."""
    tokenizer = tokenizers("mistral_v0_3", "mistral")
    with pytest.raises(ChatTemplateError, match=r"message 0 \(role 'system'\) has weight 0.25 .*drops"):
        tokenize_with_weights(tokenizer, conversation(), WEIGHTING, tools=TOOLS)
    ends_with_user = conversation(tools=False)[:-1]
    out = tokenize_with_weights(tokenizer, ends_with_user, WEIGHTING)
    system = [i for i, r in zip(out["input_ids"], out["token_roles"]) if r == ROLE_CODES["system"]]
    assert tokenizer.decode(system) == SYSTEM  # folded into the last user turn: its text only


def test_template_that_cannot_render_the_conversation(tokenizers):
    """Gemma-2 refuses system prompts; Mistral-Small-3.1's template cannot render a string system prompt."""
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        tokenize_with_weights(tokenizers("gemma", "gemma"), conversation(tools=False), WEIGHTING)
    with pytest.raises(ChatTemplateError, match="cannot render this conversation"):
        tokenize_with_weights(tokenizers("mistral_small_3_1", "mistral"), conversation(tools=False), WEIGHTING)


# ------------------------------------------------------------------ long conversations: windows against prefixes
WORDS = ("alpha", "beta", "2 + 3", "delta", "Answer:", "ok", "ünï", "東京", "x")


def long_conversation(seed: int, rounds: int, *, system=True, tools=True, reasoning=False, think_in_content=False,
                      string_args=False, whitespace=False, **unused):
    """``rounds`` user turns, each answered (some through tool calls and tool results, some with reasoning and
    weight 0), contents drawn at random; ``whitespace``: some contents with leading/trailing spaces or newlines."""
    rng = random.Random(seed)

    def text(k):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) + f" {k}"  # distinct contents
        if whitespace and rng.random() < 0.3:
            body = rng.choice([" ", "\n", "  "]) + body
        if whitespace and rng.random() < 0.3:
            body += rng.choice([" ", "\n", "\n\n"])
        return body

    messages = [{"role": "system", "content": text(0)}] if system else []
    for r in range(rounds):
        messages.append({"role": "user", "content": text(len(messages))})
        for c in range(rng.choice([0, 0, 1, 2]) if tools else 0):  # tool calls, one at a time (as Llama-3.1 wants)
            call_id, a, b = f"call{r:03d}{c:02d}", rng.randint(1, 99), rng.randint(1, 99)  # 9 characters: Mistral
            arguments = {"a": a, "b": b}
            messages.append({"role": "assistant", "content": "", "tool_calls": [{
                "type": "function", "id": call_id,
                "function": {"name": "multiply", "arguments": json.dumps(arguments) if string_args else arguments}}]})
            messages.append({"role": "tool", "tool_call_id": call_id, "name": "multiply", "content": str(a * b)})
        answer = {"role": "assistant", "content": text(len(messages))}
        if reasoning and rng.random() < 0.6:
            answer["reasoning_content"] = text(-1)
        if think_in_content and rng.random() < 0.6:
            answer["content"] = f"<think>\n{text(-1)}\n</think>\n\n" + answer["content"]
        if rng.random() < 0.1:
            answer["weight"] = 0
        messages.append(answer)
    return messages


def _spans(chat, messages, full_text, **options):
    """The spans, or the error that says why there are none."""
    try:
        return [(span.weighted, span.body, span.piece_end)
                for span in message_spans(chat, messages, full_text, **options)]
    except ChatTemplateError as error:
        return str(error)


@pytest.mark.parametrize("whitespace", [False, True], ids=["plain", "whitespace"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_windows_find_the_spans_of_every_prefix(tokenizers, monkeypatch, name, whitespace):
    """On 12-round conversations (tools, reasoning, weight-0 turns) every family's spans from windows equal those
    from rendering every prefix; without surrounding whitespace the windows answer without falling back on it."""
    template, family, kwargs, with_tools, _, _ = FAMILIES[name]
    messages = long_conversation(sum(map(ord, name)), 12, whitespace=whitespace, **kwargs)
    chat = ChatTemplate(tokenizers(template, family), TOOLS if with_tools else None, None, None)
    full_text = chat.render(messages)
    expected = _spans(chat, messages, full_text, exhaustive=True)
    if not whitespace:  # no fallback: a rendering of every prefix would fail here
        assert isinstance(expected, list), expected
        monkeypatch.setattr(template_spans, "_Prefixes", None)
    assert _spans(chat, messages, full_text) == expected
    assert chat.render_prepared(chat.prepare(messages)) == full_text  # the fast rendering is apply_chat_template's
    assert chat.render_prepared(chat.prepare(messages[:-1]), add_generation_prompt=True) == \
        chat.render(messages[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("name", [name for name, spec in FAMILIES.items() if spec[5] is not None])
def test_long_conversation_tokens_on_training_templates(tokenizers, monkeypatch, name):
    """tokenize_with_weights end to end on TRL's training template (its {% generation %} blocks checked against
    the spans): the same columns as with the spans of every prefix."""
    template, family, kwargs, with_tools, _, training = FAMILIES[name]
    tokenizer = tokenizers(template, family)
    messages = long_conversation(7, 10, **kwargs)
    arguments = dict(tools=TOOLS if with_tools else None, chat_template=read_template(training))
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "tool": 0.5}, decay=0.9)
    windows = tokenize_with_weights(tokenizer, messages, weighting, **arguments)
    monkeypatch.setattr(tokenize_module, "message_spans", functools.partial(message_spans, exhaustive=True))
    assert windows == tokenize_with_weights(tokenizer, messages, weighting, **arguments)
    assert sum(w > 0 for w in windows["token_weights"]) > 50


# ----------------------------------------------------------------------- trainer: TRL's training-template swap
def test_trainer_uses_trls_training_template_like_stock_sft(tokenizers, tmp_path):
    """assistant_only_loss=True on Qwen2.5's template: TRL swaps in qwen2_5_training.jinja; with weighting=None
    WeightedSFTTrainer labels exactly the tokens stock SFTTrainer labels."""
    import warnings

    from datasets import Dataset
    from trl import SFTTrainer

    from fused_wce.trl_integration import WeightedSFTTrainer
    from trl_helpers import sft_config, tiny_model

    tokenizer = tokenizers("qwen2_5", "qwen")
    rows = [{"messages": conversation(tools=False)},
            {"messages": conversation(system=False, tools=False)[:2]},
            {"messages": [{"role": "user", "content": U2}, {"role": "assistant", "content": A3},
                          {"role": "user", "content": U3}, {"role": "assistant", "content": A4}]}]
    dataset = Dataset.from_list(rows)
    labels = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, trainer_class in (("stock", SFTTrainer), ("weighted", WeightedSFTTrainer)):
            trainer = trainer_class(tiny_model("qwen2", tokenizer), args=sft_config(tmp_path / name,
                                    assistant_only_loss=True), train_dataset=dataset, processing_class=tokenizer)
            assert trainer.chat_template == read_template("qwen2_5_training")
            columns = trainer.train_dataset.column_names
            assert "labels" in columns, columns
            labels[name] = (trainer.train_dataset["input_ids"], trainer.train_dataset["labels"])
    assert labels["weighted"] == labels["stock"]
    # The swap matters: on the original template the assistant turns start one token later (the "\n").
    original = tokenize_with_weights(tokenizer, rows[0]["messages"], TurnWeighting(message_weight_key=None))
    assert [t if w > 0 else -100 for t, w in zip(original["input_ids"], original["token_weights"])] != \
        labels["stock"][1][0]
