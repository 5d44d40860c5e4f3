"""``fused-wce evaluate``: the held-out measurements of :mod:`~fused_wce.trl_integration.evaluation` for any model
or checkpoint on any local ``messages`` jsonl, without training::

    fused-wce evaluate --model_name_or_path ~/.cache/fused_wce/SmolLM2-135M-Instruct
    fused-wce evaluate --model_name_or_path model.gguf --dataset_name chats.jsonl --max_conversations 50

Measured per held-out conversation: the loss per role, per assistant turn index and per ``needs_history`` label,
the context dependence (loss without the history minus with it) and, on assistant messages with an ``expected``
fact, greedy answers (exact, containing the fact, and the same without the history as a control). Each number
comes with a bootstrap 95% interval over the conversations. Writes ``report.md`` (tables, findings in words) and
``results.csv`` (long format, :data:`~fused_wce.trl_integration.evaluation.results.RESULT_COLUMNS`) into
``--output_dir``. Without ``--dataset_name`` it measures the shipped held-out conversations
(:mod:`~fused_wce.trl_integration.history_data`).
"""
from __future__ import annotations

import argparse
import os
import shlex
import time

from ..evaluation.intervals import resample_counts
from ..evaluation.measure import ANSWERS, EvaluationOptions, check_labels, evaluate_conversations
from ..evaluation.report import history_findings, noise_note, tables
from ..evaluation.results import RESULT_COLUMNS, result_rows, write_csv
from ..history_data import HELDOUT_PATH
from .model import load_model, one_cpu_thread
from .options import UsageError

PROG = "fused-wce evaluate"


def evaluation_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "Held-out measurements of a model on chat conversations, without training: loss per role, turn index and "
        "needs_history label, context dependence, greedy answers; bootstrap 95% intervals over conversations. "
        "Writes report.md and results.csv."))
    parser.add_argument("--model_name_or_path", required=True,
                        help="a checkpoint folder, a model name available offline, or a .gguf file")
    parser.add_argument("--dataset_name", default=None,
                        help=f"a local .jsonl of {{\"messages\": [...]}} rows (default: {HELDOUT_PATH.name}, shipped)")
    parser.add_argument("--max_conversations", type=int, default=None, help="measure the first N (default: all)")
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens of a conversation measured (later ones ignored; default: all)")
    parser.add_argument("--answers", choices=ANSWERS, default="all",
                        help="messages with an `expected` fact whose greedy reply is scored: all, only those labelled "
                             "needs_history, or none (replies are the slow part)")
    parser.add_argument("--max_new_tokens", type=int, default=EvaluationOptions.max_new_tokens,
                        help="longest greedy reply, in tokens")
    parser.add_argument("--dtype", default=None, help="weights' dtype, e.g. float32 or bfloat16 (default: the "
                        "checkpoint's; float32 for .gguf)")
    parser.add_argument("--output_dir", default=os.path.join("outputs", "fused-wce-evaluate"))
    return parser


def load_conversations(path, limit: int | None = None) -> list[list[dict]]:
    """The ``messages`` of a local jsonl (every row checked, labels too), the first ``limit`` of them;
    :class:`UsageError` naming the file and row on bad data."""
    from ..chat_data import load_jsonl_dataset

    try:
        conversations = [list(messages) for messages in load_jsonl_dataset(path)["messages"]]
        check_labels(conversations, str(path))
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(" ".join(str(error).split())) from None
    return conversations[:limit] if limit is not None else conversations


def measure_model(model, tokenizer, conversations, options: EvaluationOptions, label: str):
    """:func:`~fused_wce.trl_integration.evaluation.measure.evaluate_conversations` with a progress line about
    every 30 s."""
    started, last = time.perf_counter(), [time.perf_counter()]

    def progress(done, total):
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            print(f"[fused-wce] {label}: measured {done}/{total} held-out conversations ({now - started:.0f} s)",
                  flush=True)

    return evaluate_conversations(model, tokenizer, conversations, options, progress=progress)


def _checked(args, parser) -> EvaluationOptions:
    for flag in ("max_conversations", "max_length", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be >= 1, got {value}")
    return EvaluationOptions(max_length=args.max_length, answers=args.answers, max_new_tokens=args.max_new_tokens)


def main_evaluate(argv: list[str]) -> int:
    parser = evaluation_parser()
    args = parser.parse_args(argv)
    options = _checked(args, parser)
    conversations = load_conversations(args.dataset_name or HELDOUT_PATH, args.max_conversations)
    one_cpu_thread(use_cpu=False)
    started = time.perf_counter()
    try:
        model, tokenizer = load_model(args.model_name_or_path, args.dtype)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UsageError(f"--model_name_or_path: cannot load {args.model_name_or_path!r}: {reason}") from None
    measured = measure_model(model, tokenizer, conversations, options, args.model_name_or_path)
    counts = resample_counts(len(conversations))
    name = os.path.basename(os.path.normpath(args.model_name_or_path))
    os.makedirs(args.output_dir, exist_ok=True)
    write_csv(result_rows(name, "evaluated", {"-": measured}, counts), RESULT_COLUMNS,
              os.path.join(args.output_dir, "results.csv"))
    command = " ".join([PROG] + [shlex.quote(arg) for arg in argv])
    report = "\n".join([
        f"# {PROG}", "",
        f"- command: `{command}`",
        f"- model: {args.model_name_or_path}; data: {args.dataset_name or HELDOUT_PATH.name} "
        f"({len(conversations)} conversations); generation: "
        + (f"greedy, at most {options.max_new_tokens} tokens, on {options.answers} messages with an expected fact"
           if options.answers != "none" else "off"),
        f"- time {time.perf_counter() - started:.0f} s", "",
        noise_note(None, len(conversations)), "",
        *history_findings(name, [measured], counts), "",
        *tables({name: [measured]}, counts),
    ])
    with open(os.path.join(args.output_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(report)
    print("\n" + report, flush=True)
    print(f"[fused-wce] wrote {args.output_dir}/report.md and results.csv", flush=True)
    return 0
