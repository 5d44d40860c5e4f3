"""The report of ``fused-wce compare``: ``report.md`` (setup and tables), ``results.csv`` and ``compare.png``."""
from __future__ import annotations

import csv
import math

from .compare_measure import BEFORE, RESULT_COLUMNS, ROLES, TURNS, result_value


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

    loss_rows = [[name] + [_cell(result_value(rows, name, "loss", g),
                                        None if name == BEFORE else result_value(rows, BEFORE, "loss", g))
                                  for g in turn_groups + ["role/assistant"]] for name in names]
    role_rows = [[name] + [_cell(result_value(rows, name, "loss", g)) for g in role_groups] for name in names]
    context_groups = [g for g in turn_groups
                      if any(row["group"] == g and row["metric"] == "context_dependence" for row in rows)]
    counts = {g: next((row["messages"] for row in rows if row["group"] == g and row["metric"] == "context_dependence"),
                      0) for g in context_groups}
    context_rows = [[name] + [_cell(result_value(rows, name, "context_dependence", g)) for g in context_groups]
                    for name in names]
    timing = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
    return "\n".join([
        "# fused-wce compare", "",
        *setup, f"- training time per scheme: {timing}", "",
        "Schemes (each keeps the data's per-message `weight` keys):", "",
        *[f"- `{name}`: {weighting.describe()}"
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
            ys = [result_value(rows, name, metric, f"turn/{t}") for t in TURNS]
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
