"""Command line: ``python -m benchmarks [--quick | --smoke] [--out DIR] [--device auto|cuda|cpu]``, and the
subcommands ``python -m benchmarks static ...`` (benchmarks.static: compiled resources and occupancy, no GPU),
``python -m benchmarks roofline ...`` (benchmarks.roofline: predicted time and memory per provider) and
``python -m benchmarks tokenization ...`` (benchmarks.tokenization: chat tokenization throughput, CPU)."""
from __future__ import annotations

import argparse
import os

# Subcommands: name -> (module, one line). Each is the module's own ``main`` (``python -m benchmarks.<name>``
# keeps working); the suite's flat options stay as they were for the measurement run.
SUBCOMMANDS = {
    "static": ("benchmarks.static", "registers, spills, shared memory and occupancy of every kernel compiled for "
                                    "sm_80/sm_90/sm_100, without a GPU"),
    "roofline": ("benchmarks.roofline", "FLOPs, minimum HBM bytes, predicted time and peak memory of every "
                                        "provider's algorithm"),
    "tokenization": ("benchmarks.tokenization", "conversations/s of tokenize_with_weights against TRL's own "
                                                "tokenization, for 2 to 1000 messages (CPU)"),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time, peak memory and accuracy of fused_wce and every alternative loss kernel, side by side. "
                    "Without a GPU the CPU mode runs automatically.",
        epilog="subcommands (each takes its own options; see `python -m benchmarks NAME --help`):\n" + "\n".join(
            f"  {name:<9} {line}" for name, (_, line) in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="GPU: the profile that finishes in under 8 minutes on one H200; CPU: the subset "
                             "that finishes in under 3 minutes on 2 cores")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, one repeat (the test suite's run)")
    parser.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset of providers (default: all of the profile)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training-step row")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds after which no new measurement starts (replaces the profile's guard: 400 s "
                             "in --quick); the skipped rows say so")
    parser.add_argument("--verbose", action="store_true", help="show the workers' own output")
    return parser


def run_subcommand(name: str, argv: list[str]) -> int:
    """``python -m benchmarks NAME ARGS``: the module's ``main(ARGS, prog=...)``, exit status included."""
    import importlib

    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(argv, prog=f"python -m benchmarks {name}")


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv[0], argv[1:])
    args = make_parser().parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        raise SystemExit(f"--budget-s must be > 0, got {args.budget_s}")
    import torch

    from .providers import PROVIDERS_BY_NAME
    from .runner import choose_profile, run_profile

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    providers = None
    if args.providers:
        providers = [name.strip() for name in args.providers.split(",") if name.strip()]
        unknown = [name for name in providers if name not in PROVIDERS_BY_NAME]
        if unknown:
            raise SystemExit(f"--providers: unknown {unknown}; known: {sorted(PROVIDERS_BY_NAME)}")
    profile = choose_profile(device, args.quick, args.smoke)
    print(f"[benchmarks] profile {profile} on {device}, output in {os.path.abspath(args.out)}", flush=True)
    result = run_profile(profile, args.out, providers=providers, e2e=not args.no_e2e, verbose=args.verbose,
                         budget_s=args.budget_s)

    print("\n== targets ==")
    for target in result["targets"]:
        value = target["value"]
        shown = "-" if value is None else f"{value:.3g}"
        print(f"  [{target['verdict']}] {target['target']}: {shown} ({target['comparison']} {target['threshold']}) "
              f"- {target['detail']}")
    if device == "cuda":
        from .report import gap_line

        environment = result["environment"]
        print(f"\n== roofline gaps over 20% ({environment.get('roofline_card')} values; explain each in "
              f"benchmarks/NOTES.md) ==")
        if environment.get("roofline_card_note"):
            print(f"  note: {environment['roofline_card_note']}")
        for row in result["roofline_gaps"]:
            print("  " + gap_line(row))
        if not result["roofline_gaps"]:
            print("  none")
    if result["failures"]:
        print("\n== failures ==")
        for failure in result["failures"]:
            print("  " + failure)
    print("\n== outputs ==")
    for kind, path in result["paths"].items():
        if kind == "plots":
            print(f"  plots: {len(path)} PNG files in {os.path.join(args.out, 'plots')}")
        else:
            print(f"  {kind}: {path}")
    print(f"  wall time: {result['environment']['wall_s']} s")
    return 0
