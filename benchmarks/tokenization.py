"""Tokenization throughput: ``tokenize_with_weights`` against TRL's own tokenization, by conversation length.

    python -m benchmarks tokenization [--messages 2 10 100 1000] [--min-seconds 2] [--chat-template FILE]
                                      [--out bench_out]

CPU only. Conversations of 2, 10, 100 and 1000 messages are built from the shipped dataset (its conversations
joined one after another, one system prompt at the start) and tokenized with the shipped tokenizer and its ChatML
template, which has ``{% generation %}`` blocks, or the Jinja template of ``--chat-template`` (e.g. one of
tests/chat_templates/, a model family's training template):

* ``trl``: what ``SFTTrainer`` does per conversation with ``assistant_only_loss=True`` (``trl.data_utils``):
  ``apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)``;
* ``weighted``: :func:`fused_wce.trl_integration.tokenize_with_weights`, which also finds which tokens belong to
  which message (its cost grows linearly with the number of messages, as TRL's does).

Each is repeated until ``--min-seconds`` of CPU time have passed; conversations per second are counted in CPU time
(``time.process_time``: what a busy machine's other processes do not change) and in wall time. Writes
``tokenization.csv`` and ``tokenization.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

DEFAULT_MESSAGES = (2, 10, 100, 1000)


def long_conversation(conversations, n_messages: int) -> list[dict]:
    """``n_messages`` messages: the shipped conversations one after another, the first one's system prompt only."""
    messages = []
    for conversation in conversations:
        turns = [message for message in conversation if message["role"] != "system" or not messages]
        messages += turns
        if len(messages) >= n_messages:
            break
    if len(messages) < n_messages:
        raise ValueError(f"the shipped conversations hold {len(messages)} messages, fewer than {n_messages}")
    return messages[:n_messages]


def _throughput(call, min_seconds: float) -> tuple[float, float, int]:
    """(calls per CPU second, calls per wall second, calls) of ``call`` repeated for ``min_seconds`` of CPU."""
    call()  # warm: templates compiled, caches filled
    calls, cpu, wall = 0, time.process_time(), time.perf_counter()
    while True:
        call()
        calls += 1
        cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
        if cpu_s >= min_seconds:
            return calls / max(cpu_s, 1e-9), calls / max(wall_s, 1e-9), calls


def measure(sizes=DEFAULT_MESSAGES, min_seconds: float = 2.0, chat_template: str | None = None) -> list[dict]:
    """One row per conversation length: tokens, conversations/s of both, and the time ratio; ``chat_template``
    (Jinja source) replaces the shipped tokenizer's template."""
    from fused_wce.trl_integration import TurnWeighting, build_tokenizer, load_default_dataset, tokenize_with_weights

    tokenizer = build_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    conversations = load_default_dataset()["messages"]
    weighting = TurnWeighting(role_weights={"assistant": 1.0, "user": 0.1})
    rows = []
    for n_messages in sizes:
        messages = long_conversation(conversations, n_messages)

        def trl_tokenize():
            return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)

        def weighted():
            return tokenize_with_weights(tokenizer, messages, weighting)

        tokens = len(trl_tokenize()["input_ids"])
        if weighted()["input_ids"] != trl_tokenize()["input_ids"]:
            raise AssertionError(f"{n_messages} messages: tokenize_with_weights and TRL tokenized differently")
        trl_cpu, trl_wall, trl_calls = _throughput(trl_tokenize, min_seconds)
        ours_cpu, ours_wall, ours_calls = _throughput(weighted, min_seconds)
        rows.append({"messages": n_messages, "tokens": tokens,
                     "trl_conversations_per_cpu_s": round(trl_cpu, 2), "trl_conversations_per_s": round(trl_wall, 2),
                     "weighted_conversations_per_cpu_s": round(ours_cpu, 2),
                     "weighted_conversations_per_s": round(ours_wall, 2),
                     "weighted_time_over_trl": round(trl_cpu / ours_cpu, 2), "calls": (trl_calls, ours_calls)})
        print(f"[tokenization] {n_messages:>5} messages ({tokens} tokens): TRL {trl_cpu:9.1f} conv/s, "
              f"tokenize_with_weights {ours_cpu:9.1f} conv/s (CPU time; {trl_cpu / ours_cpu:.1f}x TRL's time)",
              flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| messages | tokens | TRL conv/s (CPU) | weighted conv/s (CPU) | weighted time / TRL's | "
             "TRL conv/s (wall) | weighted conv/s (wall) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['messages']} | {row['tokens']} | {row['trl_conversations_per_cpu_s']} | "
                     f"{row['weighted_conversations_per_cpu_s']} | {row['weighted_time_over_trl']}x | "
                     f"{row['trl_conversations_per_s']} | {row['weighted_conversations_per_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks.tokenization") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, nargs="+", default=list(DEFAULT_MESSAGES),
                        help="conversation lengths in messages (default: 2 10 100 1000)")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="CPU seconds each tokenizer is repeated for, per length (default: 2)")
    parser.add_argument("--chat-template", metavar="FILE",
                        help="a Jinja chat template file to use instead of the shipped ChatML one")
    parser.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.messages):
        parser.error(f"--messages must be >= 1, got {args.messages}")
    if args.min_seconds < 0:
        parser.error(f"--min-seconds must be >= 0, got {args.min_seconds}")
    chat_template = None
    if args.chat_template is not None:
        try:
            with open(args.chat_template) as handle:
                chat_template = handle.read()
        except OSError as error:
            parser.error(f"--chat-template: cannot read {args.chat_template!r}: {error.strerror}")
    rows = measure(args.messages, args.min_seconds, chat_template)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenization.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key for key in rows[0] if key != "calls"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "tokenization.md"), "w") as handle:
        handle.write(markdown(rows))
    print(f"[tokenization] wrote {os.path.join(args.out, 'tokenization.csv')} and tokenization.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
