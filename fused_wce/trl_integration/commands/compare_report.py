"""The outputs of ``fused-wce compare``: ``report.md`` (setup, findings in words, tables), ``results.csv``,
``differences.csv`` and ``compare.png``."""
from __future__ import annotations

import math
import os

from ..evaluation.intervals import estimate
from ..evaluation.measure import TURNS
from ..evaluation.report import comparison_findings, history_findings, noise_note, tables
from ..evaluation.results import DIFFERENCE_COLUMNS, RESULT_COLUMNS, result_rows, write_csv

BEFORE = "initial model"


def _final_multipliers(curve_rows: list[dict]) -> str:
    """``turn_1 0.98, turn_2 1.03, ...`` from the last training log with adaptive multipliers ('' if none)."""
    for row in reversed(curve_rows or []):
        weights = [(key[len("weight/"):], value) for key, value in row.items() if key.startswith("weight/")]
        if row["split"] == "train" and weights:
            return ", ".join(f"{name} {value:.2f}" for name, value in weights)
    return ""


def _scheme_lines(schemes: dict, runs, seeds: list[int]) -> list[str]:
    lines = []
    for name, weighting in schemes.items():
        seconds = [runs.seconds[(name, seed)] for seed in seeds]
        final = _final_multipliers(runs.curves.get((name, seeds[-1])))
        lines.append(f"- `{name}`: {weighting.describe()}; training {sum(seconds) / len(seconds):.0f} s per seed"
                     + (f"; multipliers at the end (seed {seeds[-1]}): {final}" if final else ""))
    return lines


def format_report(measured: dict, counts, setup: list[str], schemes: dict, runs, seeds: list[int]):
    """(the Markdown report, the ``differences.csv`` rows). ``measured``: ``{model: [Measurements per seed]}``,
    the initial model first."""
    differences, difference_rows = comparison_findings(measured, counts)
    uses_history = [line for name, model_runs in measured.items()
                    for line in history_findings(name, model_runs, counts)]
    text = "\n".join([
        "# fused-wce compare", "", *setup, "",
        "Schemes (each keeps the data's per-message `weight` keys):", "", *_scheme_lines(schemes, runs, seeds), "",
        "## Findings", "", noise_note(len(seeds), counts.shape[1]), "",
        *(["### Does each model use the history?", "", *uses_history, ""] if uses_history else []),
        "### Differences between models (later minus earlier, key cells)", "", *differences, "",
        *tables(measured, counts),
        "All cells, per seed too: `results.csv`; every difference above: `differences.csv`; training curves: "
        "`<scheme>/seed_<s>/loss_curves.csv|png`; plots: `compare.png`.", "",
    ])
    return text, difference_rows


def write_results(measured: dict, seeds: list[int], counts, difference_rows: list[dict], output_dir) -> None:
    """``results.csv`` (every model, seed and cell) and ``differences.csv``."""
    rows = []
    for name, model_runs in measured.items():
        labels = seeds if len(model_runs) == len(seeds) else ["all"] * len(model_runs)
        rows += result_rows(name, "before" if name == BEFORE else "after", dict(zip(labels, model_runs)), counts)
    write_csv(rows, RESULT_COLUMNS, os.path.join(output_dir, "results.csv"))
    write_csv(difference_rows, DIFFERENCE_COLUMNS, os.path.join(output_dir, "differences.csv"))


def plot(measured: dict, counts, curves: dict, path) -> None:
    """``compare.png``: held-out loss and context dependence per assistant turn (mean over seeds, 95% intervals)
    and the training curves of the assistant-token loss (every seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = list(range(1, len(TURNS) + 1))
    for index, (name, model_runs) in enumerate(measured.items()):
        style = dict(color="black", linestyle="--") if name == BEFORE else dict(color=f"C{index % 10}")
        for axis, metric in ((axes[0], "loss"), (axes[1], "context_dependence")):
            cells = [estimate(model_runs, metric, f"turn/{turn}", counts) for turn in TURNS]
            if any(math.isfinite(cell.value) for cell in cells):
                errors = [[max(c.value - c.low, 0) for c in cells], [max(c.high - c.value, 0) for c in cells]]
                axis.errorbar(x, [c.value for c in cells], yerr=errors, marker="o", capsize=3, label=name, **style)
        for (scheme, seed), rows in curves.items():
            points = [(row["step"], row["loss/assistant"]) for row in rows
                      if scheme == name and row["split"] == "train" and "loss/assistant" in row]
            if points:
                axes[2].plot(*zip(*points), label=f"{name} seed {seed}", **style)
    titles = ("held-out loss per assistant turn", "context dependence (loss without - with history)",
              "training: assistant-token loss")
    for axis, title in zip(axes, titles):
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
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
