"""The ``fused-wce`` command line: ``fused-wce sft`` and ``fused-wce compare`` (:mod:`.commands`).

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
           adaptive) on the same data and seed; writes report.md, results.csv and compare.png;
           `fused-wce compare --help`
"""

COMMANDS = ("sft", "compare")


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
        if command == "compare":
            from .commands.compare import main_compare

            return main_compare(rest)
        from .commands.sft import main_sft

        return main_sft(rest)
    except UsageError as error:
        print(f"fused-wce {command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
