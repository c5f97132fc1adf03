"""The statistics behind the findings: the bootstrap, paired per-step ratios, moving blocks,
the early phase and loss bins.

**Pairing.** A landscape or ICS finding compares BatchNorm with the standard network *at the
same step and seed*: :func:`paired_ratios` divides the two runs' values at every measured step
both hold, so that the strong decay of every landscape quantity over training cancels step by
step instead of becoming spread.

**The bootstrap** (:func:`bootstrap`) draws the seeds with replacement and, inside every drawn
seed, redraws that seed's data with its own scheme; for a per-step ratio series that scheme is
the moving-block bootstrap (:func:`block_resample`): blocks of :func:`block_length` consecutive
measured steps, so that the autocorrelation of neighbouring steps is kept and a pair (BN and
standard at one step) is never split.

**The phase** (:func:`fit_step`, :func:`phase_mask`): a run has fitted its data at the first
logged step whose training batch loss is below a fraction of its first one; the deciding steps
are those before the earlier fit of the two runs.

**Loss bins** (:func:`loss_bins`, :func:`binned_ratios`): the matched-loss comparison puts every
measured step into a bin of its measured batch's own loss (half-decade bins by default) and
compares the two networks within every bin both runs visit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from lightning_bn._types import Series
from lightning_bn.reproduce.criteria import BOOTSTRAP_SAMPLES, LEVEL

__all__ = [
    "SeedStatistic",
    "binned_ratios",
    "block_length",
    "block_resample",
    "bootstrap",
    "fit_step",
    "loss_bins",
    "paired_ratios",
    "phase_mask",
    "ratio",
]


def _median(values: np.ndarray) -> float:
    if values.size == 0:
        return math.nan
    with np.errstate(invalid="ignore"):
        return float(np.median(values))


def ratio(a: float, b: float) -> float:
    """``a / b`` with the conventions of the findings: NaN in, NaN out; a finite value over an
    infinite one is 0; an infinite value over a finite one is ∞; ``x / 0`` is ∞ for ``x > 0``."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if math.isinf(b):
        return 0.0 if math.isfinite(a) else math.nan
    if math.isinf(a):
        return math.inf
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


def redraw(values: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """An i.i.d. redraw of ``values`` with replacement (``values`` itself without ``rng``)."""
    if rng is None or values.size == 0:
        return values
    return values[rng.integers(0, values.size, size=values.size)]


#: A seed's statistic: ``None`` gives the point value, a generator a bootstrap redraw of its data.
SeedStatistic = Callable[[np.random.Generator | None], float]


def bootstrap(
    statistics: Sequence[SeedStatistic],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, tuple[float, float], list[float]]:
    """Median over seeds of a statistic and its percentile-bootstrap interval.

    Each replicate draws ``len(statistics)`` seeds with replacement, evaluates each drawn seed's
    statistic on a redraw of its own data (the statistic does that when given the generator), and
    keeps the median over the drawn seeds. The interval is the ``(1 − level)/2`` and
    ``(1 + level)/2`` order statistics of the replicates (order statistics, not interpolation, so
    an infinite statistic stays infinite).

    Args:
        statistics: one function per seed (see :data:`SeedStatistic`).
        samples: replicates.
        level: coverage of the interval.
        seed: seed of the bootstrap generator.

    Returns:
        ``(median over seeds of the point values, (lo, hi), point value per seed)``; NaN in any
        point value or replicate gives a NaN median or interval.

    Raises:
        ValueError: no statistics, or ``samples < 1``.
    """
    if not statistics:
        raise ValueError("Expected at least one seed's statistic, but got none")
    if samples < 1:
        raise ValueError(f"Expected `samples` >= 1, but got {samples!r}")
    points = [float(s(None)) for s in statistics]
    median = _median(np.asarray(points))
    rng = np.random.default_rng(seed)
    n = len(statistics)
    replicates = np.empty(samples)
    for b in range(samples):
        drawn = rng.integers(0, n, size=n)
        replicates[b] = _median(np.asarray([statistics[i](rng) for i in drawn], dtype=float))
    if np.isnan(replicates).any() or math.isnan(median):
        return median, (math.nan, math.nan), points
    lo = float(np.quantile(replicates, (1 - level) / 2, method="lower"))
    hi = float(np.quantile(replicates, (1 + level) / 2, method="higher"))
    return median, (lo, hi), points


def paired_ratios(bn: Series, std: Series) -> Series:
    """Per-step ratios BN ÷ standard at the steps both series hold.

    Args:
        bn: ``(steps, values)`` of the BatchNorm run.
        std: ``(steps, values)`` of the standard run.

    Returns:
        ``(steps, ratios)``, ascending steps, keeping the steps where both values are finite
        and the standard value is not 0.
    """
    steps, i_bn, i_std = np.intersect1d(bn[0], std[0], return_indices=True)
    a, b = bn[1][i_bn].astype(float), std[1][i_std].astype(float)
    keep = np.isfinite(a) & np.isfinite(b) & (b != 0)
    return steps[keep], a[keep] / b[keep]


def block_length(n: int) -> int:
    """Block length of the moving-block bootstrap of ``n`` steps: ``round(n^(1/3))``, at least 1
    (the usual order for a median of a weakly dependent series: 3 for 20 measured steps)."""
    return max(1, round(n ** (1 / 3))) if n > 0 else 1


def block_resample(
    values: np.ndarray, rng: np.random.Generator | None, block: int | None = None
) -> np.ndarray:
    """A moving-block bootstrap redraw of a series.

    Draws ``ceil(n / block)`` start positions uniformly from ``0 … n − block``, concatenates the
    blocks ``values[start : start + block]`` and keeps the first ``n`` values.

    Args:
        values: the series, in step order.
        rng: the generator (``None``: ``values`` itself).
        block: the block length (default :func:`block_length`; capped at ``n``).
    """
    n = values.size
    if rng is None or n == 0:
        return values
    size = min(n, block_length(n) if block is None else max(1, int(block)))
    starts = rng.integers(0, n - size + 1, size=math.ceil(n / size))
    index = (starts[:, None] + np.arange(size)[None, :]).reshape(-1)[:n]
    return values[index]


def fit_step(steps: np.ndarray, losses: np.ndarray, fraction: float) -> int | None:
    """The first step whose loss is below ``fraction`` × the first finite loss (``None``: never).

    Args:
        steps: the logged steps, ascending.
        losses: the training batch loss at those steps.
        fraction: the fit fraction of :class:`~lightning_bn.reproduce.criteria.PhaseRule`.
    """
    finite = np.flatnonzero(np.isfinite(losses))
    if finite.size == 0:
        return None
    floor = fraction * float(losses[finite[0]])
    with np.errstate(invalid="ignore"):
        hit = np.flatnonzero(np.isfinite(losses) & (losses < floor))
    return int(steps[hit[0]]) if hit.size else None


def phase_mask(steps: np.ndarray, fits: Sequence[int | None]) -> np.ndarray:
    """The steps strictly before the earliest of ``fits`` (every step when none fitted)."""
    known = [f for f in fits if f is not None]
    if not known:
        return np.ones(steps.shape, dtype=bool)
    return steps < min(known)


def loss_bins(losses: np.ndarray, decades: float) -> np.ndarray:
    """The bin of each loss: ``floor(log10(loss) / decades)`` (float, NaN for a loss ≤ 0 or not
    finite). With ``decades = 0.5``, ``[0.1, 0.316)`` is bin −2, ``[0.316, 1)`` bin −1."""
    out = np.full(losses.shape, math.nan)
    ok = np.isfinite(losses) & (losses > 0)
    out[ok] = np.floor(np.log10(losses[ok]) / decades)
    return out


def binned_ratios(
    bn_bins: np.ndarray, bn_values: np.ndarray, std_bins: np.ndarray, std_values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Per bin both runs visit: median of BN's values ÷ median of the standard network's.

    Args:
        bn_bins: the loss bin of each BatchNorm measured step (NaN: none).
        bn_values: the quantity at those steps.
        std_bins: the same for the standard run.
        std_values: the same for the standard run.

    Returns:
        ``(bins, ratios, (BN steps kept, standard steps kept))``: the shared bins, ascending,
        their ratios, and how many measured steps of each run fall into them.
    """
    ok_bn = np.isfinite(bn_bins) & np.isfinite(bn_values)
    ok_std = np.isfinite(std_bins) & np.isfinite(std_values)
    shared = np.intersect1d(bn_bins[ok_bn], std_bins[ok_std])
    ratios = np.asarray(
        [
            ratio(
                _median(bn_values[ok_bn & (bn_bins == b)]),
                _median(std_values[ok_std & (std_bins == b)]),
            )
            for b in shared
        ],
        dtype=float,
    )
    kept = (
        int(np.isin(bn_bins[ok_bn], shared).sum()),
        int(np.isin(std_bins[ok_std], shared).sum()),
    )
    return shared, ratios, kept
