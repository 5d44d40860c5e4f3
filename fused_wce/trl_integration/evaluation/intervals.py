"""Means over seeds with bootstrap 95% intervals over held-out conversations, and paired differences.

A cell (a metric and group, e.g. the loss on ``history/needed`` turns) of one model measured with S seeds on the
same C held-out conversations: its value is the mean over seeds of each seed's statistic (a ratio of sums over the
conversations, :class:`~.measure.Measurements`). Its interval: the 2.5th and 97.5th percentiles of that mean over
resamples of the conversations (C drawn with replacement, the same draws for every seed and every model, so the
differences between models are paired). The interval covers which conversations were held out; how much the
result moves with the seed is shown by the per-seed values.

A difference between two cells is **outside the noise** when its 95% interval excludes 0 and every seed's
difference has the sign of the mean (with one seed, the interval alone decides).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def resample_counts(conversations: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, conversations]``: how often each conversation is drawn in each bootstrap resample."""
    if conversations < 1:
        raise ValueError(f"the bootstrap needs at least one conversation, got {conversations}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(conversations, np.full(conversations, 1.0 / conversations), size=resamples).astype(float)


@dataclass(frozen=True)
class Estimate:
    """``value`` (mean over seeds), its bootstrap interval ``[low, high]``, and each seed's value."""

    value: float
    low: float
    high: float
    per_seed: tuple[float, ...]

    @property
    def outside_noise(self) -> bool:
        """The interval excludes 0 and every seed has the sign of the mean (for differences)."""
        if not all(math.isfinite(x) for x in (self.value, self.low, self.high)) or self.value == 0:
            return False
        sign = math.copysign(1.0, self.value)
        return (self.low > 0 or self.high < 0) and all(x * sign > 0 for x in self.per_seed)


def _ratio(run, key, counts: np.ndarray | None = None):
    """The statistic of ``key`` in one run: over all conversations (a float) or per resample (an array)."""
    if key not in run.sums:
        return math.nan if counts is None else np.full(len(counts), math.nan)
    sums, totals = run.sums[key], run.counts[key]
    if counts is None:
        return float(sums.sum() / totals.sum()) if totals.sum() > 0 else math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts @ totals > 0, (counts @ sums) / (counts @ totals), math.nan)


def _check(runs, counts: np.ndarray) -> None:
    for run in runs:
        if run.conversations != counts.shape[1]:
            raise ValueError(f"measurements of {run.conversations} conversations cannot share resamples of "
                             f"{counts.shape[1]}: every run must measure the same held-out conversations")


def _interval(draws: np.ndarray) -> tuple[float, float]:
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def estimate(runs: list, metric: str, group: str, counts: np.ndarray) -> Estimate:
    """The cell ``(metric, group)`` of ``runs`` (one :class:`~.measure.Measurements` per seed)."""
    _check(runs, counts)
    key = (metric, group)
    per_seed = tuple(_ratio(run, key) for run in runs)
    draws = np.mean([_ratio(run, key, counts) for run in runs], axis=0)
    return Estimate(float(np.mean(per_seed)), *_interval(draws), per_seed=per_seed)


def _paired(a: list, b: list) -> list[tuple]:
    """Seed pairs: seed by seed, or one run (a model that no seed changes) against each run of the other."""
    if len(a) == len(b):
        return list(zip(a, b))
    if len(b) == 1:
        return [(run, b[0]) for run in a]
    if len(a) == 1:
        return [(a[0], run) for run in b]
    raise ValueError(f"cannot pair {len(a)} seeds with {len(b)} seeds")


def difference(a: list, key_a: tuple[str, str], b: list, key_b: tuple[str, str], counts: np.ndarray) -> Estimate:
    """Cell ``key_a`` (a ``(metric, group)``) of runs ``a`` minus cell ``key_b`` of runs ``b``, paired by seed and
    by conversation resample (``a is b`` compares two cells of one model)."""
    pairs = _paired(a, b)
    _check([run for pair in pairs for run in pair], counts)
    per_seed = tuple(_ratio(x, key_a) - _ratio(y, key_b) for x, y in pairs)
    draws = np.mean([_ratio(x, key_a, counts) - _ratio(y, key_b, counts) for x, y in pairs], axis=0)
    return Estimate(float(np.mean(per_seed)), *_interval(draws), per_seed=per_seed)
