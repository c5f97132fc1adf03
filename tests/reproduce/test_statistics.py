"""Pairing, moving-block bootstrap, the phase rule and loss bins, on hand-computed cases."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from lightning_bn.reproduce.criteria import EARLY_PHASE
from lightning_bn.reproduce.statistics import (
    binned_ratios,
    block_length,
    block_resample,
    bootstrap,
    fit_step,
    loss_bins,
    paired_ratios,
    phase_mask,
)


def _series(steps: list[int], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=float)


def test_paired_ratios_keep_the_steps_both_runs_measured() -> None:
    bn = _series([0, 10, 20, 30], [1.0, 2.0, 3.0, 4.0])
    std = _series([0, 10, 30, 40], [2.0, 4.0, 0.0, 5.0])
    steps, ratios = paired_ratios(bn, std)
    # step 20: no standard value; step 30: standard 0 (no ratio); step 40: no BN value
    assert steps.tolist() == [0, 10]
    assert ratios.tolist() == [0.5, 0.5]


def test_paired_ratios_drop_non_finite_values() -> None:
    bn = _series([0, 10, 20], [math.nan, 3.0, 1.0])
    std = _series([0, 10, 20], [1.0, math.inf, 4.0])
    steps, ratios = paired_ratios(bn, std)
    assert steps.tolist() == [20] and ratios.tolist() == [0.25]


@pytest.mark.parametrize(("n", "expected"), [(0, 1), (1, 1), (3, 1), (8, 2), (20, 3), (64, 4)])
def test_block_length_is_the_rounded_cube_root(n: int, expected: int) -> None:
    assert block_length(n) == expected


class _Starts:
    """A generator stand-in returning fixed block starts, recording what it was asked."""

    def __init__(self, starts: list[int]) -> None:
        self.starts = np.asarray(starts)
        self.calls: list[tuple[Any, ...]] = []

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        self.calls.append((low, high, size))
        return self.starts[:size]


def test_block_resample_concatenates_blocks_of_consecutive_steps() -> None:
    values = np.asarray([10.0, 11.0, 12.0, 13.0, 14.0])
    rng = _Starts([2, 0])
    out = block_resample(values, rng, block=3)  # type: ignore[arg-type]
    # ceil(5 / 3) = 2 starts in 0 … 5 − 3 = 2: blocks [12, 13, 14] and [10, 11, 12], cut to 5
    assert rng.calls == [(0, 3, 2)]
    assert out.tolist() == [12.0, 13.0, 14.0, 10.0, 11.0]


def test_block_resample_keeps_neighbours_together() -> None:
    values = np.arange(20, dtype=float)
    out = block_resample(values, np.random.default_rng(0))  # block 3
    assert out.size == 20
    # within every block of 3 the values are consecutive steps
    for block in out.reshape(-1)[:18].reshape(6, 3):
        assert np.all(np.diff(block) == 1)
    assert block_resample(values, None) is values


def test_block_bootstrap_of_a_constant_ratio_has_a_point_interval() -> None:
    ratios = [np.full(12, 0.5), np.full(12, 0.5)]
    stats = [lambda rng, r=r: float(np.median(block_resample(r, rng))) for r in ratios]
    median, interval, points = bootstrap(stats, samples=50, seed=1)
    assert median == 0.5 and interval == (0.5, 0.5) and points == [0.5, 0.5]


def test_fit_step_is_the_first_loss_below_the_fraction_of_the_first() -> None:
    steps = np.asarray([0, 5, 10, 15])
    # 1% of 2.0 is 0.02: step 10 (0.019) is the first below it; the later rise does not matter
    assert fit_step(steps, np.asarray([2.0, 1.0, 0.019, 0.5]), 0.01) == 10
    # 0.02 itself is not below it
    assert fit_step(steps, np.asarray([2.0, 1.0, 0.02, 0.5]), 0.01) is None
    # the first finite loss is the initial one
    assert fit_step(steps, np.asarray([math.nan, 2.0, 1.0, 0.01]), 0.01) == 15
    assert fit_step(steps, np.full(4, math.nan), 0.01) is None


def test_phase_mask_keeps_the_steps_before_the_earlier_fit() -> None:
    steps = np.asarray([0, 10, 20, 30])
    assert phase_mask(steps, (None, None)).tolist() == [True] * 4
    assert phase_mask(steps, (None, 20)).tolist() == [True, True, False, False]
    assert phase_mask(steps, (25, 15)).tolist() == [True, True, False, False]
    assert phase_mask(steps, (0, None)).tolist() == [False] * 4


def test_loss_bins_are_half_decades() -> None:
    losses = np.asarray([1.0, 0.5, 0.3, 0.1, 0.05, 0.0, math.nan])
    bins = loss_bins(losses, 0.5)
    # log10: 0, −0.301, −0.523, −1, −1.301 over 0.5: 0, −0.60, −1.05, −2, −2.60
    assert bins[:5].tolist() == [0.0, -1.0, -2.0, -2.0, -3.0]
    assert np.isnan(bins[5:]).all()


def test_binned_ratios_compare_within_the_shared_bins_only() -> None:
    bn_bins = np.asarray([-1.0, -1.0, -2.0])
    std_bins = np.asarray([-1.0, -3.0, -1.0, math.nan])
    shared, ratios, kept = binned_ratios(
        bn_bins, np.asarray([2.0, 4.0, 1.0]), std_bins, np.asarray([1.0, 7.0, 2.0, 9.0])
    )
    # bin −1: BN median 3, standard median 1.5
    assert shared.tolist() == [-1.0] and ratios.tolist() == [2.0] and kept == (2, 2)


def test_the_phase_rule_is_fixed_in_the_criteria() -> None:
    assert EARLY_PHASE.fit_fraction == 0.01 and EARLY_PHASE.min_steps == 3
    assert EARLY_PHASE.bin_decades == 0.5
    assert "1%" in EARLY_PHASE.describe()
