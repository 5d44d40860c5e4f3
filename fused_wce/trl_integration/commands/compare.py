"""``fused-wce compare``: the same model trained under several turn weightings, with several seeds, one report.

Every scheme starts from the same initial weights (the tiny demo Llama built with the seed, or
``--model_name_or_path``: a checkpoint folder or a ``.gguf`` file), sees the same training data in the same order
and trains for the same number of steps; only the per-token weights differ. ``--seeds 0,1,2`` repeats everything
per seed (data order, and the initial weights of the demo model). Schemes (``--schemes``, comma-separated, in this
order by default):

==============  ==========================================================================================
``full``        every token, template scaffolding included (TRL's default full-sequence loss)
``assistant``   assistant turns only (TRL's ``assistant_only_loss``)
``last_n``      the last ``--last_n`` assistant turns only
``decay``       assistant turn k positions before the last weighted ``--decay ** k``
``per_role``    ``--role_weights`` (default ``assistant=1,user=0.3,tool=0.3``)
``adaptive``    assistant turns with adaptive per-turn multipliers (``--adaptive turn``: EMA of each turn's loss)
==============  ==========================================================================================

All of them keep the data's per-message ``weight`` keys (a wrong answer marked ``weight: 0`` never teaches).

Data: without ``--dataset_name``, the shipped conversations whose later turns need the history
(:mod:`~fused_wce.trl_integration.history_data`): ``history_train.jsonl`` to train, ``history_heldout.jsonl``
held out. ``--eval_dataset`` names another held-out jsonl; otherwise ``--holdout_size`` conversations are split
off ``--dataset_name``. Measured on the held-out conversations before training (the initial model) and after each
scheme and seed, with :mod:`~fused_wce.trl_integration.evaluation`: loss per role, per assistant turn index and per
``needs_history`` label; context dependence (loss without the history minus with it); greedy answers against the
``expected`` facts (``--answers needs_history|none`` for fewer). Every cell is the mean over seeds with a bootstrap 95%
interval over the held-out conversations; the report says which differences are outside the noise.

Writes into ``--output_dir`` (default ``outputs/fused-wce-compare``): ``report.md``, ``results.csv``,
``differences.csv``, ``compare.png`` and, per scheme and seed, ``<scheme>/seed_<s>/loss_curves.csv|png``. Models
are saved there only with ``--save_models`` (the final weights, no optimizer state).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import time
from dataclasses import dataclass, field

from ..chat_weights.adaptive import AdaptiveTurnWeights
from ..chat_weights.turn_weighting import TurnWeighting
from ..evaluation.intervals import resample_counts
from ..evaluation.measure import ANSWERS, EvaluationOptions
from .compare_report import BEFORE, format_report, plot, write_results
from .data import prepare_data
from .evaluate import load_conversations, measure_model
from .model import build_model, one_cpu_thread, unwrap_model
from .options import UsageError, checkpointing_alias_notice_silenced, parse_args
from .training import make_trainer

SCHEMES = ("full", "assistant", "last_n", "decay", "per_role", "adaptive")
PROG = "fused-wce compare"
DESCRIPTION = ("Train the same model under several turn weightings (and seeds) on the same data and measure each "
               "on held-out conversations: loss per role, turn and needs_history label, context dependence, greedy "
               "answers, with bootstrap 95% intervals.")

# Every compare run: a short schedule, no checkpoints (models only with --save_models).
COMPARE_DEFAULTS = {"output_dir": os.path.join("outputs", "fused-wce-compare"), "max_steps": 60,
                    "logging_steps": 10, "warmup_steps": 5, "save_strategy": "no"}


@dataclass
class CompareArguments:
    """Flags of ``fused-wce compare`` beyond ``trl sft``'s."""

    schemes: str = field(default=",".join(SCHEMES), metadata={
        "help": f"Comma-separated weightings to train and compare, among {', '.join(SCHEMES)}."})
    seeds: str | None = field(default=None, metadata={
        "help": "Comma-separated seeds, e.g. 0,1,2: every scheme is trained once per seed (data order, and the "
                "initial weights of the demo model). Default: --seed alone."})
    last_n: int = field(default=2, metadata={"help": "N of the last_n scheme (the last N assistant turns)."})
    decay: float = field(default=0.5, metadata={"help": "Factor of the decay scheme (turn k before the last: decay**k)."})
    role_weights: str = field(default="assistant=1,user=0.3,tool=0.3", metadata={
        "help": "Per-role weights of the per_role scheme."})
    adaptive: str = field(default="turn", metadata={
        "help": 'Groups of the adaptive scheme: "turn" or "role" (default EMA 0.9, power 1, multipliers in '
                "[0.25, 4])."})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "A local messages .jsonl to measure as held out. Default: the shipped held-out conversations "
                "without --dataset_name, else --holdout_size conversations split off it."})
    holdout_size: int | None = field(default=None, metadata={
        "help": "Held-out conversations measured: the first N of the held-out file (default: all), or N split off "
                "--dataset_name (default 32)."})
    answers: str = field(default="all", metadata={
        "help": "Greedy replies scored against the data's `expected` facts: on all such messages, only on those "
                "labelled needs_history, or none (replies are the slow part of a measurement).",
        "choices": list(ANSWERS)})
    max_new_tokens: int = field(default=EvaluationOptions.max_new_tokens, metadata={
        "help": "Longest greedy reply, in tokens."})
    save_models: bool = field(default=False, metadata={
        "help": "Save each trained model (final weights and tokenizer, no optimizer state) in <scheme>/seed_<s>."})


# A bare run (the tiny demo model): 32 held-out conversations measured, replies scored where the history is needed.
COMPARE_DEMO_DEFAULTS = {"holdout_size": 32, "answers": "needs_history"}


def parse_compare_args(argv: list[str]):
    """(script, training, model, dataset, :class:`CompareArguments`) of ``fused-wce compare``."""
    return parse_args(argv, prog=PROG, first=CompareArguments, extra_defaults=COMPARE_DEFAULTS,
                      demo_defaults=COMPARE_DEMO_DEFAULTS, description=DESCRIPTION)


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


def parse_seeds(text: str | None, default: int) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (``None``: ``[default]``); ValueError naming ``--seeds``."""
    if text is None:
        return [default]
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct comma-separated integers, got {text!r}")
    return seeds


def compare_data(script_args, dataset_args, compare_args, split_seed: int):
    """(training dataset, held-out conversations): the shipped pair, or ``--dataset_name`` with ``--eval_dataset``
    or a split; :class:`UsageError` on bad data."""
    from ..chat_data import load_jsonl_dataset
    from ..history_data import HELDOUT_PATH, TRAIN_PATH

    size = compare_args.holdout_size
    if size is not None and size <= 0:
        raise UsageError("--holdout_size must be > 0: compare measures on held-out conversations")
    if script_args.dataset_name is None and not dataset_args.datasets:
        train = load_jsonl_dataset(TRAIN_PATH)
        return train, load_conversations(compare_args.eval_dataset or HELDOUT_PATH, size)
    if compare_args.eval_dataset is not None:
        train, _ = prepare_data(script_args, dataset_args, TurnWeighting(), 0, split_seed)
        return train, load_conversations(compare_args.eval_dataset, size)
    train, holdout = prepare_data(script_args, dataset_args, TurnWeighting(), size or 32, split_seed)
    if holdout is None or "messages" not in holdout.column_names:
        raise UsageError("compare needs conversations (a `messages` column) and enough of them to hold some out")
    return train, [list(messages) for messages in holdout["messages"]]


@dataclass
class Runs:
    """Everything measured: ``{model: [Measurements per seed]}`` (the initial model first), seconds of training
    per ``(scheme, seed)``, logged training curves per ``(scheme, seed)``."""

    measured: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    initial: dict = field(default_factory=dict)  # parameter fingerprint -> Measurements of that initial model
    start: dict = field(default_factory=dict)  # seed -> parameter fingerprint of its initial model


def main_compare(argv: list[str]) -> int:
    script_args, training_args, model_args, dataset_args, compare_args = parse_compare_args(argv)
    try:
        schemes = scheme_weightings(compare_args)
        seeds = parse_seeds(compare_args.seeds, training_args.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    train_dataset, conversations = compare_data(script_args, dataset_args, compare_args, seeds[0])
    options = EvaluationOptions(max_length=training_args.max_length, answers=compare_args.answers,
                                max_new_tokens=compare_args.max_new_tokens)
    one_cpu_thread(training_args.use_cpu)
    started = time.perf_counter()
    print(f"[fused-wce] compare: {len(schemes)} schemes ({', '.join(schemes)}) x {len(seeds)} seeds, "
          f"{len(train_dataset)} training conversations, {len(conversations)} held out", flush=True)
    runs = Runs(measured={BEFORE: []} | {name: [] for name in schemes})
    for seed in seeds:
        for name, weighting in schemes.items():
            _train_and_measure(name, weighting, seed, training_args, model_args, compare_args, train_dataset,
                               conversations, options, runs)
    command = " ".join([PROG] + [shlex.quote(arg) for arg in argv])
    setup = _setup_lines(command, script_args, training_args, model_args, compare_args, seeds, len(train_dataset),
                         len(conversations), time.perf_counter() - started)
    counts = resample_counts(len(conversations))
    report, differences = format_report(runs.measured, counts, setup, schemes, runs, seeds)
    output_dir = training_args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(report)
    write_results(runs.measured, seeds, counts, differences, output_dir)
    plot(runs.measured, counts, runs.curves, os.path.join(output_dir, "compare.png"))
    print("\n" + report, flush=True)
    print(f"[fused-wce] wrote {output_dir}/report.md, results.csv, differences.csv, compare.png and "
          "<scheme>/seed_<s>/loss_curves.*", flush=True)
    return 0


def _parameter_fingerprint(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _train_and_measure(name, weighting, seed, training_args, model_args, compare_args, train_dataset,
                       conversations, options, runs: Runs) -> None:
    """Train scheme ``name`` with ``seed`` and measure it (and its initial model, the first time those weights
    are seen); every scheme of a seed must start from the same weights."""
    from ..trainer.curves import LossCurvesCallback

    with checkpointing_alias_notice_silenced():
        args = dataclasses.replace(training_args, seed=seed, run_name=f"{name}-seed{seed}",
                                   output_dir=os.path.join(training_args.output_dir, name, f"seed_{seed}"))
    model, tokenizer = build_model(model_args, args)
    curve_callback = LossCurvesCallback()
    trainer = make_trainer(model, tokenizer, args, model_args, train_dataset, None, weighting, curves=False,
                           print_stages=False)
    trainer.add_callback(curve_callback)
    fingerprint = _parameter_fingerprint(unwrap_model(trainer))
    if runs.start.setdefault(seed, fingerprint) != fingerprint:
        raise RuntimeError(f"scheme {name!r} starts from other initial weights than the first scheme of seed {seed}")
    if fingerprint not in runs.initial:
        runs.initial[fingerprint] = measure_model(unwrap_model(trainer), tokenizer, conversations, options,
                                                  f"{BEFORE} (seed {seed})")
        runs.measured[BEFORE].append(runs.initial[fingerprint])
    tick = time.perf_counter()
    trainer.train()
    runs.seconds[(name, seed)] = time.perf_counter() - tick
    runs.curves[(name, seed)] = curve_callback.rows
    if compare_args.save_models:
        trainer.save_model(args.output_dir)
    measured = measure_model(unwrap_model(trainer), tokenizer, conversations, options, f"{name} (seed {seed})")
    runs.measured[name].append(measured)
    print(f"[fused-wce] {name:<10} seed {seed}: {trainer.state.global_step} steps in "
          f"{runs.seconds[(name, seed)]:5.1f} s; held-out assistant loss "
          f"{runs.initial[fingerprint].value('loss', 'role/assistant'):.3f} -> "
          f"{measured.value('loss', 'role/assistant'):.3f}", flush=True)


def _setup_lines(command, script_args, training_args, model_args, compare_args, seeds, n_train: int,
                 n_held_out: int, seconds: float) -> list[str]:
    """The report's setup section: command, model and data, training, total time and machine."""
    import torch

    model_name = model_args.model_name_or_path or "tiny Llama from a config (hidden 128, 2 layers), shipped tokenizer"
    steps = training_args.max_steps > 0
    held_out = compare_args.eval_dataset or ("history_heldout.jsonl" if script_args.dataset_name is None else
                                             "split off the training data")
    threads = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return [
        f"- command: `{command}`",
        f"- model: {model_name}; training data: {script_args.dataset_name or 'history_train.jsonl'} "
        f"({n_train} conversations); held out: {held_out} ({n_held_out} conversations); seeds "
        + ", ".join(str(seed) for seed in seeds),
        f"- training: {training_args.max_steps if steps else training_args.num_train_epochs} "
        f"{'steps' if steps else 'epochs'}, batch {training_args.per_device_train_batch_size}, "
        f"learning rate {training_args.learning_rate:g} "
        f"({getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)}), max length "
        f"{training_args.max_length}, the same for every scheme",
        f"- total time {seconds:.0f} s (training, measurements) on "
        f"{'CUDA' if torch.cuda.is_available() else threads}",
    ]
