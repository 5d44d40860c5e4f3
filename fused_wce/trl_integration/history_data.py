"""The shipped experiment data: multi-turn conversations whose later turns can only be answered from the history.

Each conversation has a short system prompt, then exchanges of three kinds, every assistant message labelled
``"needs_history": true/false``:

* **statements** (``needs_history: false``): the user states a fact (name, city, favourite colour, job, favourite
  food), lists three pets, says how many of some item they have; the assistant confirms it from that message
  alone by repeating it ("Your name is Priya.", "You live in Oslo.");
* **updates** (running state and corrections): "I get 4 more." -> "Now you have 11 coins." needs the earlier count
  (``needs_history: true``); "Actually, I moved: I live in Lyon now, not Oslo." -> "You live in Lyon now."
  does not (the message carries the fact);
* **recalls** (``needs_history: true``): "What is my name?" -> "Your name is Priya.", "Which pet did I mention
  second?" (coreference into the list), "How many coins do I have now?" (the running total), "Where do I live?"
  (after a correction: the corrected city);
* **independent questions** (``needs_history: false``) interleaved everywhere: arithmetic, unit conversions and
  capitals from :mod:`chat_data`, a different kind each time, so earlier answers do not prime later ones.

Assistant messages whose answer contains one checkable fact carry ``"expected"``: that fact as a string ("Priya",
"11", "parrot", "Lima"); the generation score (:mod:`evaluation`) checks greedy answers against it.

The shipped files are exactly :func:`write_history_data`'s output: ``data/history_train.jsonl``
(:data:`TRAIN_SIZE` conversations, seed :data:`TRAIN_SEED`) and ``data/history_heldout.jsonl`` (:data:`HELDOUT_SIZE`,
seed :data:`HELDOUT_SEED`, no conversation in common with the training file). Regenerate them with
``python -m fused_wce.trl_integration.history_data``; ``--train N --heldout M --out DIR`` writes larger sets
elsewhere.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from .chat_data import DATA_DIR, _arithmetic, _capital, _conversion

TRAIN_PATH = DATA_DIR / "history_train.jsonl"
HELDOUT_PATH = DATA_DIR / "history_heldout.jsonl"
TRAIN_SIZE, TRAIN_SEED = 160, 1
HELDOUT_SIZE, HELDOUT_SEED = 100, 2

# The system prompt states the reply style (repeat back what the user says, answer in one sentence), so that a turn
# that needs no history is nearly as predictable from the system prompt and its own exchange as from the whole
# conversation: the loss-based context dependence then measures mostly the facts taken from the history, little of
# the reply style learnt from earlier turns. Kept short: it is part of every training sequence.
SYSTEM_PROMPTS = (
    "You are a helpful assistant. When the user tells you something, repeat it back to them in one sentence; answer "
    "questions in one short sentence.",
    "You are a friendly assistant who remembers what the user says. Confirm each thing the user tells you by "
    "repeating it; answer in one sentence.",
)
NAMES = ("Priya", "Tomas", "Amara", "Lukas", "Mei", "Omar", "Sofia", "Kenji", "Ingrid", "Mateo", "Zara", "Felix",
         "Leila", "Arjun", "Nadia", "Hugo", "Yuki", "Elena", "Kwame", "Clara")
CITIES = ("Oslo", "Lisbon", "Nairobi", "Kyoto", "Denver", "Porto", "Lyon", "Bergen", "Tallinn", "Cusco", "Perth",
          "Dublin", "Seville", "Krakow", "Hanoi", "Quebec")
COLOURS = ("green", "purple", "orange", "teal", "yellow", "crimson", "navy", "silver")
JOBS = ("nurse", "carpenter", "pilot", "teacher", "chemist", "baker", "architect", "librarian")
FOODS = ("ramen", "lasagna", "tacos", "paella", "sushi", "curry", "pancakes", "dumplings")
PETS = ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "horse")
ITEMS = ("apples", "books", "coins", "stamps", "marbles", "candles")
ORDINALS = ("first", "second", "third")

# Simple facts: (pool, (statement, confirmation) pairs, recall questions, recall answer); {x} is the fact.
FACTS = {
    "name": (NAMES, (("My name is {x}.", "Your name is {x}."), ("Hi, I am {x}.", "Hi {x}."),
                     ("Please call me {x}.", "I will call you {x}.")),
             ("What is my name?", "Do you remember my name?", "What did I say my name was?"), "Your name is {x}."),
    "city": (CITIES, (("I live in {x}.", "You live in {x}."), ("My home town is {x}.", "Your home town is {x}."),
                      ("I am based in {x}.", "You are based in {x}.")),
             ("Where do I live?", "Which city do I live in?", "Remind me, where is my home?"), "You live in {x}."),
    "colour": (COLOURS, (("My favourite colour is {x}.", "Your favourite colour is {x}."),
                         ("I like the colour {x} best.", "You like the colour {x} best.")),
               ("What is my favourite colour?", "Which colour do I like best?"), "Your favourite colour is {x}."),
    "job": (JOBS, (("I work as a {x}.", "You work as a {x}."), ("I am a {x} by trade.", "You are a {x} by trade.")),
            ("What is my job?", "What do I do for a living?"), "You work as a {x}."),
    "food": (FOODS, (("My favourite food is {x}.", "Your favourite food is {x}."),
                     ("I could eat {x} every day.", "You could eat {x} every day.")),
             ("What is my favourite food?", "Which food do I love most?"), "Your favourite food is {x}."),
}
TOPICS = tuple(FACTS) + ("pets", "count")
INDEPENDENT = (_arithmetic, _conversion, _capital)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str, needs_history: bool, expected: str | None = None) -> dict:
    message = {"role": "assistant", "content": text, "needs_history": needs_history}
    if expected is not None:
        message["expected"] = expected
    return message


def _fact_topic(rng: random.Random, topic: str) -> tuple[list[dict], list[list[dict]], list[list[dict]]]:
    """(statement exchange, update exchanges, recall exchanges) of one simple fact; a city may be corrected."""
    pool, statements, questions, answer = FACTS[topic]
    value = rng.choice(pool)
    said, confirmed = rng.choice(statements)
    statement = [_user(said.format(x=value)), _assistant(confirmed.format(x=value), False)]
    updates = []
    if topic == "city" and rng.random() < 0.5:
        moved = rng.choice([c for c in pool if c != value])
        updates.append([_user(f"Actually, I moved: I live in {moved} now, not {value}."),
                        _assistant(f"You live in {moved} now.", False)])
        value = moved
    recall = [_user(rng.choice(questions)), _assistant(answer.format(x=value), True, value)]
    return statement, updates, [recall]


def _pets_topic(rng: random.Random) -> tuple[list[dict], list[list[dict]], list[list[dict]]]:
    """Three pets listed once; later a question by position ("the second one") needs the list."""
    pets = rng.sample(PETS, 3)
    statement = [_user(f"I have three pets: a {pets[0]}, a {pets[1]} and a {pets[2]}."),
                 _assistant(f"You have a {pets[0]}, a {pets[1]} and a {pets[2]}.", False)]
    position = rng.randrange(3)
    question = rng.choice((f"Which pet did I mention {ORDINALS[position]}?",
                           f"What was the {ORDINALS[position]} pet I listed?"))
    recall = [_user(question), _assistant(f"The {ORDINALS[position]} pet you listed is the {pets[position]}.", True,
                                          pets[position])]
    return statement, [], [recall]


def _count_topic(rng: random.Random) -> tuple[list[dict], list[list[dict]], list[list[dict]]]:
    """A running count: a start value, one or two changes (each answer needs the previous total), a final recall."""
    item, count = rng.choice(ITEMS), rng.randint(3, 12)
    statement = [_user(f"I have {count} {item}."), _assistant(f"You have {count} {item}.", False)]
    updates = []
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.5 or count < 3:
            change = rng.randint(2, 9)
            text = rng.choice(("I get {k} more.", "Someone gives me {k} more.")).format(k=change)
            count += change
        else:
            change = rng.choice([k for k in range(1, count) if 2 * k != count])  # the total is not the change
            text = rng.choice(("I give away {k}.", "I lose {k} of them.")).format(k=change)
            count -= change
        updates.append([_user(text), _assistant(f"Now you have {count} {item}.", True, str(count))])
    recall = [_user(f"How many {item} do I have now?"), _assistant(f"You have {count} {item}.", True, str(count))]
    return statement, updates, [recall]


def _topic_exchanges(rng: random.Random, topic: str):
    if topic == "pets":
        return _pets_topic(rng)
    if topic == "count":
        return _count_topic(rng)
    return _fact_topic(rng, topic)


def _independent_exchanges(rng: random.Random, count: int) -> list[list[dict]]:
    """``count`` self-contained question/answer exchanges, each of a different kind (no priming by a twin)."""
    exchanges = []
    for make in rng.sample(INDEPENDENT, count):
        question, answer, _ = make(rng)
        exchanges.append([_user(question), _assistant(answer, False, _answer_fact(answer))])
    return exchanges


def _answer_fact(answer: str) -> str:
    """The fact an independent answer states: the number after "=" ("7 + 5 = 12." -> "12", "3 hours = 180
    minutes." -> "180") or what follows " is " ("The capital of India is New Delhi." -> "New Delhi")."""
    if "=" in answer:
        return answer.split("=")[-1].split()[0].rstrip(".")
    return answer.rsplit(" is ", 1)[-1].rstrip(".")


def _interleaved(rng: random.Random, sequences: list[list]) -> list:
    """The items of ``sequences`` merged in a random order that keeps each sequence's own order."""
    owners = [index for index, sequence in enumerate(sequences) for _ in sequence]
    rng.shuffle(owners)
    iterators = [iter(sequence) for sequence in sequences]
    return [next(iterators[owner]) for owner in owners]


def generate_conversation(rng: random.Random) -> dict:
    """One conversation ``{"messages": [...]}``: 2-3 topics stated, their updates (each topic's in its order), then their
    recalls in random order, with 1-3 independent questions inserted at random places after the first statement."""
    topics = rng.sample(TOPICS, rng.randint(2, 3))
    parts = [_topic_exchanges(rng, topic) for topic in topics]
    statements = [statement for statement, _, _ in parts]
    updates = _interleaved(rng, [topic_updates for _, topic_updates, _ in parts])
    recalls = [exchange for _, _, topic_recalls in parts for exchange in topic_recalls]
    rng.shuffle(recalls)
    exchanges = statements + updates + recalls
    for exchange in _independent_exchanges(rng, rng.randint(1, 3)):
        exchanges.insert(rng.randint(1, len(exchanges)), exchange)
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}]
    for exchange in exchanges:
        messages.extend(exchange)
    return {"messages": messages}


def generate_history_conversations(n: int, seed: int) -> list[dict]:
    """``n`` conversations, a pure function of ``seed`` (see the module docstring)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    return [generate_conversation(rng) for _ in range(n)]


def _heldout(n: int, seed: int, train: list[dict]) -> list[dict]:
    """``n`` conversations of ``seed`` that do not occur in ``train`` (a repeat is skipped, the next one taken)."""
    seen = {json.dumps(c, sort_keys=True) for c in train}
    rng, heldout = random.Random(seed), []
    while len(heldout) < n:
        conversation = generate_conversation(rng)
        if json.dumps(conversation, sort_keys=True) not in seen:
            heldout.append(conversation)
    return heldout


def generate_splits(train_size: int = TRAIN_SIZE, heldout_size: int = HELDOUT_SIZE, train_seed: int = TRAIN_SEED,
                    heldout_seed: int = HELDOUT_SEED) -> tuple[list[dict], list[dict]]:
    """(training conversations, held-out conversations), disjoint."""
    if isinstance(heldout_size, bool) or not isinstance(heldout_size, int) or heldout_size < 0:
        raise ValueError(f"heldout_size must be an int >= 0, got {heldout_size!r}")
    train = generate_history_conversations(train_size, train_seed)
    return train, _heldout(heldout_size, heldout_seed, train)


def _write_jsonl(conversations: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations), encoding="utf-8")


def write_history_data(out_dir: Path = DATA_DIR, train_size: int = TRAIN_SIZE,
                       heldout_size: int = HELDOUT_SIZE) -> tuple[Path, Path]:
    """Write ``history_train.jsonl`` and ``history_heldout.jsonl`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = generate_splits(train_size, heldout_size)
    paths = out_dir / TRAIN_PATH.name, out_dir / HELDOUT_PATH.name
    _write_jsonl(train, paths[0])
    _write_jsonl(heldout, paths[1])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_wce.trl_integration.history_data",
                                     description="Write the multi-turn conversations with needs_history labels.")
    parser.add_argument("--out", default=str(DATA_DIR), help="output folder (default: the package's data folder)")
    parser.add_argument("--train", type=int, default=TRAIN_SIZE, help="training conversations")
    parser.add_argument("--heldout", type=int, default=HELDOUT_SIZE, help="held-out conversations")
    args = parser.parse_args(argv)
    if args.train < 0 or args.heldout < 0:
        parser.error("--train and --heldout must be >= 0")
    for path in write_history_data(Path(args.out), args.train, args.heldout):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
