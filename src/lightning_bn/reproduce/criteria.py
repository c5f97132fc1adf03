"""The criteria of the findings, fixed before any run: statistic, threshold, side, phase.

Every finding is decided by the one rule of :func:`verdict`: **reproduced** when the whole 95%
interval of its statistic lies on the paper's side of the threshold, **not reproduced** when it
lies entirely on the other side (or on the threshold), **inconclusive** otherwise.
:data:`CRITERIA` is the only place where thresholds live; they come from the claims' wording,
not from outcomes.

**The phase rule** (:data:`EARLY_PHASE`) decides *which measured steps* the landscape (Fig. 4)
and ICS findings are decided on. The paper states the landscape claims for "the initial phases
of training; in the later stages the network is already close to convergence", and its Fig. 4
draws per-step bands with no whole-run summary. Once a network has fitted its training data,
its gradient shrinks with its loss, and with it the loss range along the gradient, the gradient
difference and β_eff: a comparison that pools those steps measures how low a network's loss
went, not how smooth its landscape is. So a run *has fitted its data* at the first logged
training step whose batch loss is below :attr:`PhaseRule.fit_fraction` (1%) of its initial
batch loss (for 10-class cross-entropy, 2.3 nats at the start, that is 0.023 nats: the right
class gets about 98% probability on the training batch, the paper's "close to convergence"); a
fraction of the initial loss rather than an absolute floor keeps the rule meaningful for the
deep linear network's squared error too. The deciding comparison keeps, per seed, the measured
steps strictly before the earlier of the two networks' fit steps (every measured step when
neither fits), and needs at least :attr:`PhaseRule.min_steps` of them in every seed (else the
statistic is undefined and the finding inconclusive: too few steps to say anything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "BOOTSTRAP_SAMPLES",
    "CRITERIA",
    "EARLY_PHASE",
    "INCONCLUSIVE",
    "LEVEL",
    "NOT_EVALUATED",
    "NOT_REPRODUCED",
    "REGRESSION_CRITERIA",
    "REPRODUCED",
    "VERDICTS",
    "Criterion",
    "PhaseRule",
    "criterion_of",
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
class PhaseRule:
    """Which measured steps decide a landscape or ICS finding (see the module's docstring).

    Attributes:
        fit_fraction: a run has fitted its data at the first logged step whose training batch
            loss is below this fraction of its first logged batch loss.
        min_steps: measured steps the phase must keep in every seed (fewer: undefined).
        bin_decades: width, in decades of the measured batch's loss, of the bins of the
            matched-loss comparison (0.5: half-decade bins).
    """

    fit_fraction: float = 0.01
    min_steps: int = 3
    bin_decades: float = 0.5

    def describe(self) -> str:
        """The rule in words (written into ``summary.md`` and ``findings.json``)."""
        return (
            "the measured steps before either network fitted its training data (its training "
            f"batch loss first below {self.fit_fraction:.0%} of its initial value); at least "
            f"{self.min_steps} per seed"
        )


#: The phase rule of the landscape and ICS findings.
EARLY_PHASE = PhaseRule()


@dataclass(frozen=True)
class Criterion:
    """The rule of a finding: its statistic, threshold and the side the paper is on.

    Attributes:
        title: the claim, in words.
        statistic: what is computed per seed.
        threshold: the value the interval is compared with.
        side: ``"below"`` or ``"above"``: where the statistic lies if the claim holds.
        source: where the claim comes from.
        phase: for a per-step comparison (landscape, ICS): the rule choosing the steps that
            decide it (``None``: the statistic covers the whole run).
    """

    title: str
    statistic: str
    threshold: float
    side: str
    source: str = "Santurkar et al. 2018"
    phase: PhaseRule | None = None

    def rule(self) -> str:
        """The criterion in words (written into ``summary.md`` and ``findings.json``)."""
        op, other = ("<", "≥") if self.side == "below" else (">", "≤")
        pct = f"{LEVEL:.0%}"
        where = f" over {self.phase.describe()}" if self.phase is not None else ""
        return (
            f"{self.statistic}{where}: reproduced when its {pct} interval is entirely {op} "
            f"{self.threshold:g}, not reproduced when entirely {other} {self.threshold:g}, "
            "else inconclusive"
        )


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
        "median over measured steps of the per-step ratio BN ÷ standard of ‖G − G′‖₂ (median "
        "over layers, all but the first, of the per-layer ratio)",
        0.9,
        "above",
        phase=EARLY_PHASE,
    ),
    "loss_variation": Criterion(
        "With BatchNorm the loss varies less along the gradient (Fig. 4a)",
        "median over measured steps of the per-step ratio BN ÷ standard of the loss range "
        "max_η L(W − ηg) − min_η L(W − ηg)",
        1.0,
        "below",
        phase=EARLY_PHASE,
    ),
    "gradient_predictiveness": Criterion(
        "With BatchNorm the gradients are more predictive (Fig. 4b)",
        "median over measured steps of the per-step ratio BN ÷ standard of max_η ‖g − ∇L(W − ηg)‖",
        1.0,
        "below",
        phase=EARLY_PHASE,
    ),
    "beta_smoothness": Criterion(
        "With BatchNorm the effective β-smoothness is smaller (Fig. 4c)",
        "median over measured steps of the per-step ratio BN ÷ standard of β_eff",
        1.0,
        "below",
        phase=EARLY_PHASE,
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
        CRITERIA["ics_not_smaller"].statistic,
        1.0,
        "above",
        phase=EARLY_PHASE,
    ),
}


def criterion_of(name: str, task: str = "classification") -> Criterion:
    """The criterion of finding ``name`` for a task (``"classification"`` or ``"regression"``)."""
    if task == "regression" and name in REGRESSION_CRITERIA:
        return REGRESSION_CRITERIA[name]
    return CRITERIA[name]


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
