"""The shipped chat dataset, its generator, the jsonl loader and the shipped ChatML tokenizer."""
from __future__ import annotations

import json
import re

import pytest

from fused_wce.trl_integration import chat_data
from fused_wce.trl_integration.chat_data import (
    CHATML_TEMPLATE_NO_GENERATION,
    DEFAULT_DATASET_PATH,
    TOKENIZER_PATH,
    build_tokenizer,
    generate_conversations,
    load_default_dataset,
    load_jsonl_dataset,
    train_tokenizer,
)
from fused_wce.trl_integration import TurnWeighting, tokenize_with_weights


@pytest.fixture(scope="module")
def conversations():
    return generate_conversations()


# ---------------------------------------------------------------------------------------------------- dataset
def test_shipped_file_is_the_generator_output(conversations):
    lines = DEFAULT_DATASET_PATH.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == conversations
    assert lines == [json.dumps(c, ensure_ascii=False) for c in conversations]


def test_generator_is_deterministic(conversations):
    assert len(conversations) == chat_data.DEFAULT_NUM_CONVERSATIONS == 300
    assert generate_conversations(300, 0) == conversations
    assert generate_conversations(20, 1) == generate_conversations(20, 1)
    assert generate_conversations(20, 1) != conversations[:20]
    assert generate_conversations(0) == []
    with pytest.raises(ValueError, match="n must be"):
        generate_conversations(-1)


def test_dataset_content(conversations):
    roles, weights, turns = set(), [], []
    for conversation in conversations:
        messages = conversation["messages"]
        assert messages[-1]["role"] == "assistant"
        assert messages[0]["role"] in ("system", "user")
        turns.append(sum(m["role"] == "assistant" for m in messages))
        for index, message in enumerate(messages):
            assert set(message) <= {"role", "content", "weight"} and message["content"]
            roles.add(message["role"])
            if "weight" in message:
                weights.append(message["weight"])
            if message["role"] == "tool":  # a tool result follows the assistant's tool call
                assert messages[index - 1]["content"].startswith("<tool_call>")
                call = json.loads(messages[index - 1]["content"][len("<tool_call>"):-len("</tool_call>")])
                assert set(call) == {"name", "arguments"}
                json.loads(message["content"])
    assert roles == {"system", "user", "assistant", "tool"}
    assert {0, 1, 0.5} <= set(weights) and set(weights) <= {0, 1, 0.5}
    assert max(turns) >= 4 and min(turns) == 1  # multi-turn, with single-turn ones too


def test_answers_are_learnable_and_weights_mark_wrong_ones(conversations):
    """Arithmetic answers with weight != 0 are right; the weight-0 ones are the deliberately wrong answers."""
    pattern = re.compile(r"^(\d+) ([-+*]) (\d+) = (-?\d+)\.$")
    checked = {True: 0, False: 0}
    for conversation in conversations:
        for message in conversation["messages"]:
            match = pattern.match(message["content"]) if message["role"] == "assistant" else None
            if match:
                a, op, b, result = match.groups()
                correct = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)
                assert correct == (message.get("weight", 1) != 0), message
                checked[correct] += 1
    assert checked[True] > 100 and checked[False] > 5


def test_load_default_dataset(conversations):
    dataset = load_default_dataset()
    assert dataset.column_names == ["messages"] and len(dataset) == 300
    first = dataset[1]["messages"]
    expected = conversations[1]["messages"]
    assert [m["content"] for m in first] == [m["content"] for m in expected]
    assert [m["weight"] for m in first] == [m.get("weight") for m in expected]  # None where the file has none


# ---------------------------------------------------------------------------------------------- jsonl loading
def test_load_jsonl_dataset(tmp_path, conversations):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations[:5]) + "\n", encoding="utf-8")
    dataset = load_jsonl_dataset(path)
    assert len(dataset) == 5 and dataset[2]["messages"][0]["content"] == conversations[2]["messages"][0]["content"]
    listing = tmp_path / "chats.json"
    listing.write_text(json.dumps(conversations[:3]), encoding="utf-8")
    assert len(load_jsonl_dataset(listing)) == 3


@pytest.mark.parametrize("text, match", [
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "hello"}\n', r"bad.jsonl:2: no 'messages' key"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
    ('[1, 2]\n', r"bad.jsonl:1: the row is a list"),
    ('{"messages": "hello"}\n', r"bad.jsonl:1: 'messages' must be a list"),
    ('\n', "no rows"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n\n{"messages": [{"role": "bot", "content": "x"}]}\n',
     r"bad.jsonl:3: message 0: unknown 'role' 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "x", "weight": -1}]}\n', r"bad.jsonl:1: message 0 key 'weight'"),
    ('{"messages": [{"role": "assistant", "content": "x", "weight": "high"}]}\n', r"bad.jsonl:1: message 0 key"),
    ('{"messages": [{"role": "assistant", "content": 5}]}\n', r"bad.jsonl:1: message 0: 'content' must be a string"),
])
def test_load_jsonl_dataset_errors(tmp_path, text, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_jsonl_dataset(path)


def test_load_jsonl_dataset_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset file"):
        load_jsonl_dataset(tmp_path / "nope.jsonl")


# -------------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_basics(tokenizer):
    assert 512 <= len(tokenizer) <= 1024
    assert tokenizer.is_fast
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<|endoftext|>", "<|im_end|>", None)


def test_tokenizer_round_trip(tokenizer, conversations):
    texts = [m["content"] for c in conversations[:50] for m in c["messages"]]
    texts += ["Grüße aus Köln 😀 and 東京", "  leading and trailing  \n\n", "tabs\tand\r\nlines", "{\"json\": [1, 2]}"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # Learned merges: the dataset's words are single tokens, so sequences are short.
    assert len(tokenizer(" capital", add_special_tokens=False)["input_ids"]) == 1


def test_shipped_tokenizer_matches_training(tokenizer):
    assert TOKENIZER_PATH.is_file()
    shipped = json.loads(TOKENIZER_PATH.read_text(encoding="utf-8"))
    trained = json.loads(train_tokenizer().to_str())
    assert shipped["model"]["vocab"] == trained["model"]["vocab"]
    assert shipped["model"]["merges"] == trained["model"]["merges"]
    assert build_tokenizer(retrain=True).get_vocab() == tokenizer.get_vocab()


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}, {"role": "tool", "content": "T"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA"
                    "<|im_end|>\n<|im_start|>tool\nT<|im_end|>\n<|im_start|>assistant\n")
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                          chat_template=CHATML_TEMPLATE_NO_GENERATION)
    assert plain == text and "{%- generation %}" not in CHATML_TEMPLATE_NO_GENERATION
    tools = [{"type": "function", "function": {"name": "f"}}]
    with_tools = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert with_tools.startswith("<|im_start|>system\n# Tools\n") and json.dumps(tools[0]) in with_tools
    mask = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    tokens = [t for t, bit in zip(mask["input_ids"], mask["assistant_masks"]) if bit]
    assert tokenizer.decode(tokens) == "A<|im_end|>"


def test_every_shipped_conversation_tokenizes_with_weights(tokenizer):
    """All 300 conversations align; assistant-only weights equal TRL's generation mask when per-message weights
    are ignored, and every conversation keeps a weighted token when they are honoured."""
    dataset = load_default_dataset()
    stock = TurnWeighting(message_weight_key=None)
    weighted = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.5}, decay=0.5)
    for messages in dataset["messages"]:
        out = tokenize_with_weights(tokenizer, messages, stock)
        mask = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == mask["input_ids"]
        assert out["token_weights"] == [float(bit) for bit in mask["assistant_masks"]]
        assert max(tokenize_with_weights(tokenizer, messages, weighted)["token_weights"]) > 0
