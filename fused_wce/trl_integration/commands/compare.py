"""``fused-wce compare``: the same model trained under several turn weightings, one report.

Every scheme starts from the same initial weights (the tiny demo Llama built with ``--seed``, or
``--model_name_or_path``), sees the same training data in the same order and trains for the same number of steps;
only the per-token weights differ. Schemes (``--schemes``, comma-separated, in this order by default):

==============  ==========================================================================================
``full``        every token, template scaffolding included (TRL's default full-sequence loss)
``assistant``   assistant turns only (TRL's ``assistant_only_loss``)
``last_n``      the last ``--last_n`` assistant turns only
``decay``       assistant turn k positions before the last weighted ``--decay ** k``
``per_role``    ``--role_weights`` (default ``assistant=1,user=0.3,tool=0.3``)
``adaptive``    assistant turns with adaptive per-turn multipliers (``--adaptive turn``: EMA of each turn's loss)
==============  ==========================================================================================

All of them keep the data's per-message ``weight`` keys (a wrong answer marked ``weight: 0`` never teaches).

Measured on the held-out conversations (``--holdout_size``, never trained on), before training (the shared
initial model) and after each scheme:

* **Loss per role and per assistant turn index**: mean cross-entropy of the tokens of each role's messages and of
  the k-th assistant message (``turn_1``, ..., ``turn_5+``), plus the full sequence (every token); messages with
  ``weight: 0`` are left out. Unweighted, so the schemes are compared on the same numbers whatever they trained on.
* **Context dependence per assistant turn index**: for each held-out assistant message that has earlier
  exchanges, the mean cross-entropy of its tokens *without* the history minus *with* the full history. Without
  the history means: the system prompt (if any) and the current exchange only, i.e. the messages from the last
  user message before it (tool calls and results of that exchange included). Positive: the model uses the earlier
  turns to predict this one (a dialogue-coherence signal; the shipped data's corrections, "That is wrong. Please
  try again." followed by the right answer, need the earlier question). Turn 1 never has history, so it has no
  value.

Writes into ``--output_dir`` (default ``outputs/fused-wce-compare``): ``report.md`` (tables and setup),
``results.csv`` (long format, stable columns :data:`~.compare_measure.RESULT_COLUMNS`), ``compare.png`` (loss and
context dependence per turn index, training curves) and, per scheme, ``<scheme>/loss_curves.csv|png``. Models are
not saved.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import time
from dataclasses import dataclass, field

from ..chat_weights.adaptive import AdaptiveTurnWeights
from ..chat_weights.turn_weighting import TurnWeighting
from .compare_measure import BEFORE, measure, result_rows, result_value
from .compare_report import format_report, plot, write_csv
from .data import prepare_data
from .model import build_model, unwrap_model
from .options import UsageError, checkpointing_alias_notice_silenced, parse_args
from .training import make_trainer

SCHEMES = ("full", "assistant", "last_n", "decay", "per_role", "adaptive")

# A bare run: 6 schemes x 60 steps of the tiny Llama (batch 8), about 1.5 minutes in all on 2 busy CPU cores.
COMPARE_DEMO_DEFAULTS = {"max_steps": 60, "logging_steps": 10, "warmup_steps": 5}


@dataclass
class CompareArguments:
    """Flags of ``fused-wce compare`` beyond ``trl sft``'s."""

    schemes: str = field(default=",".join(SCHEMES), metadata={
        "help": f"Comma-separated weightings to train and compare, among {', '.join(SCHEMES)}."})
    last_n: int = field(default=2, metadata={"help": "N of the last_n scheme (the last N assistant turns)."})
    decay: float = field(default=0.5, metadata={"help": "Factor of the decay scheme (turn k before the last: decay**k)."})
    role_weights: str = field(default="assistant=1,user=0.3,tool=0.3", metadata={
        "help": "Per-role weights of the per_role scheme."})
    adaptive: str = field(default="turn", metadata={
        "help": 'Groups of the adaptive scheme: "turn" or "role" (default EMA 0.9, power 1, multipliers in '
                "[0.25, 4])."})
    holdout_size: int = field(default=32, metadata={
        "help": "Conversations held out (never trained on) for the measurements; must be > 0."})


def parse_compare_args(argv: list[str]):
    """(script, training, model, dataset, :class:`CompareArguments`) of ``fused-wce compare``."""
    return parse_args(argv, prog="fused-wce compare", first=CompareArguments,
                      extra_defaults={"output_dir": os.path.join("outputs", "fused-wce-compare")},
                      demo_defaults=COMPARE_DEMO_DEFAULTS)


def scheme_weightings(args: CompareArguments) -> dict:
    """``{scheme: TurnWeighting}`` for ``args.schemes``; ValueError naming the flag on a bad value."""
    names = [name.strip() for name in args.schemes.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCHEMES]
    if not names or unknown:
        raise ValueError(f"--schemes: unknown scheme(s) {unknown or names!r}; expected some of {list(SCHEMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--schemes: a scheme is listed twice in {args.schemes!r}")
    factories = {
        "full": lambda: TurnWeighting(full_sequence=True),
        "assistant": lambda: TurnWeighting(),
        "last_n": lambda: TurnWeighting.from_cli(None, last_n=args.last_n),
        "decay": lambda: TurnWeighting.from_cli(None, decay=args.decay),
        "per_role": lambda: TurnWeighting.from_cli(args.role_weights),
        "adaptive": lambda: TurnWeighting(adaptive=AdaptiveTurnWeights.from_cli(args.adaptive)),
    }
    weightings = {name: factories[name]() for name in names}
    if "adaptive" in weightings and weightings["adaptive"].adaptive is None:
        raise ValueError("--adaptive: the adaptive scheme needs 'turn' or 'role'")
    return weightings


def _parameter_fingerprint(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def main_compare(argv: list[str]) -> int:
    script_args, training_args, model_args, dataset_args, compare_args = parse_compare_args(argv)
    try:
        schemes = scheme_weightings(compare_args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if compare_args.holdout_size <= 0:
        raise UsageError("--holdout_size must be > 0: compare measures on held-out conversations")
    train_dataset, holdout = prepare_data(script_args, dataset_args, TurnWeighting(), compare_args.holdout_size,
                                          training_args.seed)
    if holdout is None or "messages" not in holdout.column_names:
        raise UsageError("compare needs conversations (a `messages` column) and enough of them to hold some out")
    conversations = list(holdout["messages"])
    output_dir = training_args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    started = time.perf_counter()
    print(f"[fused-wce] compare: {len(schemes)} schemes ({', '.join(schemes)}), {len(train_dataset)} training "
          f"conversations, {len(conversations)} held out, seed {training_args.seed}", flush=True)

    rows, timings, curves, fingerprints = [], {}, {}, {}
    for name, weighting in schemes.items():
        timings[name], curves[name] = _train_and_measure(name, weighting, training_args, model_args, train_dataset,
                                                         conversations, rows, fingerprints)

    command = "fused-wce compare" + ("" if not argv else " " + " ".join(shlex.quote(arg) for arg in argv))
    setup = _setup_lines(command, script_args, training_args, model_args, len(train_dataset), len(conversations),
                         time.perf_counter() - started)
    report = format_report(rows, setup, schemes, timings, curves)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(report)
    write_csv(rows, os.path.join(output_dir, "results.csv"))
    plot(rows, list(schemes), curves, os.path.join(output_dir, "compare.png"))
    print("\n" + report, flush=True)
    print(f"[fused-wce] wrote {output_dir}/report.md, results.csv, compare.png and <scheme>/loss_curves.*",
          flush=True)
    return 0


def _train_and_measure(name, weighting, training_args, model_args, train_dataset, conversations, rows,
                       fingerprints):
    """Train scheme ``name`` from the shared initial weights and add its held-out measurements to ``rows`` (the
    initial model's too, before the first scheme trains). Returns (training seconds, logged curve rows)."""
    from ..trainer.curves import LossCurvesCallback

    with checkpointing_alias_notice_silenced():
        args = dataclasses.replace(training_args, output_dir=os.path.join(training_args.output_dir, name),
                                   run_name=name)
    model, tokenizer = build_model(model_args, args)
    curve_callback = LossCurvesCallback()
    trainer = make_trainer(model, tokenizer, args, model_args, train_dataset, None, weighting, curves=False,
                           print_stages=False)
    trainer.add_callback(curve_callback)
    model = unwrap_model(trainer)
    fingerprints[name] = _parameter_fingerprint(model)
    if not rows:  # every scheme starts from these weights (checked below): measure them once
        rows += result_rows(BEFORE, "before", measure(model, tokenizer, conversations, args.max_length))
    elif fingerprints[name] != next(iter(fingerprints.values())):
        raise RuntimeError(f"scheme {name!r} starts from other initial weights than {next(iter(fingerprints))!r}")
    tick = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - tick
    measured = measure(unwrap_model(trainer), tokenizer, conversations, args.max_length)
    rows += result_rows(name, "after", measured)
    final = [row for row in curve_callback.rows if row["split"] == "train"]
    print(f"[fused-wce] {name:<10} {trainer.state.global_step} steps in {seconds:5.1f} s; held-out "
          f"assistant loss {result_value(rows, BEFORE, 'loss', 'role/assistant'):.3f} -> "
          f"{measured['loss'].mean('role/assistant'):.3f}"
          + (f"; last logged train loss {final[-1]['loss']:.3f}" if final else ""), flush=True)
    return seconds, curve_callback.rows


def _setup_lines(command, script_args, training_args, model_args, n_train: int, n_held_out: int,
                 seconds: float) -> list[str]:
    """The report's setup section: command, model and data, training, total time and machine."""
    import torch

    model_name = model_args.model_name_or_path or "tiny Llama from a config (hidden 128, 2 layers), shipped tokenizer"
    steps = training_args.max_steps > 0
    return [
        f"- command: `{command}`",
        f"- model: {model_name}; data: {script_args.dataset_name or 'the shipped conversations'} "
        f"({n_train} for training, {n_held_out} held out); seed {training_args.seed}",
        f"- training: {training_args.max_steps if steps else training_args.num_train_epochs} "
        f"{'steps' if steps else 'epochs'}, batch {training_args.per_device_train_batch_size}, "
        f"learning rate {training_args.learning_rate:g} "
        f"({getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)}), "
        "the same for every scheme",
        f"- total time {seconds:.1f} s (training, measurements, report) on "
        f"{'CUDA' if torch.cuda.is_available() else f'CPU ({os.cpu_count()} cores)'}",
    ]
