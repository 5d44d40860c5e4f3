"""The long-format tables of an evaluation: ``results.csv`` (one row per model, seed, metric and group) and
``differences.csv`` (paired differences between models, :mod:`.intervals`)."""
from __future__ import annotations

import csv

from .intervals import estimate

RESULT_COLUMNS = ("model", "stage", "seed", "metric", "group", "value", "ci_low", "ci_high", "count", "messages")
DIFFERENCE_COLUMNS = ("model", "baseline", "metric", "group", "difference", "ci_low", "ci_high", "per_seed",
                      "outside_noise")
MEAN = "mean"


def result_rows(model: str, stage: str, runs: dict, counts) -> list[dict]:
    """Rows of one model measured once per seed (``runs``: ``{seed: Measurements}``): per cell, the mean over seeds
    with its bootstrap interval (``seed`` = ``mean``), then (with several seeds) each seed's value and interval.
    ``count`` is the cell's tokens (losses) or replies (answers) per run; ``messages`` its messages."""
    seeds = list(runs)
    keys = sorted({key for run in runs.values() for key in run.keys()})
    rows = []
    for metric, group in keys:
        count, messages = runs[seeds[0]].total(metric, group)
        labelled = [(MEAN, list(runs.values()))] + ([(seed, [runs[seed]]) for seed in seeds] if len(seeds) > 1 else [])
        for seed, selected in labelled:
            cell = estimate(selected, metric, group, counts)
            rows.append(dict(model=model, stage=stage, seed=seed, metric=metric, group=group, value=cell.value,
                             ci_low=cell.low, ci_high=cell.high, count=count, messages=messages))
    return rows


def difference_row(model: str, baseline: str, metric: str, group: str, cell) -> dict:
    """A ``differences.csv`` row: ``model`` minus ``baseline`` on one cell (an :class:`~.intervals.Estimate`)."""
    return dict(model=model, baseline=baseline, metric=metric, group=group, difference=cell.value, ci_low=cell.low,
                ci_high=cell.high, per_seed=" ".join(f"{x:.6g}" for x in cell.per_seed),
                outside_noise=cell.outside_noise)


def write_csv(rows: list[dict], columns, path) -> None:
    """``rows`` as CSV with ``columns`` (floats with 6 significant digits)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
