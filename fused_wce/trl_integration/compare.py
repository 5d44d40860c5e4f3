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
``results.csv`` (long format, stable columns :data:`RESULT_COLUMNS`), ``compare.png`` (loss and context dependence
per turn index, training curves) and, per scheme, ``<scheme>/loss_curves.csv|png``. Models are not saved.
"""
from __future__ import annotations

import csv
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

from .adaptive import DEFAULT_MAX_TURN_INDEX, turn_index_names
from .cli import UsageError, _describe, _unwrap, build_model, make_trainer, parse_args, prepare_data

SCHEMES = ("full", "assistant", "last_n", "decay", "per_role", "adaptive")
ROLES = ("system", "user", "assistant", "tool")
TURNS = turn_index_names(DEFAULT_MAX_TURN_INDEX)
RESULT_COLUMNS = ("scheme", "stage", "metric", "group", "value", "tokens", "messages")
BEFORE = "initial model"

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


def scheme_weightings(args: CompareArguments) -> dict:
    """``{scheme: TurnWeighting}`` for ``args.schemes``; ValueError naming the flag on a bad value."""
    from .adaptive import AdaptiveTurnWeights
    from .weighting import TurnWeighting

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


# --------------------------------------------------------------------------------------------- measurements
class _Sums:
    """Per-group sums of token losses, token counts and message counts."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, group: str, loss_sum: float, tokens: int, messages: int = 0):
        entry = self.values.setdefault(group, [0.0, 0, 0])
        entry[0] += loss_sum
        entry[1] += tokens
        entry[2] += messages

    def mean(self, group: str) -> float:
        total, tokens, _ = self.values.get(group, (0.0, 0, 0))
        return total / tokens if tokens else math.nan


def _token_losses(model, input_ids: list[int]):
    """Float64 ``[T]`` list: entry ``t`` is the cross-entropy of token ``t`` given tokens ``< t`` (entry 0 nan).

    The model's own forward (its logits, with whatever softcap or scale it applies): exact for any causal LM.
    """
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").double().tolist()
    return [math.nan] + losses


def _assistant_tokens(encoded, ordinal: int, limit: int) -> list[int]:
    """Positions (1 <= t < limit) of the tokens of the ``ordinal``-th assistant message."""
    assistant = 2  # ROLE_CODES["assistant"]
    return [t for t in range(1, limit)
            if encoded["token_roles"][t] == assistant and encoded["token_turn_index"][t] == ordinal]


def measure(model, tokenizer, conversations, max_length: int | None) -> dict:
    """Held-out losses and context dependence of ``model`` (see the module docstring).

    Returns ``{"loss": _Sums over "role/<r>", "turn/<turn_k>" (assistant turns), "full_sequence"}`` and
    ``{"context_full": _Sums, "context_no_history": _Sums}`` over "turn/<turn_k>" (same tokens in both).
    """
    import torch

    from .weighting import TurnWeighting, tokenize_with_weights

    every_message = TurnWeighting(full_sequence=True)  # weight 0 only on messages the data marks "weight": 0
    losses, with_history, without_history = _Sums(), _Sums(), _Sums()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for messages in conversations:
            messages = [dict(m) for m in messages]
            encoded = tokenize_with_weights(tokenizer, messages, every_message)
            limit = min(len(encoded["input_ids"]), max_length or len(encoded["input_ids"]))
            if limit < 2:
                continue
            token_loss = _token_losses(model, encoded["input_ids"][:limit])
            for t in range(1, limit):
                if encoded["token_weights"][t] <= 0:
                    continue
                losses.add("full_sequence", token_loss[t], 1)
                role = encoded["token_roles"][t]
                if role >= 0:
                    losses.add(f"role/{ROLES[role]}", token_loss[t], 1)
                    if ROLES[role] == "assistant":
                        turn = TURNS[min(encoded["token_turn_index"][t], len(TURNS) - 1)]
                        losses.add(f"turn/{turn}", token_loss[t], 1)

            ordinal = -1
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                ordinal += 1
                weight = message.get("weight")
                if weight is not None and weight <= 0:
                    continue
                users = [j for j in range(i) if messages[j]["role"] == "user"]
                if not users:
                    continue
                start = users[-1]
                first = 1 if messages[0]["role"] == "system" else 0
                if start <= first:  # nothing before the current exchange: no history to remove
                    continue
                full_tokens = _assistant_tokens(encoded, ordinal, len(encoded["input_ids"]))
                if not full_tokens or full_tokens[-1] >= limit:
                    continue  # (partly) cut off by max_length
                local = messages[:first] + messages[start:i + 1]
                local_encoded = tokenize_with_weights(tokenizer, local, every_message)
                local_ordinal = sum(m["role"] == "assistant" for m in local) - 1
                local_tokens = _assistant_tokens(local_encoded, local_ordinal, len(local_encoded["input_ids"]))
                if not local_tokens:
                    continue
                local_loss = _token_losses(model, local_encoded["input_ids"])
                full_mean = sum(token_loss[t] for t in full_tokens) / len(full_tokens)
                local_mean = sum(local_loss[t] for t in local_tokens) / len(local_tokens)
                turn = f"turn/{TURNS[min(ordinal, len(TURNS) - 1)]}"
                # Weighted by the message's token count, so each token of these turns counts once in both.
                with_history.add(turn, full_mean * len(full_tokens), len(full_tokens), 1)
                without_history.add(turn, local_mean * len(full_tokens), len(full_tokens), 1)
    model.train(was_training)
    return {"loss": losses, "context_full": with_history, "context_no_history": without_history}


def result_rows(scheme: str, stage: str, measured: dict) -> list[dict]:
    """The ``results.csv`` rows of one measurement."""
    rows = []
    groups = [f"role/{r}" for r in ROLES] + [f"turn/{t}" for t in TURNS] + ["full_sequence"]
    for group in groups:
        total, tokens, _ = measured["loss"].values.get(group, (0.0, 0, 0))
        if tokens:
            rows.append(dict(scheme=scheme, stage=stage, metric="loss", group=group, value=total / tokens,
                             tokens=tokens, messages=""))
    for turn in TURNS:
        group = f"turn/{turn}"
        full, local = measured["context_full"], measured["context_no_history"]
        if group not in full.values:
            continue
        _, tokens, messages = full.values[group]
        for metric, value in (("loss_with_history", full.mean(group)), ("loss_without_history", local.mean(group)),
                              ("context_dependence", local.mean(group) - full.mean(group))):
            rows.append(dict(scheme=scheme, stage=stage, metric=metric, group=group, value=value, tokens=tokens,
                             messages=messages))
    return rows


def _value(rows, scheme, metric, group):
    for row in rows:
        if row["scheme"] == scheme and row["metric"] == metric and row["group"] == group:
            return row["value"]
    return math.nan


# -------------------------------------------------------------------------------------------------- report
def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _cell(value: float, reference: float | None = None) -> str:
    if not math.isfinite(value):
        return "-"
    if reference is None or not math.isfinite(reference):
        return f"{value:.3f}"
    return f"{value:.3f} ({value - reference:+.2f})"


def _final_multipliers(curve_rows: list[dict]) -> str:
    """``turn_1 0.98, turn_2 1.03, ...`` from the last training log with adaptive multipliers ('' if none)."""
    for row in reversed(curve_rows or []):
        weights = [(key[len("weight/"):], value) for key, value in row.items() if key.startswith("weight/")]
        if row["split"] == "train" and weights:
            return ", ".join(f"{name} {value:.2f}" for name, value in weights)
    return ""


def format_report(rows: list[dict], setup: list[str], schemes: dict, timings: dict, curves: dict | None = None) -> str:
    """The Markdown report: setup, held-out loss per assistant turn, per role, context dependence per turn."""
    names = [BEFORE] + list(schemes)
    turn_groups = [f"turn/{t}" for t in TURNS]
    role_groups = [f"role/{r}" for r in ROLES] + ["full_sequence"]
    present = {row["group"] for row in rows if row["metric"] == "loss"}
    role_groups = [g for g in role_groups if g in present]

    def label(name):
        return name

    loss_rows = [[label(name)] + [_cell(_value(rows, name, "loss", g),
                                        None if name == BEFORE else _value(rows, BEFORE, "loss", g))
                                  for g in turn_groups + ["role/assistant"]] for name in names]
    role_rows = [[label(name)] + [_cell(_value(rows, name, "loss", g)) for g in role_groups] for name in names]
    context_groups = [g for g in turn_groups
                      if any(row["group"] == g and row["metric"] == "context_dependence" for row in rows)]
    counts = {g: next((row["messages"] for row in rows if row["group"] == g and row["metric"] == "context_dependence"),
                      0) for g in context_groups}
    context_rows = [[label(name)] + [_cell(_value(rows, name, "context_dependence", g)) for g in context_groups]
                    for name in names]
    timing = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
    return "\n".join([
        "# fused-wce compare", "",
        *setup, f"- training time per scheme: {timing}", "",
        "Schemes (each keeps the data's per-message `weight` keys):", "",
        *[f"- `{name}`: {_describe(weighting)}"
          + (f"; multipliers at the end: {final}" if (final := _final_multipliers((curves or {}).get(name))) else "")
          for name, weighting in schemes.items()], "",
        "## Held-out loss per assistant turn (after training; change from the initial model in brackets)", "",
        "Mean cross-entropy (nats) of the tokens of the k-th assistant message of each held-out conversation "
        "(messages marked `weight: 0` left out); lower is better.", "",
        _table(["scheme"] + [g.split("/")[1] for g in turn_groups] + ["all assistant"], loss_rows), "",
        "## Held-out loss per role", "",
        _table(["scheme"] + [g.split("/")[-1] for g in role_groups], role_rows), "",
        "## Context dependence per assistant turn", "",
        "Loss of the turn without the history (system prompt + current exchange only) minus with the full history; "
        "higher means the model uses the earlier turns. Messages measured per turn: "
        + ", ".join(f"{g.split('/')[1]} {counts[g]}" for g in context_groups) + ".", "",
        _table(["scheme"] + [g.split("/")[1] for g in context_groups], context_rows), "",
        "Per-scheme training curves: `<scheme>/loss_curves.csv` and `<scheme>/loss_curves.png`; all numbers: "
        "`results.csv`; plots: `compare.png`.", "",
    ])


def write_csv(rows: list[dict], path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(RESULT_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})


def plot(rows: list[dict], schemes: list[str], curves: dict, path) -> None:
    """``compare.png``: held-out assistant loss per turn, context dependence per turn, training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = list(range(1, len(TURNS) + 1))
    for index, name in enumerate([BEFORE] + schemes):
        style = dict(color="black", linestyle="--") if name == BEFORE else dict(color=f"C{index % 10}")
        for axis, metric in ((axes[0], "loss"), (axes[1], "context_dependence")):
            ys = [_value(rows, name, metric, f"turn/{t}") for t in TURNS]
            if any(math.isfinite(y) for y in ys):
                axis.plot(x, ys, marker="o", label=name, **style)
        if name in curves:
            points = [(row["step"], row["loss/assistant"]) for row in curves[name]
                      if row["split"] == "train" and "loss/assistant" in row]
            if points:
                axes[2].plot(*zip(*points), label=name, **style)
    titles = ("held-out loss per assistant turn", "context dependence (loss without - with history)",
              "training: assistant-token loss")
    for axis, title in zip(axes, titles):
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in axes[:2]:
        axis.set_xticks(x, TURNS)
        axis.set_xlabel("assistant turn")
    axes[1].axhline(0.0, color="gray", linewidth=0.8)
    axes[0].set_ylabel("cross-entropy (nats)")
    axes[2].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------- main
def _parameter_fingerprint(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def main_compare(argv: list[str]) -> int:
    import dataclasses
    import warnings

    from .curves import LossCurvesCallback
    from .weighting import TurnWeighting

    script_args, training_args, model_args, dataset_args, compare_args = parse_args(
        argv, prog="fused-wce compare", first=CompareArguments,
        extra_defaults={"output_dir": os.path.join("outputs", "fused-wce-compare")},
        demo_defaults=COMPARE_DEMO_DEFAULTS)
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
            args = dataclasses.replace(training_args, output_dir=os.path.join(output_dir, name), run_name=name)
        model, tokenizer = build_model(model_args, args)
        curve_callback = LossCurvesCallback()
        trainer = make_trainer(model, tokenizer, args, model_args, train_dataset, None, weighting, curves=False,
                               print_stages=False)
        trainer.add_callback(curve_callback)
        model = _unwrap(trainer)
        fingerprints[name] = _parameter_fingerprint(model)
        if not rows:  # every scheme starts from these weights (checked below): measure them once
            rows += result_rows(BEFORE, "before", measure(model, tokenizer, conversations, args.max_length))
        elif fingerprints[name] != next(iter(fingerprints.values())):
            raise RuntimeError(f"scheme {name!r} starts from other initial weights than {next(iter(fingerprints))!r}")
        tick = time.perf_counter()
        trainer.train()
        timings[name] = time.perf_counter() - tick
        curves[name] = curve_callback.rows
        measured = measure(_unwrap(trainer), tokenizer, conversations, args.max_length)
        rows += result_rows(name, "after", measured)
        final = [row for row in curve_callback.rows if row["split"] == "train"]
        print(f"[fused-wce] {name:<10} {trainer.state.global_step} steps in {timings[name]:5.1f} s; held-out "
              f"assistant loss {_value(rows, BEFORE, 'loss', 'role/assistant'):.3f} -> "
              f"{measured['loss'].mean('role/assistant'):.3f}"
              + (f"; last logged train loss {final[-1]['loss']:.3f}" if final else ""), flush=True)
        del trainer, model

    command = "fused-wce compare" + ("" if not argv else " " + " ".join(shlex.quote(arg) for arg in argv))
    model_name = model_args.model_name_or_path or "tiny Llama from a config (hidden 128, 2 layers), shipped tokenizer"
    setup = [
        f"- command: `{command}`",
        f"- model: {model_name}; data: {script_args.dataset_name or 'the shipped conversations'} "
        f"({len(train_dataset)} for training, {len(conversations)} held out); seed {training_args.seed}",
        f"- training: {training_args.max_steps if training_args.max_steps > 0 else training_args.num_train_epochs} "
        f"{'steps' if training_args.max_steps > 0 else 'epochs'}, batch {training_args.per_device_train_batch_size}, "
        f"learning rate {training_args.learning_rate:g} "
        f"({getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)}), "
        "the same for every scheme",
        f"- total time {time.perf_counter() - started:.1f} s (training, measurements, report) on "
        f"{'CUDA' if _cuda() else f'CPU ({os.cpu_count()} cores)'}",
    ]
    report = format_report(rows, setup, schemes, timings, curves)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(report)
    write_csv(rows, os.path.join(output_dir, "results.csv"))
    plot(rows, list(schemes), curves, os.path.join(output_dir, "compare.png"))
    print("\n" + report, flush=True)
    print(f"[fused-wce] wrote {output_dir}/report.md, results.csv, compare.png and <scheme>/loss_curves.*",
          flush=True)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":  # python -m fused_wce.trl_integration.compare
    from .cli import main

    raise SystemExit(main(["compare", *sys.argv[1:]]))
