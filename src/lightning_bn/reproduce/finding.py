"""A finding checked on one architecture (:class:`Finding`), its comparisons (:class:`Comparison`),
and the machinery that gathers each seed's runs and bootstraps a statistic over them.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_bn.reproduce.criteria import NOT_EVALUATED, Criterion, criterion_of, verdict
from lightning_bn.reproduce.history import RunData, VariantHistory
from lightning_bn.reproduce.plan import VariantSpec
from lightning_bn.reproduce.statistics import bootstrap

__all__ = ["Comparison", "Finding"]


@dataclass(frozen=True)
class Comparison:
    """One comparison of a per-step finding (early phase, whole run or matched loss).

    Attributes:
        median: median over seeds of the statistic.
        interval: its 95% interval.
        verdict: the verdict of the interval (same rule and threshold as the finding).
        per_seed: the statistic of each seed.
        steps: per seed, the measured steps it kept: ``(paired steps,)`` for the early-phase
            and whole-run comparisons, ``(BN steps, standard steps)`` for the matched one.
        bins: per seed, the loss bins both runs visit (matched-loss comparison only).
        resampled: what the bootstrap redraws, in words.
    """

    median: float
    interval: tuple[float, float]
    verdict: str
    per_seed: tuple[float, ...]
    steps: tuple[tuple[int, ...], ...]
    bins: tuple[int, ...] = ()
    resampled: str = ""


@dataclass(frozen=True)
class Finding:
    """One finding checked on one architecture of a run.

    Attributes:
        id: ``<name>/<arch>``, stable (``"loss_variation/mlp"``).
        name: the finding's key in :data:`CRITERIA`.
        arch: the architecture.
        title: the claim, in words.
        verdict: one of :data:`VERDICTS`, or :data:`NOT_EVALUATED`.
        seeds: the seeds whose runs entered the statistic.
        median: median over seeds of the statistic.
        interval: the 95% interval (see :func:`bootstrap`).
        per_seed: the statistic of each seed.
        criterion: the criterion.
        numbers: the per-run values behind the statistic, in words.
        matched: the comparison at matched loss (landscape and ICS findings).
        decided_by: which comparison decides the verdict.
        phase: the deciding early-phase comparison (landscape and ICS findings; its numbers
            are also :attr:`median`, :attr:`interval` and :attr:`per_seed`).
        whole_run: the same paired statistic over every measured step (reported, not deciding).
        fits: per seed, the step at which ``(BN, standard)`` fitted their training data
            (``None``: not within the run).
        resampled: what the bootstrap of the deciding statistic redraws, in words.
    """

    id: str
    name: str
    arch: str
    title: str
    verdict: str
    seeds: tuple[int, ...]
    median: float
    interval: tuple[float, float]
    per_seed: tuple[float, ...]
    criterion: Criterion
    numbers: str = ""
    matched: Comparison | None = None
    decided_by: str = ""
    phase: Comparison | None = None
    whole_run: Comparison | None = None
    fits: tuple[tuple[int | None, int | None], ...] = ()
    resampled: str = ""

    @property
    def status(self) -> str:
        """Alias of :attr:`verdict`."""
        return self.verdict

    @property
    def claim(self) -> str:
        """Alias of :attr:`title`."""
        return self.title

    @property
    def threshold(self) -> float:
        """The criterion's threshold."""
        return self.criterion.threshold


_Runs = dict[str, VariantHistory]


class _Context:
    """The runs of one architecture, per seed, and the plan."""

    def __init__(self, run: RunData, arch: str) -> None:
        self.run = run
        self.arch = arch
        self.plan = run.plan
        self.task = run.plan.task

    def gather(self, needs: dict[str, VariantSpec]) -> tuple[list[int], list[_Runs], str]:
        """Per seed, the runs named in ``needs`` (seeds lacking one are left out)."""
        per_seed: dict[int, _Runs] = {}
        for name, spec in needs.items():
            for history in self.run.seed_runs(spec):
                seed = -1 if history.seed is None else history.seed
                per_seed.setdefault(seed, {})[name] = history
        complete = sorted(s for s, runs in per_seed.items() if len(runs) == len(needs))
        missing = [f"{spec.id}" for name, spec in needs.items() if not self.run.seed_runs(spec)]
        reason = f"no {', '.join(missing)} run" if missing else "no seed has every run"
        return complete, [per_seed[s] for s in complete], reason

    def spec(
        self,
        kind: str,
        lr: float | None = None,
        init_scale: float = 1.0,
        batch_size: int | None = None,
    ) -> VariantSpec:
        """A variant of this architecture (at the base lr unless ``lr`` is given)."""
        lr = self.plan.base_lr if lr is None else lr
        return VariantSpec(self.arch, kind, lr, init_scale, batch_size)


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.3g}"


def _seed_rng(finding_id: str) -> int:
    return zlib.crc32(finding_id.encode())


def _call(
    statistic: Callable[[_Runs, np.random.Generator | None], float],
    runs: _Runs,
    rng: np.random.Generator | None,
) -> float:
    return statistic(runs, rng)


def _skip(ctx: _Context, name: str, reason: str) -> Finding:
    crit = criterion_of(name, ctx.task)
    nan2 = (math.nan, math.nan)
    return Finding(
        f"{name}/{ctx.arch}",
        name,
        ctx.arch,
        crit.title,
        NOT_EVALUATED,
        (),
        math.nan,
        nan2,
        (),
        crit,
        reason,
    )


def compare(
    fid: str,
    crit: Criterion,
    statistic: Callable[[_Runs, np.random.Generator | None], float],
    runs: list[_Runs],
    steps: Callable[[_Runs], tuple[int, ...]] = lambda r: (),
    bins: Callable[[_Runs], int] | None = None,
    resampled: str = "",
) -> Comparison:
    """Bootstrap ``statistic`` over the seeds' runs into a :class:`Comparison` (its own
    generator, seeded with ``fid``, so that a redraw gives the same numbers)."""
    stats = [functools.partial(_call, statistic, r) for r in runs]
    median, interval, points = bootstrap(stats, seed=_seed_rng(fid))
    return Comparison(
        median,
        interval,
        verdict(interval, crit.threshold, crit.side),
        tuple(points),
        tuple(steps(r) for r in runs),
        tuple(bins(r) for r in runs) if bins is not None else (),
        resampled,
    )


#: What the bootstrap of a finding without its own scheme redraws.
RESAMPLED = (
    "seeds with replacement; within each drawn seed, its logged training losses (i.i.d.) "
    "and its validation answers (binomial over the validation samples)"
)


def _finding(
    ctx: _Context,
    name: str,
    needs: dict[str, VariantSpec],
    statistic: Callable[[_Runs, np.random.Generator | None], float],
    describe: Callable[[_Runs], str],
) -> Finding:
    crit = criterion_of(name, ctx.task)
    fid = f"{name}/{ctx.arch}"
    seeds, runs, reason = ctx.gather(needs)
    if not seeds:
        return _skip(ctx, name, reason)
    main = compare(fid, crit, statistic, runs)
    return _decided(ctx, name, crit, main, seeds, runs, describe, resampled=RESAMPLED)


def _decided(
    ctx: _Context,
    name: str,
    crit: Criterion,
    deciding: Comparison,
    seeds: list[int],
    runs: list[_Runs],
    describe: Callable[[_Runs], str],
    **extra: Any,
) -> Finding:
    """The finding ``name`` (criterion ``crit``) with the verdict and numbers of the ``deciding`` comparison, each
    seed's runs described in :attr:`Finding.numbers`; ``extra``: the remaining fields."""
    numbers = "; ".join(
        f"seed {s if s >= 0 else '?'}: {describe(r)}" for s, r in zip(seeds, runs, strict=True)
    )
    return Finding(
        f"{name}/{ctx.arch}",
        name,
        ctx.arch,
        crit.title,
        deciding.verdict,
        tuple(seeds),
        deciding.median,
        deciding.interval,
        deciding.per_seed,
        crit,
        numbers,
        **extra,
    )
