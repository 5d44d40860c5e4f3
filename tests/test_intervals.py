"""Bootstrap intervals over conversations: against a brute-force bootstrap, pairing, the noise rule, coverage."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fused_wce.trl_integration.evaluation.intervals import (Estimate, difference, estimate, resample_counts)
from fused_wce.trl_integration.evaluation.measure import Measurements

KEY = ("loss", "g")


def _run(sums, counts) -> Measurements:
    sums, counts = np.asarray(sums, float), np.asarray(counts, float)
    return Measurements({KEY: sums}, {KEY: counts}, {KEY: np.ones_like(counts)}, conversations=len(sums))


def test_resample_counts():
    counts = resample_counts(7, resamples=50, seed=3)
    assert counts.shape == (50, 7) and (counts.sum(axis=1) == 7).all() and (counts >= 0).all()
    np.testing.assert_array_equal(counts, resample_counts(7, resamples=50, seed=3))
    with pytest.raises(ValueError, match="at least one conversation"):
        resample_counts(0)


def test_estimate_matches_a_brute_force_bootstrap():
    rng = np.random.default_rng(0)
    runs = [_run(rng.uniform(0, 30, 12), rng.integers(5, 20, 12)) for _ in range(3)]
    counts = resample_counts(12, resamples=400, seed=1)
    cell = estimate(runs, *KEY, counts)
    per_seed = [run.sums[KEY].sum() / run.counts[KEY].sum() for run in runs]
    assert cell.per_seed == pytest.approx(per_seed) and cell.value == pytest.approx(np.mean(per_seed))
    draws = []
    for weights in counts:  # each resample: every conversation repeated as often as drawn
        picked = np.repeat(np.arange(12), weights.astype(int))
        draws.append(np.mean([run.sums[KEY][picked].sum() / run.counts[KEY][picked].sum() for run in runs]))
    assert (cell.low, cell.high) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])))
    assert cell.low < cell.value < cell.high


def test_differences_are_paired():
    rng = np.random.default_rng(1)
    sums, counts = rng.uniform(0, 10, 20), rng.integers(1, 9, 20).astype(float)
    a = [_run(sums, counts)]
    shifted = [_run(sums + 0.5 * counts, counts)]  # every conversation's mean 0.5 higher
    resamples = resample_counts(20, resamples=300)
    same = difference(a, KEY, a, KEY, resamples)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and not same.outside_noise
    shift = difference(shifted, KEY, a, KEY, resamples)
    assert shift.value == pytest.approx(0.5) and shift.low == pytest.approx(0.5) and shift.high == pytest.approx(0.5)
    assert shift.outside_noise
    # An unpaired view of the same two runs has wide intervals: each alone varies far more than their difference.
    alone = estimate(a, *KEY, resamples)
    assert alone.high - alone.low > 0.5


def test_one_run_pairs_with_every_seed():
    base = [_run([1.0, 2.0, 3.0], [1, 1, 1])]
    seeds = [_run([2.0, 3.0, 4.0], [1, 1, 1]), _run([0.0, 1.5, 3.3], [1, 1, 1])]
    cell = difference(seeds, KEY, base, KEY, resample_counts(3, resamples=100))
    assert cell.per_seed == pytest.approx((1.0, -0.4))
    with pytest.raises(ValueError, match="cannot pair 2 seeds with 3"):
        difference(seeds, KEY, seeds + base, KEY, resample_counts(3))
    with pytest.raises(ValueError, match="same held-out conversations"):
        estimate([_run([1.0], [1])], *KEY, resample_counts(3))


@pytest.mark.parametrize("value, low, high, per_seed, outside", [
    (0.3, 0.1, 0.5, (0.2, 0.4), True),
    (0.3, 0.1, 0.5, (0.7, -0.1), False),  # the seeds disagree
    (0.3, -0.1, 0.5, (0.2, 0.4), False),  # the interval includes 0
    (-0.3, -0.5, -0.1, (-0.2,), True),
    (math.nan, math.nan, math.nan, (math.nan,), False),
])
def test_noise_rule(value, low, high, per_seed, outside):
    assert Estimate(value, low, high, per_seed).outside_noise is outside


def test_missing_cells_are_nan():
    run = _run([1.0, 2.0], [1, 1])
    cell = estimate([run], "loss", "absent", resample_counts(2, resamples=10))
    assert math.isnan(cell.value) and math.isnan(cell.low)


def test_coverage_of_the_95_percent_interval():
    """Conversations drawn from a known population: the interval holds the population's ratio about 95% of the
    time (percentile bootstrap of a ratio of sums, 60 conversations: a little under, as expected)."""
    rng = np.random.default_rng(2)
    truth, hits, trials = 2.0, 0, 300
    resamples = resample_counts(60, resamples=1000, seed=5)
    for _ in range(trials):
        tokens = rng.integers(3, 30, 60).astype(float)
        sums = rng.gamma(shape=tokens * 2.0, scale=truth / 2.0)  # mean truth per token, skewed
        cell = estimate([_run(sums, tokens)], *KEY, resamples)
        hits += cell.low <= truth <= cell.high
    assert 0.89 <= hits / trials <= 0.99
