"""The findings of the paper and of its seed papers, each decided by a criterion fixed in advance.

Every finding is a *statistic* computed on each seed's runs (a ratio BatchNorm ÷ standard, or a
difference of accuracies), summarised by its **median over seeds** and a **95% interval**, and
decided by the one rule of :func:`~lightning_bn.reproduce.criteria.verdict` against the
finding's threshold in :data:`~lightning_bn.reproduce.criteria.CRITERIA`:

- **reproduced**: the whole interval lies on the paper's side of the threshold;
- **not reproduced**: the whole interval lies on the other side (or on the threshold);
- **inconclusive**: the interval straddles the threshold, or is undefined (a statistic that is
  NaN in some seed, e.g. a diagnostic that a diverged run never measured, or an early phase
  with too few measured steps).

A finding whose runs the plan did not train is *not evaluated* and is listed apart.

The modules, by idea:

- :mod:`~lightning_bn.reproduce.criteria`: the criteria, thresholds, the phase rule, the verdict;
- :mod:`~lightning_bn.reproduce.statistics`: the bootstrap, pairing, moving blocks, the phase,
  loss bins;
- :mod:`~lightning_bn.reproduce.quantities`: per-run quantities (mean loss, final accuracy, ...);
- :mod:`~lightning_bn.reproduce.claims`: the findings on training (speed, lr, noise, ℓp, ...);
- :mod:`~lightning_bn.reproduce.paired`: the per-step findings (ICS, Fig. 4a-c), decided on the
  early phase, with the whole run and a matched-loss comparison beside it.

**The interval** is a percentile bootstrap over seeds *and* over what each seed's statistic
averages (:data:`BOOTSTRAP_SAMPLES` replicates): the replicate draws the seeds with replacement
and, inside every drawn seed, redraws its data: moving blocks of consecutive measured steps of a
per-step ratio series, the logged training losses of a mean training loss, the validation
answers behind an accuracy (binomial). The replicate's statistic is the median over its drawn
seeds; the interval runs from the 2.5% to the 97.5% order statistic of the replicates. With 2 or
3 seeds the seed-level part can only reproduce the spread between the seeds, so the interval
describes the variation that was observed, not a calibrated 95% confidence interval over all
possible seeds; that is why a verdict needs the *whole* interval on one side and why
"inconclusive" exists. The steps-to-accuracy statistic has no within-seed redraw (a first
crossing time). Each bootstrap generator is seeded with the finding's id, so
``lightning-bn plot`` redraws the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from lightning_bn.reproduce import criteria
from lightning_bn.reproduce.claims import (
    bn_tolerates_larger_lr,
    bn_trains_faster,
    init_sensitivity,
    lp_norms_like_bn,
    noisy_bn_faster,
    noisy_bn_like_bn,
    small_batch,
    steps_to_accuracy,
)
from lightning_bn.reproduce.criteria import *  # noqa: F403  (re-exported: criteria.__all__)
from lightning_bn.reproduce.finding import Comparison, Finding, _Context
from lightning_bn.reproduce.history import RunData
from lightning_bn.reproduce.paired import (
    beta_smaller,
    fit_sentences,
    gradients_more_predictive,
    ics_not_smaller,
    loss_varies_less,
)
from lightning_bn.reproduce.quantities import (
    final_train_loss,
    final_val_acc,
    ics_layers,
    mean_train_loss,
    median_diagnostic,
    median_layer_diagnostic,
)
from lightning_bn.reproduce.statistics import bootstrap

__all__ = [
    "FINDINGS",
    "Comparison",
    "Finding",
    "bootstrap",
    "evaluate_findings",
    "final_train_loss",
    "final_val_acc",
    "fit_sentences",
    "ics_layers",
    "mean_train_loss",
    "median_diagnostic",
    "median_layer_diagnostic",
]
__all__ += criteria.__all__

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
