"""Per-stage loss curves of a training run, saved as CSV and PNG in the output directory.

:class:`LossCurvesCallback` records every log of a :class:`~.sft_trainer.WeightedSFTTrainer` (train and eval) and
writes, on every checkpoint save and at the end of training (main process only):

* ``loss_curves.csv``: one row per log, the columns of :data:`CURVE_COLUMNS` in that order whatever was logged
  (an empty cell where a value was not logged, e.g. a role that carries no weight), so files of different runs
  line up. ``split`` is ``train`` or ``eval``; eval values are stored without their ``eval_`` prefix.
* ``loss_curves.png``: the total loss (train and eval), the loss per role, per turn index (``turn_1``, ...,
  ``turn_5+``: the k-th message of its role), per turn position (first/middle/last/only) and, with adaptive
  weighting, the multipliers per group, each against the optimizer step.

``fused-wce sft`` installs it; with the trainer directly: ``WeightedSFTTrainer(..., callbacks=[LossCurvesCallback()])``.
"""
from __future__ import annotations

import csv
import math
import os

from transformers import TrainerCallback

from ..token_codes import role_names
from .metrics import ROLE_GROUPS, TURN_INDEX_GROUPS, TURN_POSITION_GROUPS

CSV_NAME = "loss_curves.csv"
PNG_NAME = "loss_curves.png"
CURVE_COLUMNS: tuple[str, ...] = (
    ("step", "epoch", "split", "loss", "mean_token_accuracy", "entropy", "learning_rate", "grad_norm")
    + tuple(f"loss/{name}" for name in ROLE_GROUPS)
    + tuple(f"loss/{name}" for name in TURN_INDEX_GROUPS)
    + tuple(f"loss/{name}" for name in TURN_POSITION_GROUPS)
    + tuple(f"weight/{name}" for name in TURN_INDEX_GROUPS + role_names())
)
_VALUE_COLUMNS = CURVE_COLUMNS[3:]


def curve_row(step: int, epoch: float | None, logs: dict) -> dict | None:
    """The CSV row of one ``Trainer.log`` dict (``None`` for logs without a loss, e.g. the run summary)."""
    if "eval_loss" in logs:
        split, prefix = "eval", "eval_"
    elif "loss" in logs:
        split, prefix = "train", ""
    else:
        return None
    row = {"step": step, "epoch": epoch, "split": split}
    for column in _VALUE_COLUMNS:
        value = logs.get(prefix + column)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[column] = float(value)
    return row


def write_curves_csv(rows: list[dict], path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CURVE_COLUMNS), restval="", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                             for key, value in row.items() if value is not None})


def read_curves_csv(path) -> list[dict]:
    """The rows of a ``loss_curves.csv``: floats for value columns (missing ones absent), ``step`` an int."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            row = {"step": int(raw["step"]), "split": raw["split"],
                   "epoch": float(raw["epoch"]) if raw["epoch"] else None}
            row.update({column: float(raw[column]) for column in _VALUE_COLUMNS if raw.get(column)})
            rows.append(row)
    return rows


def plot_curves(rows: list[dict], path, title: str | None = None) -> None:
    """Write the PNG of :func:`read_curves_csv`-style rows (matplotlib, Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", [("loss", "train loss")]),
              ("per role", [(f"loss/{name}", name) for name in ROLE_GROUPS]),
              ("per turn index (k-th message of its role)", [(f"loss/{name}", name) for name in TURN_INDEX_GROUPS]),
              ("per turn position (within its role)", [(f"loss/{name}", name) for name in TURN_POSITION_GROUPS])]
    weights = [(f"weight/{name}", name) for name in TURN_INDEX_GROUPS + role_names()]
    if any(column in row for row in rows for column, _ in weights):
        panels.append(("adaptive multipliers", weights))
    columns = 3
    rows_of_panels = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows_of_panels, columns, figsize=(4.6 * columns, 3.6 * rows_of_panels),
                                squeeze=False)
    flat = [axis for line in axes for axis in line]
    for axis, (name, series) in zip(flat, panels):
        for index, (column, label) in enumerate(series):  # one colour per series; eval dashed in the same colour
            for split, style in (("train", "-"), ("eval", "--")):
                points = [(row["step"], row[column]) for row in rows
                          if row["split"] == split and column in row and math.isfinite(row[column])]
                if points:
                    xs, ys = zip(*points)
                    axis.plot(xs, ys, style, color=f"C{index % 10}", marker="o" if len(points) < 3 else None,
                              markersize=3, label=label if split == "train" else f"{label} (eval)")
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7, ncol=2 if len(axis.lines) > 6 else 1)
    for axis in flat[len(panels):]:
        axis.set_visible(False)
    axes[0][0].set_ylabel("mean cross-entropy (nats)")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


class LossCurvesCallback(TrainerCallback):
    """Records the logged losses; writes ``loss_curves.csv`` and ``loss_curves.png`` into ``args.output_dir``
    on each save and at the end of training (main process only). ``plot=False`` writes the CSV only."""

    def __init__(self, plot: bool = True):
        self.plot = plot
        self.rows: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run: start from the rows logged before the checkpoint, so the files cover the whole run.
        self.rows = [row for row in (curve_row(entry.get("step", 0), entry.get("epoch"), entry)
                                     for entry in state.log_history) if row is not None]

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = curve_row(state.global_step, state.epoch, logs or {})
        if row is not None:
            self.rows.append(row)

    def on_save(self, args, state, control, **kwargs):
        self.write(args.output_dir, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.write(args.output_dir, state)

    def write(self, output_dir, state=None) -> tuple[str, str | None]:
        """Write the files now; returns their paths (PNG ``None`` when not plotted)."""
        if state is not None and not state.is_world_process_zero:
            return "", None
        os.makedirs(output_dir, exist_ok=True)
        csv_path = os.path.join(output_dir, CSV_NAME)
        write_curves_csv(self.rows, csv_path)
        png_path = None
        if self.plot and self.rows:
            png_path = os.path.join(output_dir, PNG_NAME)
            plot_curves(self.rows, png_path, title=os.path.basename(os.path.normpath(output_dir)))
        return csv_path, png_path
