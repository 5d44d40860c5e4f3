"""The shipped default: a small multi-turn chat dataset and a byte-level BPE tokenizer with a ChatML template.

Everything here works offline and is deterministic:

* :func:`generate_conversations` writes templated, learnable conversations (arithmetic, unit conversions, facts,
  tool calls answered by a ``tool`` message, corrections of a wrong answer marked ``"weight": 0``). The shipped
  ``data/chat_sft.jsonl`` is exactly ``generate_conversations(DEFAULT_NUM_CONVERSATIONS, DEFAULT_SEED)``;
  :func:`load_default_dataset` reads it as a :class:`datasets.Dataset` with a ``messages`` column.
* :func:`build_tokenizer` returns a :class:`~transformers.PreTrainedTokenizerFast` (byte-level BPE, ~1k tokens)
  with a ChatML chat template whose assistant content and ``<|im_end|>`` sit in ``{% generation %}`` blocks, so
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` works. The BPE model is trained on the dataset's
  text by :func:`train_tokenizer` and cached in ``data/tokenizer.json``.

Regenerate both files with ``python -m fused_wce.trl_integration.chat_data`` (see :func:`write_package_data`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .chat_weights.messages import check_weight, validate_messages

DATA_DIR = Path(__file__).with_name("data")
DEFAULT_DATASET_PATH = DATA_DIR / "chat_sft.jsonl"
TOKENIZER_PATH = DATA_DIR / "tokenizer.json"
DEFAULT_NUM_CONVERSATIONS = 300
DEFAULT_SEED = 0
VOCAB_SIZE = 1024

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)  # ids 0, 1, 2

# ChatML. An optional tools list renders as a leading system block (scaffolding); each message renders as
# "<|im_start|>{role}\n{content}<|im_end|>\n". The assistant content and its <|im_end|> are a generation block.
_CHATML = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n# Tools\\nYou may call these functions:\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] if message['content'] is not none else '' }}{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{{- message['content'] if message['content'] is not none else '' }}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_TEMPLATE = _CHATML
CHATML_TEMPLATE_NO_GENERATION = (_CHATML.replace("{%- generation %}", "").replace("{%- endgeneration %}", ""))

# ------------------------------------------------------------------------------------------------ conversations
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise math tutor. Answer with the result.",
    "You are a helpful assistant with access to tools.",
    "Answer briefly and exactly.",
)
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
    ("Poland", "Warsaw"), ("Chile", "Santiago"), ("India", "New Delhi"), ("Greece", "Athens"),
    ("Sweden", "Stockholm"), ("Portugal", "Lisbon"),
)
# (from unit, to unit, factor): value_in_to = value * factor
CONVERSIONS = (
    ("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
    ("days", "hours", 24), ("liters", "milliliters", 1000), ("weeks", "days", 7),
)
WEATHER = ("sunny", "cloudy", "rainy", "windy", "snowy")
CHIT_CHAT = (
    ("Thanks!", "You are welcome."),
    ("Great, thank you.", "Glad I could help."),
    ("Nice.", "Anything else?"),
)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """(question, correct answer, a wrong answer)."""
    op = rng.choice("+-*")
    a, b = rng.randint(2, 60), rng.randint(2, 30 if op == "*" else 60)
    if op == "-" and b > a:
        a, b = b, a
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"))
    answer = f"{a} {op} {b} = {result}."
    return question.format(a=a, op=op, b=b), answer, f"{a} {op} {b} = {result + rng.choice((-2, -1, 1, 10))}."


def _conversion(rng: random.Random) -> tuple[str, str, str]:
    source, target, factor = rng.choice(CONVERSIONS)
    value = rng.randint(1, 20)
    question = rng.choice(("Convert {v} {s} to {t}.", "How many {t} are in {v} {s}?"))
    answer = f"{value} {source} = {value * factor} {target}."
    return question.format(v=value, s=source, t=target), answer, f"{value} {source} = {value * factor + factor} {target}."


def _capital(rng: random.Random) -> tuple[str, str, str]:
    country, city = rng.choice(CAPITALS)
    wrong = rng.choice([c for _, c in CAPITALS if c != city])
    question = rng.choice(("What is the capital of {c}?", "Name the capital city of {c}."))
    return question.format(c=country), f"The capital of {country} is {city}.", f"The capital of {country} is {wrong}."


def _tool_exchange(rng: random.Random) -> list[dict]:
    """A user request, an assistant tool call, the tool's result and the assistant's answer from it."""
    if rng.random() < 0.5:
        _, city = rng.choice(CAPITALS)
        sky, temp = rng.choice(WEATHER), rng.randint(-5, 32)
        call = {"name": "get_weather", "arguments": {"city": city}}
        result = {"city": city, "sky": sky, "temp_c": temp}
        user = rng.choice(("What is the weather in {x}?", "How is the weather in {x} today?")).format(x=city)
        answer = f"It is {sky} in {city}, {temp} C."
    else:
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        call = {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}
        result = {"result": a * b}
        user = f"Use the calculator: what is {a} * {b}?"
        answer = f"{a} * {b} = {a * b}."
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": f"<tool_call>{json.dumps(call)}</tool_call>"},
        {"role": "tool", "content": json.dumps(result)},
        {"role": "assistant", "content": answer},
    ]


def generate_conversations(n: int = DEFAULT_NUM_CONVERSATIONS, seed: int = DEFAULT_SEED) -> list[dict]:
    """``n`` conversations ``{"messages": [{"role", "content"[, "weight"]}, ...]}``, a pure function of ``seed``.

    Each has an optional system prompt and 1-4 exchanges: arithmetic, unit conversions, capitals (all answered in
    a fixed pattern, so a tiny model learns them) and tool calls (assistant ``<tool_call>{json}</tool_call>``, a
    ``tool`` message with the JSON result, the assistant's answer). Per-message ``weight`` keys (OpenAI chat
    fine-tuning format): about 1 in 8 exchanges is a wrong answer with ``weight: 0`` followed by the user's
    complaint and the correct answer with ``weight: 1``; about 1 in 10 conversations ends with a chit-chat reply
    of ``weight: 0.5``; other messages have no ``weight`` key.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    conversations = []
    for _ in range(n):
        messages: list[dict] = []
        if rng.random() < 0.6:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if kind < 0.25:
                messages.extend(_tool_exchange(rng))
                continue
            make = _arithmetic if kind < 0.55 else _conversion if kind < 0.8 else _capital
            question, answer, wrong = make(rng)
            messages.append({"role": "user", "content": question})
            if rng.random() < 0.125:
                messages.append({"role": "assistant", "content": wrong, "weight": 0})
                messages.append({"role": "user", "content": "That is wrong. Please try again."})
                messages.append({"role": "assistant", "content": answer, "weight": 1})
            else:
                messages.append({"role": "assistant", "content": answer})
        if rng.random() < 0.1:
            thanks, reply = rng.choice(CHIT_CHAT)
            messages.append({"role": "user", "content": thanks})
            messages.append({"role": "assistant", "content": reply, "weight": 0.5})
        conversations.append({"messages": messages})
    return conversations


def _dumps(conversation: dict) -> str:
    return json.dumps(conversation, ensure_ascii=False, sort_keys=False)


# --------------------------------------------------------------------------------------------------- datasets
def _messages_features():
    from datasets import Features, List, Value

    message = {"role": Value("string"), "content": Value("string"), "weight": Value("float64")}
    return Features({"messages": List(message)})


def load_default_dataset():
    """The shipped conversations as a :class:`datasets.Dataset` with one column, ``messages``.

    Each message is ``{"role": str, "content": str, "weight": float | None}`` (Arrow gives every message every
    key; ``weight`` is ``None`` where the file has none, which :class:`TurnWeighting` reads as 1).
    """
    from datasets import Dataset

    rows = [json.loads(line) for line in DEFAULT_DATASET_PATH.read_text(encoding="utf-8").splitlines() if line]
    return Dataset.from_list(rows, features=_messages_features())


def load_jsonl_dataset(path, weight_key: str | None = "weight"):
    """A local ``.jsonl`` (or ``.json`` list) of ``{"messages": [{"role", "content", ...}, ...], ...}`` rows, as a
    :class:`datasets.Dataset`, every row checked first by :func:`read_jsonl_rows`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the first bad row, naming the file and line.
    """
    rows = read_jsonl_rows(path, weight_key)
    from datasets import Dataset

    return Dataset.from_list(rows)


def read_jsonl_rows(path, weight_key: str | None = "weight") -> list[dict]:
    """The rows of a local ``.jsonl`` (or ``.json`` list), each checked, without importing ``datasets``.

    Bad data fails here (before any model is loaded, and, from the command line, before transformers is imported)
    with one line naming the place: ``chats.jsonl:3: message 1: unknown 'role' 'bot'; expected one of [...]``
    (``.json`` lists name the 1-based row, ``chats.json:row 3: ...``). Checked: valid JSON, an object per row, a
    ``messages`` list of objects with a known ``role``, ``content`` a string (or null), and the per-message
    ``weight_key`` (OpenAI chat fine-tuning format; ``None`` skips it) absent, null or a finite number >= 0.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the first bad row, as above.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        numbered = [(f"row {number}", row) for number, row in enumerate(rows, start=1)]
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((str(number), json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    if not numbered:
        raise ValueError(f"{path}: no rows")
    for where, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{where}: the row is a {type(row).__name__}, expected an object with a "
                             "'messages' key")
        if "messages" not in row:
            raise ValueError(f"{path}:{where}: no 'messages' key (keys: {sorted(row)}); each row "
                             "must be {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}")
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"{path}:{where}: 'messages' must be a list of objects with a 'role' key")
        try:
            validate_messages(messages)
            if weight_key is not None:
                for index, message in enumerate(messages):
                    if message.get(weight_key) is not None:
                        check_weight(message[weight_key], f"message {index} key {weight_key!r}")
        except ValueError as error:
            raise ValueError(f"{path}:{where}: {error}") from None
    return [row for _, row in numbered]


# -------------------------------------------------------------------------------------------------- tokenizer
def _training_texts(conversations: list[dict]):
    for conversation in conversations:
        for message in conversation["messages"]:
            yield message["role"]
            yield message["content"]


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Train the byte-level BPE (a :class:`tokenizers.Tokenizer`) on the default conversations; deterministic.

    Special tokens ``<|endoftext|>`` (id 0, padding), ``<|im_start|>`` (1), ``<|im_end|>`` (2); the 256 byte
    symbols come next, then merges up to ``vocab_size`` (fewer if the corpus runs out of pairs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = list(_training_texts(generate_conversations(DEFAULT_NUM_CONVERSATIONS, DEFAULT_SEED)))
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tokenizer


def build_tokenizer(*, retrain: bool = False):
    """The shipped tokenizer as a :class:`transformers.PreTrainedTokenizerFast` with the ChatML template.

    ``eos_token`` is ``<|im_end|>`` (ends every turn), ``pad_token`` ``<|endoftext|>``, no BOS. Loads
    ``data/tokenizer.json`` (written by :func:`write_package_data`); ``retrain=True`` (or a missing file) trains
    it afresh with :func:`train_tokenizer` instead, in well under a second.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if retrain or not TOKENIZER_PATH.is_file():
        backend = train_tokenizer()
    else:
        backend = Tokenizer.from_file(str(TOKENIZER_PATH))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD, unk_token=None,
        additional_special_tokens=[IM_START], chat_template=CHATML_TEMPLATE, model_max_length=4096,
        padding_side="right")


def write_package_data() -> None:
    """(Re)write ``data/chat_sft.jsonl`` and ``data/tokenizer.json`` from their generators."""
    DATA_DIR.mkdir(exist_ok=True)
    conversations = generate_conversations(DEFAULT_NUM_CONVERSATIONS, DEFAULT_SEED)
    DEFAULT_DATASET_PATH.write_text("".join(_dumps(c) + "\n" for c in conversations), encoding="utf-8")
    train_tokenizer().save(str(TOKENIZER_PATH), pretty=False)


if __name__ == "__main__":  # python -m fused_wce.trl_integration.chat_data
    write_package_data()
    print(f"wrote {DEFAULT_DATASET_PATH} and {TOKENIZER_PATH}")
