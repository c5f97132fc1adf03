"""The findings of the paper and of its seed papers, each decided by a criterion fixed in advance.

Every finding is a *statistic* computed on each seed's runs (a ratio BatchNorm ÷ standard, or a
difference of accuracies), summarised by its **median over seeds** and a **95% interval**, and
decided by the one rule of :func:`verdict` against the finding's threshold in :data:`CRITERIA`
(the only place where thresholds live; they come from the claims' wording, not from outcomes):

- **reproduced**: the whole interval lies on the paper's side of the threshold;
- **not reproduced**: the whole interval lies on the other side (or on the threshold);
- **inconclusive**: the interval straddles the threshold, or is undefined (a statistic that is
  NaN in some seed, e.g. a diagnostic that a diverged run never measured).

A finding whose runs the plan did not train (the deep linear network has no noisy-BatchNorm
variant, ...) is *not evaluated* and is listed apart.

**The interval** (:func:`bootstrap`) is a percentile bootstrap over seeds *and* over what each
seed's statistic averages: each of :data:`BOOTSTRAP_SAMPLES` replicates draws the seeds with
replacement and, inside every drawn seed, redraws its data with replacement: the measured steps of
a diagnostic (pooled over layers for ICS), the logged training losses of a mean training loss, and
the validation samples behind an accuracy (a binomial redraw of the correct answers among the
``final/val_samples`` samples, which is the bootstrap over validation samples without storing each
prediction). The replicate's statistic is the median over its drawn seeds; the interval runs from
the 2.5% to the 97.5% order statistic of the replicates. With 2 or 3 seeds the seed-level part can
only reproduce the spread between the seeds, so the interval is a description of the variation
that was observed (seeds, steps, validation samples), not a calibrated 95% confidence interval
over all possible seeds; that is why a verdict needs the *whole* interval on one side and why
"inconclusive" exists. The steps-to-accuracy statistic has no within-seed redraw (a first
crossing time), so its interval covers the seeds only. The bootstrap generator is seeded with the
finding's id, so ``lightning-bn plot`` redraws the same numbers.

**Like with like.** The landscape and ICS findings compare the two networks at the same steps, as
the paper does: *that comparison decides the verdict*. They are also computed at matched training
loss (:func:`matched_masks`): only the measured steps of either run whose training loss lies in
the range both runs went through, so a reader sees whether a difference comes from BatchNorm or
from the runs being at another stage of training. That comparison has its own interval and verdict
(same rule), reported alongside.

Per-run quantities (from the CSV history of each run):

- *mean training loss*: the mean of the logged training losses (every ``log_every`` steps;
  infinite when the run diverged);
- *final validation accuracy*: accuracy on the validation split after training, in evaluation
  mode (no noise, BatchNorm running statistics);
- a *diagnostic's median*: the median over the measured steps of its finite values.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_bn.reproduce.history import RunData, VariantHistory
from lightning_bn.reproduce.plan import VariantSpec, format_lr

__all__ = [
    "BOOTSTRAP_SAMPLES",
    "CRITERIA",
    "FINDINGS",
    "INCONCLUSIVE",
    "LEVEL",
    "NOT_EVALUATED",
    "NOT_REPRODUCED",
    "REPRODUCED",
    "VERDICTS",
    "Comparison",
    "Criterion",
    "Finding",
    "bootstrap",
    "evaluate_findings",
    "final_train_loss",
    "final_val_acc",
    "ics_layers",
    "matched_masks",
    "mean_train_loss",
    "median_diagnostic",
    "median_layer_diagnostic",
    "verdict",
]

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NOT_EVALUATED = "not evaluated"
#: The three verdicts of an evaluated finding.
VERDICTS: tuple[str, ...] = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)

#: Bootstrap replicates per interval.
BOOTSTRAP_SAMPLES = 1000
#: Coverage of the intervals.
LEVEL = 0.95


@dataclass(frozen=True)
class Criterion:
    """The rule of a finding: its statistic, threshold and the side the paper is on.

    Attributes:
        title: the claim, in words.
        statistic: what is computed per seed.
        threshold: the value the interval is compared with.
        side: ``"below"`` or ``"above"``: where the statistic lies if the claim holds.
        source: where the claim comes from.
    """

    title: str
    statistic: str
    threshold: float
    side: str
    source: str = "Santurkar et al. 2018"

    def rule(self) -> str:
        """The criterion in words (written into ``summary.md`` and ``findings.json``)."""
        op, other = ("<", "≥") if self.side == "below" else (">", "≤")
        pct = f"{LEVEL:.0%}"
        return (
            f"{self.statistic}: reproduced when its {pct} interval is entirely {op} "
            f"{self.threshold:g}, not reproduced when entirely {other} {self.threshold:g}, "
            "else inconclusive"
        )


# --- every criterion, in one place -----------------------------------------------------------------
#: The criteria of the findings, by name, in the order of the summary. Classification criteria;
#: :data:`REGRESSION_CRITERIA` replaces some for the deep linear network (no accuracy there).
CRITERIA: dict[str, Criterion] = {
    "bn_trains_faster": Criterion(
        "BatchNorm trains faster",
        "mean training loss, BN ÷ standard, at the base lr",
        0.9,
        "below",
    ),
    "bn_larger_lr": Criterion(
        "BatchNorm tolerates a larger learning rate",
        "final validation accuracy at the largest lr, BN − standard",
        0.10,
        "above",
    ),
    "noisy_bn": Criterion(
        "Noisy BatchNorm trains about as well as BatchNorm",
        "final validation accuracy at the base lr, noisy BN − BN",
        -0.05,
        "above",
    ),
    "noisy_bn_faster": Criterion(
        "Noisy BatchNorm still trains faster than the standard network",
        "mean training loss, noisy BN ÷ standard, at the base lr",
        0.9,
        "below",
    ),
    "ics_not_smaller": Criterion(
        "Internal covariate shift (gradient form) is not smaller with BatchNorm",
        "median ‖G − G′‖₂ over layers (all but the first) and measured steps, BN ÷ standard",
        0.9,
        "above",
    ),
    "loss_variation": Criterion(
        "With BatchNorm the loss varies less along the gradient (Fig. 4a)",
        "median over measured steps of the loss range max_η L(W − ηg) − min_η L(W − ηg), "
        "BN ÷ standard",
        1.0,
        "below",
    ),
    "gradient_predictiveness": Criterion(
        "With BatchNorm the gradients are more predictive (Fig. 4b)",
        "median over measured steps of max_η ‖g − ∇L(W − ηg)‖, BN ÷ standard",
        1.0,
        "below",
    ),
    "beta_smoothness": Criterion(
        "With BatchNorm the effective β-smoothness is smaller (Fig. 4c)",
        "median over measured steps of β_eff, BN ÷ standard",
        1.0,
        "below",
    ),
    "lp_norms": Criterion(
        "ℓ1, ℓ2 and ℓ∞ normalisation train about as well as BatchNorm",
        "final validation accuracy at the base lr, worst of ℓ1/ℓ2/ℓ∞ − BN",
        -0.05,
        "above",
    ),
    "steps_to_accuracy": Criterion(
        "BatchNorm reaches the standard network's accuracy in fewer steps",
        "steps to the standard network's final validation accuracy, BN ÷ standard "
        "(first validation at or above it)",
        1.0,
        "below",
        "Ioffe & Szegedy 2015 (14× fewer steps)",
    ),
    "init_sensitivity": Criterion(
        "BatchNorm needs less care with the initialisation",
        "largest change of final validation accuracy when the initial weights are scaled "
        "(×0.25, ×4), BN − standard",
        0.0,
        "below",
        "Ioffe & Szegedy 2015",
    ),
    "small_batch": Criterion(
        "BatchNorm depends on the batch size, LayerNorm does not",
        "accuracy lost from the base batch to the small batch, BN − LayerNorm",
        0.0,
        "above",
        "Ba et al. 2016 (Layer Normalization)",
    ),
}

#: Criteria of the regression task (deep linear network), where an accuracy does not exist.
REGRESSION_CRITERIA: dict[str, Criterion] = {
    "bn_larger_lr": Criterion(
        CRITERIA["bn_larger_lr"].title,
        "final training loss at the largest lr, standard ÷ BN (a diverged standard run: ∞)",
        2.0,
        "above",
    ),
    "noisy_bn": Criterion(
        CRITERIA["noisy_bn"].title,
        "final training loss at the base lr, noisy BN ÷ BN",
        1.25,
        "below",
    ),
    "lp_norms": Criterion(
        CRITERIA["lp_norms"].title,
        "final training loss at the base lr, worst of ℓ1/ℓ2/ℓ∞ ÷ BN",
        1.25,
        "below",
    ),
    "ics_not_smaller": Criterion(
        "Internal covariate shift (gradient form) is larger with BatchNorm (deep linear network)",
        "median ‖G − G′‖₂ over layers (all but the first) and measured steps, BN ÷ standard",
        1.0,
        "above",
    ),
}

_LP = ("l1", "l2", "linf")
_LANDSCAPE_KEYS = {
    "loss_variation": "lipschitz/loss_range",
    "gradient_predictiveness": "smoothness/grad_diff_max",
    "beta_smoothness": "smoothness/beta_eff",
}


def criterion_of(name: str, task: str = "classification") -> Criterion:
    """The criterion of finding ``name`` for a task (``"classification"`` or ``"regression"``)."""
    if task == "regression" and name in REGRESSION_CRITERIA:
        return REGRESSION_CRITERIA[name]
    return CRITERIA[name]


# --- the verdict and the interval ------------------------------------------------------------------
def verdict(interval: tuple[float, float], threshold: float, side: str) -> str:
    """The verdict of an interval against a threshold.

    Args:
        interval: ``(lo, hi)``; NaN anywhere makes it undefined.
        threshold: the threshold of the criterion.
        side: ``"below"`` or ``"above"``: the paper's side.

    Returns:
        :data:`REPRODUCED` when the whole interval is strictly on the paper's side,
        :data:`NOT_REPRODUCED` when it is entirely on the other side (the threshold included),
        :data:`INCONCLUSIVE` otherwise.

    Raises:
        ValueError: an unknown ``side``.
    """
    if side not in ("below", "above"):
        raise ValueError(f"Expected `side` to be 'below' or 'above', but got {side!r}")
    lo, hi = interval
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        return INCONCLUSIVE
    if side == "below":
        if hi < threshold:
            return REPRODUCED
        if lo >= threshold:
            return NOT_REPRODUCED
    else:
        if lo > threshold:
            return REPRODUCED
        if hi <= threshold:
            return NOT_REPRODUCED
    return INCONCLUSIVE


#: A seed's statistic: ``None`` gives the point value, a generator a bootstrap redraw of its data.
SeedStatistic = Callable[[np.random.Generator | None], float]


def _median(values: np.ndarray) -> float:
    if values.size == 0:
        return math.nan
    with np.errstate(invalid="ignore"):
        return float(np.median(values))


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


# --- per-run quantities -----------------------------------------------------------------------------
def _diverged(history: VariantHistory) -> bool:
    return history.last("final/diverged") == 1.0


def mean_train_loss(history: VariantHistory) -> float:
    """Training loss averaged over the run (``inf`` if it diverged, ``nan`` without data).

    Uses ``final/mean_train_loss`` (every step, logged by the reproduce command) when present,
    else the logged ``train/loss`` points.
    """
    value = history.last("final/mean_train_loss")
    if not math.isnan(value):
        return value
    values = history.get("train/loss")[1]
    if values.size == 0:
        return math.nan
    return float(values.mean()) if np.all(np.isfinite(values)) else math.inf


def final_train_loss(history: VariantHistory) -> float:
    """Training loss at the end: ``final/train_loss``, else the mean of the last 10% of points."""
    value = history.last("final/train_loss")
    if not math.isnan(value):
        return value
    values = history.get("train/loss")[1]
    if values.size == 0:
        return math.nan
    tail = values[-max(1, values.size // 10) :]
    return float(tail.mean()) if np.all(np.isfinite(tail)) else math.inf


def final_val_acc(history: VariantHistory) -> float:
    """Validation accuracy after training: ``final/val_acc``, else the last ``val/acc``."""
    value = history.last("final/val_acc")
    return value if not math.isnan(value) else history.last("val/acc")


def median_diagnostic(history: VariantHistory, key: str) -> float:
    """Median of the finite values of ``key`` over the measured steps (``nan`` if none)."""
    values = history.get(key)[1]
    return _median(values[np.isfinite(values)])


def median_layer_diagnostic(
    history: VariantHistory, prefix: str, suffix: str, layers: Sequence[str] | None = None
) -> float:
    """Median over layers and steps of the finite values of ``<prefix><layer><suffix>``."""
    values = _layer_values(history, prefix, suffix, layers)
    return _median(values[np.isfinite(values)])


def _layer_values(
    history: VariantHistory, prefix: str, suffix: str, layers: Sequence[str] | None
) -> np.ndarray:
    if layers is None:
        return history.values_matching(prefix, suffix)
    parts = [history.get(f"{prefix}{layer}{suffix}")[1] for layer in layers]
    return np.concatenate(parts) if parts else np.zeros(0)


def ics_layers(histories: Sequence[VariantHistory]) -> list[str]:
    """Layers with an ICS measurement that is not identically zero, in first-logged order.

    The first layer's ``G'`` equals ``G`` by definition (no layer runs before it), so its
    ``‖G − G′‖`` is 0 and its cosine 1 in every network; pooling it would only dilute the
    comparison.
    """

    def nonzero(history: VariantHistory, layer: str) -> bool:
        values = history.get(f"ics/{layer}/l2")[1]
        return bool(np.any(values[np.isfinite(values)] != 0))

    layers: list[str] = []
    for history in histories:
        for layer in history.layers("ics/", "/l2"):
            if layer not in layers and any(nonzero(h, layer) for h in histories):
                layers.append(layer)
    return layers


def _train_loss_at(history: VariantHistory, steps: np.ndarray, half_window: int) -> np.ndarray:
    """Mean logged training loss within ``half_window`` steps of each of ``steps``."""
    s, v = history.get("train/loss")
    out = np.full(steps.shape, math.nan)
    for i, step in enumerate(steps):
        near = v[np.abs(s - step) <= half_window]
        if near.size and np.all(np.isfinite(near)):
            out[i] = near.mean()
    return out


def matched_masks(
    bn: VariantHistory, std: VariantHistory, key: str, half_window: int
) -> tuple[np.ndarray, np.ndarray]:
    """The measured steps of two runs that are at a matched training loss.

    The training loss at a measured step is the mean logged training loss within
    ``half_window`` steps of it. The matched range is where the two runs' ranges of that loss
    (over their measured steps) overlap, ``[max(min_bn, min_std), min(max_bn, max_std)]``; a
    step is kept when its loss lies in it.

    Returns:
        Boolean masks over the steps of ``key`` in ``bn`` and in ``std``.
    """
    s_bn, s_std = bn.get(key)[0], std.get(key)[0]
    l_bn = _train_loss_at(bn, s_bn, half_window)
    l_std = _train_loss_at(std, s_std, half_window)
    f_bn, f_std = l_bn[np.isfinite(l_bn)], l_std[np.isfinite(l_std)]
    if f_bn.size == 0 or f_std.size == 0:
        return np.zeros(s_bn.shape, bool), np.zeros(s_std.shape, bool)
    lo, hi = max(f_bn.min(), f_std.min()), min(f_bn.max(), f_std.max())
    with np.errstate(invalid="ignore"):
        return (l_bn >= lo) & (l_bn <= hi), (l_std >= lo) & (l_std <= hi)


# --- seed statistics --------------------------------------------------------------------------------
def _redraw(values: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    if rng is None or values.size == 0:
        return values
    return values[rng.integers(0, values.size, size=values.size)]


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if math.isinf(b):
        return 0.0 if math.isfinite(a) else math.nan
    if math.isinf(a):
        return math.inf
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


def _mean_loss(history: VariantHistory, rng: np.random.Generator | None) -> float:
    """Mean of the logged training losses (redrawn with ``rng``); ``inf`` if the run diverged."""
    if _diverged(history):
        return math.inf
    values = history.get("train/loss")[1]
    if values.size == 0:
        return mean_train_loss(history)
    if not np.all(np.isfinite(values)):
        return math.inf
    return float(_redraw(values, rng).mean())


def _acc(history: VariantHistory, rng: np.random.Generator | None) -> float:
    """Final validation accuracy; with ``rng``, a binomial redraw over the validation samples."""
    acc = final_val_acc(history)
    n = history.last("final/val_samples")
    if rng is None or math.isnan(acc) or math.isnan(n) or n < 1:
        return acc
    return float(rng.binomial(int(n), min(max(acc, 0.0), 1.0)) / int(n))


def _final_loss(history: VariantHistory, rng: np.random.Generator | None) -> float:
    return math.inf if _diverged(history) else final_train_loss(history)


# --- the findings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """A secondary comparison of a finding (at matched training loss).

    Attributes:
        median: median over seeds of the statistic.
        interval: its 95% interval.
        verdict: the verdict of the interval (same rule and threshold as the finding).
        per_seed: the statistic of each seed.
        steps: matched measured steps per seed, ``(BN, standard)``.
    """

    median: float
    interval: tuple[float, float]
    verdict: str
    per_seed: tuple[float, ...]
    steps: tuple[tuple[int, int], ...]


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
        matched: the comparison at matched training loss (landscape and ICS findings).
        decided_by: which comparison decides the verdict.
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


def _finding(
    ctx: _Context,
    name: str,
    needs: dict[str, VariantSpec],
    statistic: Callable[[_Runs, np.random.Generator | None], float],
    describe: Callable[[_Runs], str],
    matched: Callable[[_Runs, np.random.Generator | None], float] | None = None,
    matched_steps: Callable[[_Runs], tuple[int, int]] | None = None,
) -> Finding:
    crit = criterion_of(name, ctx.task)
    fid = f"{name}/{ctx.arch}"
    seeds, runs, reason = ctx.gather(needs)
    if not seeds:
        return _skip(ctx, name, reason)
    stats = [functools.partial(_call, statistic, r) for r in runs]
    median, interval, points = bootstrap(stats, seed=_seed_rng(fid))
    comparison = None
    decided = ""
    if matched is not None and matched_steps is not None:
        m_stats = [functools.partial(_call, matched, r) for r in runs]
        m_median, m_interval, m_points = bootstrap(m_stats, seed=_seed_rng(fid + "/matched"))
        comparison = Comparison(
            m_median,
            m_interval,
            verdict(m_interval, crit.threshold, crit.side),
            tuple(m_points),
            tuple(matched_steps(r) for r in runs),
        )
        decided = "same step (the paper's comparison); matched training loss reported alongside"
    numbers = "; ".join(
        f"seed {s if s >= 0 else '?'}: {describe(r)}" for s, r in zip(seeds, runs, strict=True)
    )
    return Finding(
        fid,
        name,
        ctx.arch,
        crit.title,
        verdict(interval, crit.threshold, crit.side),
        tuple(seeds),
        median,
        interval,
        tuple(points),
        crit,
        numbers,
        comparison,
        decided,
    )


def bn_trains_faster(ctx: _Context) -> Finding:
    """BatchNorm trains faster than the standard network (at the base learning rate)."""
    return _finding(
        ctx,
        "bn_trains_faster",
        {"bn": ctx.spec("batchnorm"), "std": ctx.spec("standard")},
        lambda r, rng: _ratio(_mean_loss(r["bn"], rng), _mean_loss(r["std"], rng)),
        lambda r: (
            f"mean loss BN {_fmt(_mean_loss(r['bn'], None))}, standard "
            f"{_fmt(_mean_loss(r['std'], None))}"
        ),
    )


def bn_tolerates_larger_lr(ctx: _Context) -> Finding:
    """At the largest learning rate BN still trains well while the standard network does not."""
    plan = ctx.plan
    if len(plan.lrs) < 2:
        return _skip(ctx, "bn_larger_lr", f"one learning rate only ({format_lr(plan.base_lr)})")
    hi = plan.large_lr
    needs = {"bn": ctx.spec("batchnorm", hi), "std": ctx.spec("standard", hi)}
    if ctx.task == "classification":
        return _finding(
            ctx,
            "bn_larger_lr",
            needs,
            lambda r, rng: _acc(r["bn"], rng) - _acc(r["std"], rng),
            lambda r: (
                f"val acc at lr {format_lr(hi)}: BN {_fmt(final_val_acc(r['bn']))}, "
                f"standard {_fmt(final_val_acc(r['std']))}"
            ),
        )
    return _finding(
        ctx,
        "bn_larger_lr",
        needs,
        lambda r, rng: _ratio(_final_loss(r["std"], rng), _final_loss(r["bn"], rng)),
        lambda r: (
            f"final loss at lr {format_lr(hi)}: BN {_fmt(_final_loss(r['bn'], None))}, "
            f"standard {_fmt(_final_loss(r['std'], None))}"
        ),
    )


def noisy_bn_like_bn(ctx: _Context) -> Finding:
    """Noisy BatchNorm trains about as well as BatchNorm (Fig. 2)."""
    needs = {"noisy": ctx.spec("noisy-batchnorm"), "bn": ctx.spec("batchnorm")}
    if ctx.task == "classification":
        return _finding(
            ctx,
            "noisy_bn",
            needs,
            lambda r, rng: _acc(r["noisy"], rng) - _acc(r["bn"], rng),
            lambda r: (
                f"val acc noisy BN {_fmt(final_val_acc(r['noisy']))}, BN "
                f"{_fmt(final_val_acc(r['bn']))}"
            ),
        )
    return _finding(
        ctx,
        "noisy_bn",
        needs,
        lambda r, rng: _ratio(_final_loss(r["noisy"], rng), _final_loss(r["bn"], rng)),
        lambda r: (
            f"final loss noisy BN {_fmt(_final_loss(r['noisy'], None))}, BN "
            f"{_fmt(_final_loss(r['bn'], None))}"
        ),
    )


def noisy_bn_faster(ctx: _Context) -> Finding:
    """Noisy BatchNorm still trains faster than the standard network (Fig. 2)."""
    return _finding(
        ctx,
        "noisy_bn_faster",
        {"noisy": ctx.spec("noisy-batchnorm"), "std": ctx.spec("standard")},
        lambda r, rng: _ratio(_mean_loss(r["noisy"], rng), _mean_loss(r["std"], rng)),
        lambda r: (
            f"mean loss noisy BN {_fmt(_mean_loss(r['noisy'], None))}, standard "
            f"{_fmt(_mean_loss(r['std'], None))}"
        ),
    )


def _half_window(ctx: _Context) -> int:
    return max(1, ctx.plan.measure_every // 2)


@dataclass(frozen=True)
class _Pools:
    """The finite values a diagnostic ratio compares, per run: all steps, and matched steps."""

    bn: np.ndarray
    std: np.ndarray
    bn_matched: np.ndarray
    std_matched: np.ndarray


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _pools_finding(
    ctx: _Context,
    name: str,
    pools: Callable[[_Runs], _Pools],
    label: str,
) -> Finding:
    """A finding on the ratio BN ÷ standard of the medians of pooled diagnostic values."""
    cache: dict[int, _Pools] = {}

    def get(r: _Runs) -> _Pools:
        # the runs of a seed stay alive while the finding is evaluated, so their id is a key
        if id(r) not in cache:
            cache[id(r)] = pools(r)
        return cache[id(r)]

    def ratio(a: np.ndarray, b: np.ndarray, rng: np.random.Generator | None) -> float:
        return _ratio(_median(_redraw(a, rng)), _median(_redraw(b, rng)))

    def stat(r: _Runs, rng: np.random.Generator | None) -> float:
        p = get(r)
        return ratio(p.bn, p.std, rng)

    def matched(r: _Runs, rng: np.random.Generator | None) -> float:
        p = get(r)
        if p.bn_matched.size < 2 or p.std_matched.size < 2:
            return math.nan
        return ratio(p.bn_matched, p.std_matched, rng)

    def steps(r: _Runs) -> tuple[int, int]:
        p = get(r)
        return p.bn_matched.size, p.std_matched.size

    return _finding(
        ctx,
        name,
        {"bn": ctx.spec("batchnorm"), "std": ctx.spec("standard")},
        stat,
        lambda r: (
            f"median {label} BN {_fmt(_median(get(r).bn))}, standard {_fmt(_median(get(r).std))}"
        ),
        matched,
        steps,
    )


def ics_not_smaller(ctx: _Context) -> Finding:
    """Internal covariate shift (gradient form) is not smaller with BN (DLN: it is larger).

    ‖G − G′‖₂ is pooled over the layers (all but the first, where it is 0 by definition) and
    the measured steps; the matched comparison keeps the steps at matched training loss.
    """
    half = _half_window(ctx)

    def pools(r: _Runs) -> _Pools:
        layers = ics_layers([r["bn"], r["std"]])
        if not layers:
            empty = np.zeros(0)
            return _Pools(empty, empty, empty, empty)
        m_bn, m_std = matched_masks(r["bn"], r["std"], f"ics/{layers[0]}/l2", half)
        out = []
        for which, mask in (("bn", m_bn), ("std", m_std)):
            rows = [r[which].get(f"ics/{layer}/l2")[1] for layer in layers]
            same = [row for row in rows if row.size == mask.size]
            out.append(_finite(np.concatenate(rows)))
            out.append(
                _finite(np.concatenate([row[mask] for row in same])) if same else rows[0][:0]
            )
        return _Pools(out[0], out[2], out[1], out[3])

    return _pools_finding(ctx, "ics_not_smaller", pools, "‖G−G′‖")


def _landscape(ctx: _Context, name: str) -> Finding:
    key = _LANDSCAPE_KEYS[name]
    half = _half_window(ctx)

    def pools(r: _Runs) -> _Pools:
        m_bn, m_std = matched_masks(r["bn"], r["std"], key, half)
        bn, std = r["bn"].get(key)[1], r["std"].get(key)[1]
        return _Pools(_finite(bn), _finite(std), _finite(bn[m_bn]), _finite(std[m_std]))

    return _pools_finding(ctx, name, pools, key)


def loss_varies_less(ctx: _Context) -> Finding:
    """With BN the loss varies less along the gradient (Fig. 4a)."""
    return _landscape(ctx, "loss_variation")


def gradients_more_predictive(ctx: _Context) -> Finding:
    """With BN the gradient is more predictive (Fig. 4b)."""
    return _landscape(ctx, "gradient_predictiveness")


def beta_smaller(ctx: _Context) -> Finding:
    """With BN the effective β-smoothness is smaller (Fig. 4c)."""
    return _landscape(ctx, "beta_smoothness")


def lp_norms_like_bn(ctx: _Context) -> Finding:
    """ℓ1, ℓ2 and ℓ∞ normalisation train about as well as BatchNorm."""
    present = [k for k in _LP if k in ctx.plan.kinds]
    if not present:
        return _skip(ctx, "lp_norms", "no ℓp-norm variant trained")
    needs = {"bn": ctx.spec("batchnorm")} | {k: ctx.spec(k) for k in present}
    if ctx.task == "classification":
        return _finding(
            ctx,
            "lp_norms",
            needs,
            lambda r, rng: min(_acc(r[k], rng) for k in present) - _acc(r["bn"], rng),
            lambda r: (
                "val acc BN "
                + _fmt(final_val_acc(r["bn"]))
                + "".join(f", {k} {_fmt(final_val_acc(r[k]))}" for k in present)
            ),
        )
    return _finding(
        ctx,
        "lp_norms",
        needs,
        lambda r, rng: _ratio(
            max(_final_loss(r[k], rng) for k in present), _final_loss(r["bn"], rng)
        ),
        lambda r: (
            "final loss BN "
            + _fmt(_final_loss(r["bn"], None))
            + "".join(f", {k} {_fmt(_final_loss(r[k], None))}" for k in present)
        ),
    )


def _first_reach(history: VariantHistory, target: float) -> float:
    """First step at which the validation accuracy is ≥ ``target`` (``inf`` if never)."""
    steps, values = history.get("val/acc")
    final_step = history.last("final/steps")
    final = history.last("final/val_acc")
    if not math.isnan(final) and not math.isnan(final_step):
        steps = np.append(steps, int(final_step))
        values = np.append(values, final)
    hit = np.flatnonzero(np.nan_to_num(values, nan=-1.0) >= target)
    return float(max(1, steps[hit[0]])) if hit.size else math.inf


def steps_to_accuracy(ctx: _Context) -> Finding:
    """BatchNorm reaches the standard network's final accuracy in fewer steps (Ioffe & Szegedy)."""
    if ctx.task != "classification":
        return _skip(ctx, "steps_to_accuracy", "no accuracy in a regression task")

    def stat(r: _Runs, rng: np.random.Generator | None) -> float:
        target = final_val_acc(r["std"])
        if math.isnan(target):
            return math.nan
        return _ratio(_first_reach(r["bn"], target), _first_reach(r["std"], target))

    def describe(r: _Runs) -> str:
        target = final_val_acc(r["std"])
        return (
            f"target {_fmt(target)}: BN at step {_fmt(_first_reach(r['bn'], target))}, "
            f"standard at {_fmt(_first_reach(r['std'], target))}"
        )

    return _finding(
        ctx,
        "steps_to_accuracy",
        {"bn": ctx.spec("batchnorm"), "std": ctx.spec("standard")},
        stat,
        describe,
    )


def init_sensitivity(ctx: _Context) -> Finding:
    """BatchNorm's final accuracy moves less than the standard network's when the initial
    weights are scaled (Ioffe & Szegedy)."""
    scales = ctx.plan.init_scales
    if ctx.task != "classification":
        return _skip(ctx, "init_sensitivity", "no accuracy in a regression task")
    if not scales or (ctx.plan.extra_archs is not None and ctx.arch not in ctx.plan.extra_archs):
        return _skip(ctx, "init_sensitivity", "no scaled-initialisation runs in this plan")
    needs = {f"{k}@1": ctx.spec(k) for k in ("batchnorm", "standard")}
    for kind in ("batchnorm", "standard"):
        for scale in scales:
            needs[f"{kind}@{scale:g}"] = ctx.spec(kind, init_scale=scale)

    def move(r: _Runs, kind: str, rng: np.random.Generator | None) -> float:
        base = _acc(r[f"{kind}@1"], rng)
        return max(abs(_acc(r[f"{kind}@{s:g}"], rng) - base) for s in scales)

    return _finding(
        ctx,
        "init_sensitivity",
        needs,
        lambda r, rng: move(r, "batchnorm", rng) - move(r, "standard", rng),
        lambda r: (
            "val acc "
            + ", ".join(
                f"{label} "
                + "/".join(_fmt(final_val_acc(r[f"{kind}@{s:g}"])) for s in (1.0, *scales))
                for kind, label in (("batchnorm", "BN"), ("standard", "standard"))
            )
            + f" (×{'/×'.join(f'{s:g}' for s in (1.0, *scales))})"
        ),
    )


def small_batch(ctx: _Context) -> Finding:
    """BatchNorm loses more accuracy than LayerNorm at a small batch size."""
    if ctx.task != "classification":
        return _skip(ctx, "small_batch", "no accuracy in a regression task")
    extra = ctx.plan.extra_archs
    if not ctx.plan.small_batches or (extra is not None and ctx.arch not in extra):
        return _skip(ctx, "small_batch", "no small-batch runs in this plan")
    small = ctx.plan.small_batches[0]
    needs = {
        "bn": ctx.spec("batchnorm"),
        "ln": ctx.spec("layernorm"),
        "bn_small": ctx.spec("batchnorm", batch_size=small),
        "ln_small": ctx.spec("layernorm", batch_size=small),
    }

    def lost(r: _Runs, which: str, rng: np.random.Generator | None) -> float:
        return _acc(r[which], rng) - _acc(r[f"{which}_small"], rng)

    big = ctx.plan.batch_size
    return _finding(
        ctx,
        "small_batch",
        needs,
        lambda r, rng: lost(r, "bn", rng) - lost(r, "ln", rng),
        lambda r: (
            f"val acc at batch {big}/{small}: BN {_fmt(final_val_acc(r['bn']))}/"
            f"{_fmt(final_val_acc(r['bn_small']))}, LayerNorm {_fmt(final_val_acc(r['ln']))}/"
            f"{_fmt(final_val_acc(r['ln_small']))}"
        ),
    )


#: The findings by name (the keys of :data:`CRITERIA`), in the order of the summary.
FINDINGS: dict[str, Callable[[_Context], Finding]] = {
    "bn_trains_faster": bn_trains_faster,
    "bn_larger_lr": bn_tolerates_larger_lr,
    "noisy_bn": noisy_bn_like_bn,
    "noisy_bn_faster": noisy_bn_faster,
    "ics_not_smaller": ics_not_smaller,
    "loss_variation": loss_varies_less,
    "gradient_predictiveness": gradients_more_predictive,
    "beta_smoothness": beta_smaller,
    "lp_norms": lp_norms_like_bn,
    "steps_to_accuracy": steps_to_accuracy,
    "init_sensitivity": init_sensitivity,
    "small_batch": small_batch,
}


def evaluate_findings(run: RunData, names: Collection[str] | None = None) -> list[Finding]:
    """Check every finding (or those in ``names``) on every architecture of ``run``
    (architecture-major order).

    A finding the run cannot evaluate (no such runs, one learning rate, no accuracy in
    regression) comes back as :data:`NOT_EVALUATED`, with the reason in ``numbers``.

    Raises:
        ValueError: an unknown name in ``names``.
    """
    unknown = sorted(set(names or ()) - set(FINDINGS))
    if unknown:
        raise ValueError(
            f"Expected finding names among {', '.join(FINDINGS)}, but got {', '.join(unknown)}"
        )
    checks = [check for name, check in FINDINGS.items() if names is None or name in names]
    return [check(_Context(run, arch)) for arch in run.plan.archs for check in checks]
