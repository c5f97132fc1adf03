"""The per-step findings: ICS (paper Fig. 3) and the loss landscape (Fig. 4a-c), BN vs standard.

Each is a statistic of the **per-step ratio BN ÷ standard** at the same step and seed
(:func:`~lightning_bn.reproduce.statistics.paired_ratios`): per seed, the median of the ratios
over the kept measured steps; over seeds, the median, with a bootstrap interval that draws the
seeds with replacement and, within each drawn seed, moving blocks of consecutive measured steps
of its ratio series. Three comparisons are computed:

- **early phase** (decides the verdict): the steps before either network fitted its training
  data (:data:`~lightning_bn.reproduce.criteria.EARLY_PHASE`);
- **whole run**: every measured step, the same statistic (reported beside it);
- **matched loss**: every measured step goes into a half-decade bin of its measured batch's own
  loss (``lipschitz/loss``); per bin both runs visit, the ratio of the two networks' medians;
  per seed, the median over those bins (the bootstrap redraws the seeds and, within a seed, its
  shared bins).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from lightning_bn.reproduce.criteria import EARLY_PHASE, PhaseRule, criterion_of
from lightning_bn.reproduce.finding import (
    Finding,
    _Context,
    _decided,
    _fmt,
    _Runs,
    _skip,
    compare,
)
from lightning_bn.reproduce.history import RunData, VariantHistory
from lightning_bn.reproduce.plan import VariantSpec
from lightning_bn.reproduce.quantities import ics_layers
from lightning_bn.reproduce.statistics import (
    Series,
    _median,
    binned_ratios,
    block_resample,
    fit_step,
    loss_bins,
    paired_ratios,
    phase_mask,
    redraw,
)

__all__ = [
    "LANDSCAPE_KEYS",
    "RESAMPLED_BINS",
    "RESAMPLED_STEPS",
    "beta_smaller",
    "fit_sentences",
    "fit_steps",
    "gradients_more_predictive",
    "ics_not_smaller",
    "loss_varies_less",
]

#: The logged key of each landscape finding.
LANDSCAPE_KEYS = {
    "loss_variation": "lipschitz/loss_range",
    "gradient_predictiveness": "smoothness/grad_diff_max",
    "beta_smoothness": "smoothness/beta_eff",
}
#: The loss of the measured batch, at every measured step (the matched-loss comparison's loss).
MEASURED_LOSS = "lipschitz/loss"

RESAMPLED_STEPS = (
    "seeds with replacement; within each drawn seed, moving blocks of round(n^(1/3)) "
    "consecutive measured steps of its per-step ratio series BN ÷ standard (BN and standard "
    "at one step stay paired)"
)
RESAMPLED_BINS = (
    "seeds with replacement; within each drawn seed, its shared loss bins with replacement"
)


def fit_steps(
    histories: tuple[VariantHistory, ...], rule: PhaseRule = EARLY_PHASE
) -> tuple[int | None, ...]:
    """The step at which each run fitted its training data (``None``: not within the run)."""
    return tuple(fit_step(*h.get("train/loss"), rule.fit_fraction) for h in histories)


def _at(series: Series, steps: np.ndarray) -> np.ndarray:
    """The values of ``series`` at ``steps`` (NaN where it has none)."""
    out = np.full(steps.shape, math.nan)
    index = {int(s): i for i, s in enumerate(series[0])}
    for j, step in enumerate(steps):
        if int(step) in index:
            out[j] = series[1][index[int(step)]]
    return out


class _Seed:
    """What the three comparisons of one seed need, computed once."""

    def __init__(
        self,
        runs: _Runs,
        ratios: Series,
        values: tuple[Series, Series],
        rule: PhaseRule,
    ) -> None:
        self.fits = fit_steps((runs["bn"], runs["std"]), rule)
        steps, self.all = ratios
        self.early = self.all[phase_mask(steps, self.fits)]
        self.enough = self.early.size >= rule.min_steps
        bins = []
        for (s, v), which in zip(values, ("bn", "std"), strict=True):
            bins.append((loss_bins(_at(runs[which].get(MEASURED_LOSS), s), rule.bin_decades), v))
        shared, self.bin_ratios, self.bin_steps = binned_ratios(*bins[0], *bins[1])
        self.bins = int(shared.size)
        self.medians = (_median(_finite(values[0][1])), _median(_finite(values[1][1])))


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _paired_finding(
    ctx: _Context,
    name: str,
    ratios: Callable[[_Runs], Series],
    values: Callable[[_Runs], tuple[Series, Series]],
    label: str,
) -> Finding:
    crit = criterion_of(name, ctx.task)
    rule = crit.phase or EARLY_PHASE
    fid = f"{name}/{ctx.arch}"
    seeds, runs, reason = ctx.gather({"bn": ctx.spec("batchnorm"), "std": ctx.spec("standard")})
    if not seeds:
        return _skip(ctx, name, reason)
    data = {id(r): _Seed(r, ratios(r), values(r), rule) for r in runs}

    def early(r: _Runs, rng: np.random.Generator | None) -> float:
        d = data[id(r)]
        return _median(block_resample(d.early, rng)) if d.enough else math.nan

    def whole(r: _Runs, rng: np.random.Generator | None) -> float:
        return _median(block_resample(data[id(r)].all, rng))

    def matched(r: _Runs, rng: np.random.Generator | None) -> float:
        return _median(redraw(data[id(r)].bin_ratios, rng))

    phase = compare(
        fid, crit, early, runs, lambda r: (data[id(r)].early.size,), None, RESAMPLED_STEPS
    )
    whole_run = compare(
        fid + "/whole", crit, whole, runs, lambda r: (data[id(r)].all.size,), None, RESAMPLED_STEPS
    )
    match = compare(
        fid + "/matched",
        crit,
        matched,
        runs,
        lambda r: data[id(r)].bin_steps,
        lambda r: data[id(r)].bins,
        RESAMPLED_BINS,
    )

    def describe(r: _Runs) -> str:
        d = data[id(r)]
        fit = ", ".join(
            f"{who} fitted at step {f}" if f is not None else f"{who} did not fit"
            for who, f in zip(("BN", "standard"), d.fits, strict=True)
        )
        return (
            f"{fit}; per-step ratio median {_fmt(_median(d.early))} over the {d.early.size} "
            f"early steps, {_fmt(_median(d.all))} over all {d.all.size}; median {label} BN "
            f"{_fmt(d.medians[0])}, standard {_fmt(d.medians[1])}"
        )

    return _decided(
        ctx,
        name,
        crit,
        phase,
        seeds,
        runs,
        describe,
        matched=match,
        decided_by=f"early phase: {rule.describe()}",
        phase=phase,
        whole_run=whole_run,
        fits=tuple((data[id(r)].fits[0], data[id(r)].fits[1]) for r in runs),
        resampled=RESAMPLED_STEPS,
    )


def ics_not_smaller(ctx: _Context) -> Finding:
    """Internal covariate shift (gradient form) is not smaller with BN (DLN: it is larger).

    Per measured step, the ratio BN ÷ standard of ‖G − G′‖₂ of each layer (all but the first,
    where it is 0 by definition), and the median over layers of those ratios.
    """

    def layer_keys(r: _Runs) -> list[str]:
        return [f"ics/{layer}/l2" for layer in ics_layers([r["bn"], r["std"]])]

    def ratios(r: _Runs) -> Series:
        per_layer = [paired_ratios(r["bn"].get(k), r["std"].get(k)) for k in layer_keys(r)]
        if not per_layer:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        steps = np.unique(np.concatenate([s for s, _ in per_layer]))
        table = np.stack([_at(p, steps) for p in per_layer])
        with np.errstate(all="ignore"):
            return steps, np.nanmedian(table, axis=0)

    def values(r: _Runs) -> tuple[Series, Series]:
        out = []
        for which in ("bn", "std"):
            series = [r[which].get(k) for k in layer_keys(r)]
            if not series:
                out.append((np.zeros(0, dtype=np.int64), np.zeros(0)))
                continue
            steps = np.unique(np.concatenate([s for s, _ in series]))
            with np.errstate(all="ignore"):
                out.append((steps, np.nanmedian(np.stack([_at(p, steps) for p in series]), 0)))
        return out[0], out[1]

    return _paired_finding(ctx, "ics_not_smaller", ratios, values, "‖G−G′‖")


def _landscape(ctx: _Context, name: str) -> Finding:
    key = LANDSCAPE_KEYS[name]
    return _paired_finding(
        ctx,
        name,
        lambda r: paired_ratios(r["bn"].get(key), r["std"].get(key)),
        lambda r: (r["bn"].get(key), r["std"].get(key)),
        key,
    )


def loss_varies_less(ctx: _Context) -> Finding:
    """With BN the loss varies less along the gradient (Fig. 4a)."""
    return _landscape(ctx, "loss_variation")


def gradients_more_predictive(ctx: _Context) -> Finding:
    """With BN the gradient is more predictive (Fig. 4b)."""
    return _landscape(ctx, "gradient_predictiveness")


def beta_smaller(ctx: _Context) -> Finding:
    """With BN the effective β-smoothness is smaller (Fig. 4c)."""
    return _landscape(ctx, "beta_smoothness")


def fit_sentences(run: RunData, rule: PhaseRule = EARLY_PHASE) -> list[str]:
    """One sentence per architecture saying when its compared runs (standard and BatchNorm at
    the base lr) fitted their training data, or that none did."""
    out = []
    for arch in run.plan.archs:
        parts: list[str] = []
        for kind, who in (("standard", "the standard network"), ("batchnorm", "BatchNorm")):
            spec = VariantSpec(arch, kind, run.plan.base_lr)
            hits = [
                (h.seed, fit_steps((h,), rule)[0])
                for h in run.seed_runs(spec)
                if fit_steps((h,), rule)[0] is not None
            ]
            if hits:
                steps = ", ".join(f"step {f} (seed {s})" for s, f in hits)
                verb = "at" if parts else "fitted its training data at"
                parts.append(f"{who} {verb} {steps}")
        if parts:
            out.append(
                f"On the {arch}, " + " and ".join(parts) + f" (training batch loss below "
                f"{rule.fit_fraction:.0%} of its initial value); the ICS and Fig. 4 findings "
                "decide on the measured steps before that."
            )
        else:
            out.append(
                f"On the {arch}, neither the standard network nor BatchNorm fitted its training "
                f"data within the run (training batch loss never below {rule.fit_fraction:.0%} "
                "of its initial value): the ICS and Fig. 4 findings decide on every measured "
                "step."
            )
    return out
