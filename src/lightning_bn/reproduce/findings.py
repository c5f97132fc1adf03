"""The paper's findings (spec §6), each checked on a run by a criterion fixed in advance.

Every finding is one function of a :class:`~lightning_bn.reproduce.history.RunData` that returns
a :class:`Finding`: **reproduced** when its criterion holds for every architecture (and, where
the criterion says so, every learning rate) of the run, **not reproduced** when it fails for at
least one, **not evaluated** when the run lacks the variants it needs (e.g. the deep linear
network has no noisy-BatchNorm variant). The thresholds are the module constants below; they
were chosen from the claims' wording, not from the outcomes, and are written into every row of
``summary.md`` so a reader can judge them.

Quantities (from the CSV history of each variant):

- *mean training loss*: the training loss averaged over every step of the run (the area under
  the training curve divided by its length; a diverged run counts as infinite);
- *final training loss*: the mean over the last 10% of the steps;
- *final validation accuracy*: accuracy on the validation split after training, in evaluation
  mode (no noise, BatchNorm running statistics);
- *median* of a diagnostic: the median over the measured steps (and, for per-layer ICS, over
  the layers too) of its finite values.

The comparisons of ICS and of the landscape are made at the base (smallest) learning rate, the
one at which the standard network trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_bn.reproduce.history import RunData, VariantHistory
from lightning_bn.reproduce.plan import format_lr

__all__ = [
    "ACC_TOLERANCE",
    "FASTER_RATIO",
    "FINDINGS",
    "ICS_COS_TOLERANCE",
    "ICS_L2_TOLERANCE",
    "LARGE_LR_MARGIN",
    "LOSS_TOLERANCE",
    "NOT_EVALUATED",
    "NOT_REPRODUCED",
    "REPRODUCED",
    "STANDARD_FAILS_RATIO",
    "Finding",
    "evaluate_findings",
    "final_train_loss",
    "final_val_acc",
    "ics_layers",
    "mean_train_loss",
    "median_diagnostic",
    "median_layer_diagnostic",
]

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_EVALUATED = "not evaluated"

#: "Trains faster": mean training loss at most this fraction of the other network's.
FASTER_RATIO = 0.9
#: "About as well" (classification): final validation accuracy at most this far below BN's.
ACC_TOLERANCE = 0.05
#: "Tolerates a larger lr" (classification): BN's accuracy beats the standard network's by this.
LARGE_LR_MARGIN = 0.10
#: "About as well" (regression): final training loss at most this multiple of BN's.
LOSS_TOLERANCE = 1.25
#: "The standard network does not tolerate it" (regression): final loss at least this × BN's.
STANDARD_FAILS_RATIO = 2.0
#: "ICS not smaller with BN": BN's median ‖G − G′‖ at least this fraction of the standard's ...
ICS_L2_TOLERANCE = 0.9
#: ... and BN's median cos(G, G′) at most the standard's plus this.
ICS_COS_TOLERANCE = 0.02

_LP_LABELS = {"l1": "ℓ1", "l2": "ℓ2", "linf": "ℓ∞"}


@dataclass(frozen=True)
class Finding:
    """One finding of the paper checked on a run.

    Attributes:
        id: a stable identifier (``"bn_trains_faster"``, ...).
        claim: the paper's claim, in words.
        status: :data:`REPRODUCED`, :data:`NOT_REPRODUCED` or :data:`NOT_EVALUATED`.
        numbers: the measured values behind the status.
        criterion: the exact rule that decided the status.
    """

    id: str
    claim: str
    status: str
    numbers: str
    criterion: str


# --- quantities -----------------------------------------------------------------------------------
def _finite_mean(values: np.ndarray) -> float:
    if values.size == 0:
        return math.nan
    if not np.all(np.isfinite(values)):
        return math.inf
    return float(values.mean())


def mean_train_loss(history: VariantHistory) -> float:
    """Training loss averaged over the run (``inf`` if it diverged, ``nan`` without data).

    Uses ``final/mean_train_loss`` (every step, logged by the reproduce command) when present,
    else the logged ``train/loss`` points.
    """
    value = history.last("final/mean_train_loss")
    if not math.isnan(value):
        return value
    return _finite_mean(history.get("train/loss")[1])


def final_train_loss(history: VariantHistory) -> float:
    """Training loss at the end: ``final/train_loss``, else the mean of the last 10% of points."""
    value = history.last("final/train_loss")
    if not math.isnan(value):
        return value
    values = history.get("train/loss")[1]
    if values.size == 0:
        return math.nan
    return _finite_mean(values[-max(1, values.size // 10) :])


def final_val_acc(history: VariantHistory) -> float:
    """Validation accuracy after training: ``final/val_acc``, else the last ``val/acc``."""
    value = history.last("final/val_acc")
    return value if not math.isnan(value) else history.last("val/acc")


def median_diagnostic(history: VariantHistory, key: str) -> float:
    """Median of the finite values of ``key`` over the measured steps (``nan`` if none)."""
    values = history.get(key)[1]
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


def median_layer_diagnostic(
    history: VariantHistory, prefix: str, suffix: str, layers: Sequence[str] | None = None
) -> float:
    """Median over layers and steps of the finite values of ``<prefix><layer><suffix>``.

    Args:
        history: the variant.
        prefix: key prefix, e.g. ``"ics/"``.
        suffix: key suffix, e.g. ``"/l2"``.
        layers: the layers to pool (default: every layer logged).
    """
    if layers is None:
        values = history.values_matching(prefix, suffix)
    else:
        parts = [history.get(f"{prefix}{layer}{suffix}")[1] for layer in layers]
        values = np.concatenate(parts) if parts else np.zeros(0)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


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


# --- formatting -------------------------------------------------------------------------------------
def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf (diverged)" if value > 0 else "-inf"
    return f"{value:.3g}"


def _fmts(*values: float) -> list[str]:
    """Format numbers with the fewest significant digits (3 to 8) that keep distinct values
    distinct: a criterion decided by a small difference shows that difference."""
    for digits in range(3, 9):
        texts = [_fmt(v) if not math.isfinite(v) else f"{v:.{digits}g}" for v in values]
        distinct = {v for v in values if math.isfinite(v)}
        if len({t for t, v in zip(texts, values, strict=True) if math.isfinite(v)}) == len(
            distinct
        ):
            return texts
    return texts


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


# An entry of a check: (ok, text); ok is None when the entry could not be evaluated.
_Entry = tuple[bool | None, str]


def _conclude(entries: Sequence[_Entry], no_data: str) -> tuple[str, str]:
    evaluated = [ok for ok, _ in entries if ok is not None]
    numbers = "; ".join(text for _, text in entries) or no_data
    if not evaluated:
        return NOT_EVALUATED, numbers
    return (REPRODUCED if all(evaluated) else NOT_REPRODUCED), numbers


def _need(run: RunData, arch: str, lr: float, *kinds: str) -> list[VariantHistory] | str:
    found = [run.find(arch, kind, lr) for kind in kinds]
    missing = [k for k, h in zip(kinds, found, strict=True) if h is None]
    if missing:
        return f"{arch} lr {format_lr(lr)}: no {', '.join(missing)} run"
    return [h for h in found if h is not None]


def _where(arch: str, lr: float) -> str:
    return f"{arch} (lr {format_lr(lr)})"


# --- the findings -----------------------------------------------------------------------------------
def bn_trains_faster(run: RunData) -> Finding:
    """BatchNorm trains faster than the standard network (at the base learning rate)."""
    lr = run.plan.base_lr
    entries: list[_Entry] = []
    for arch in run.plan.archs:
        found = _need(run, arch, lr, "batchnorm", "standard")
        if isinstance(found, str):
            entries.append((None, found))
            continue
        bn, std = (mean_train_loss(h) for h in found)
        ratio = _ratio(bn, std)
        ok = None if math.isnan(bn) or math.isnan(std) else ratio <= FASTER_RATIO
        t_bn, t_std = _fmts(bn, std)
        entries.append(
            (
                ok,
                f"{_where(arch, lr)}: mean training loss BN {t_bn} vs standard {t_std}"
                f" (ratio {_fmt(ratio)})",
            )
        )
    status, numbers = _conclude(entries, "no runs")
    return Finding(
        "bn_trains_faster",
        "BatchNorm trains faster",
        status,
        numbers,
        f"at the base lr, for every architecture: BN's mean training loss over the run ≤ "
        f"{FASTER_RATIO} × the standard network's",
    )


def bn_tolerates_larger_lr(run: RunData) -> Finding:
    """At the larger learning rate BN still trains well while the standard network does not."""
    plan = run.plan
    classification = plan.task == "classification"
    if classification:
        criterion = (
            f"for every architecture, at the largest lr: BN's final validation accuracy ≥ its "
            f"accuracy at the base lr − {ACC_TOLERANCE} and ≥ the standard network's at the "
            f"largest lr + {LARGE_LR_MARGIN}"
        )
    else:
        criterion = (
            f"for every architecture, at the largest lr: BN's final training loss is finite and ≤ "
            f"{LOSS_TOLERANCE} × its loss at the base lr, and the standard network's is ≥ "
            f"{STANDARD_FAILS_RATIO} × BN's (or diverged)"
        )
    claim = "BatchNorm tolerates a larger learning rate"
    if len(plan.lrs) < 2:
        return Finding(
            "bn_larger_lr",
            claim,
            NOT_EVALUATED,
            f"one learning rate only ({format_lr(plan.base_lr)}); pass two with --lr",
            criterion,
        )
    lo, hi = plan.base_lr, plan.large_lr
    entries: list[_Entry] = []
    for arch in plan.archs:
        found_lo = _need(run, arch, lo, "batchnorm")
        found_hi = _need(run, arch, hi, "batchnorm", "standard")
        if isinstance(found_lo, str) or isinstance(found_hi, str):
            entries.append((None, found_lo if isinstance(found_lo, str) else str(found_hi)))
            continue
        (bn_lo,), (bn_hi, std_hi) = found_lo, found_hi
        if classification:
            a_lo, a_hi, s_hi = (final_val_acc(h) for h in (bn_lo, bn_hi, std_hi))
            ok: bool | None = None
            if not any(math.isnan(v) for v in (a_lo, a_hi, s_hi)):
                ok = a_hi >= a_lo - ACC_TOLERANCE and a_hi >= s_hi + LARGE_LR_MARGIN
            t_hi, t_std, t_lo = _fmts(a_hi, s_hi, a_lo)
            text = (
                f"{arch}: final val acc at lr {format_lr(hi)}: BN {t_hi} vs standard "
                f"{t_std}; BN at lr {format_lr(lo)} {t_lo}"
            )
        else:
            l_lo, l_hi, s_hi = (final_train_loss(h) for h in (bn_lo, bn_hi, std_hi))
            ok = None
            if not any(math.isnan(v) for v in (l_lo, l_hi, s_hi)):
                ok = (
                    math.isfinite(l_hi)
                    and l_hi <= LOSS_TOLERANCE * l_lo
                    and (not math.isfinite(s_hi) or s_hi >= STANDARD_FAILS_RATIO * l_hi)
                )
            t_hi, t_std, t_lo = _fmts(l_hi, s_hi, l_lo)
            text = (
                f"{arch}: final training loss at lr {format_lr(hi)}: BN {t_hi} vs standard "
                f"{t_std}; BN at lr {format_lr(lo)} {t_lo}"
            )
        entries.append((ok, text))
    status, numbers = _conclude(entries, "no runs")
    return Finding("bn_larger_lr", claim, status, numbers, criterion)


def noisy_bn_like_bn(run: RunData) -> Finding:
    """Noisy BatchNorm trains about as well as BatchNorm and much better than standard."""
    plan = run.plan
    classification = plan.task == "classification"
    entries: list[_Entry] = []
    for arch in plan.archs:
        for lr in plan.lrs:
            found = _need(run, arch, lr, "noisy-batchnorm", "batchnorm", "standard")
            if isinstance(found, str):
                entries.append((None, found))
                continue
            noisy, bn, std = found
            m_noisy, m_std = mean_train_loss(noisy), mean_train_loss(std)
            faster = _ratio(m_noisy, m_std)
            if classification:
                q_noisy, q_bn = final_val_acc(noisy), final_val_acc(bn)
                like = q_noisy >= q_bn - ACC_TOLERANCE
                what = "final val acc"
            else:
                q_noisy, q_bn = final_train_loss(noisy), final_train_loss(bn)
                like = q_noisy <= LOSS_TOLERANCE * q_bn
                what = "final training loss"
            values = (q_noisy, q_bn, m_noisy, m_std)
            ok = (
                None
                if any(math.isnan(v) for v in values)
                else bool(like and faster <= FASTER_RATIO)
            )
            t_noisy, t_bn = _fmts(q_noisy, q_bn)
            t_m_noisy, t_m_std = _fmts(m_noisy, m_std)
            entries.append(
                (
                    ok,
                    f"{_where(arch, lr)}: {what} noisy BN {t_noisy} vs BN {t_bn}; mean "
                    f"training loss noisy BN {t_m_noisy} vs standard {t_m_std}",
                )
            )
    status, numbers = _conclude(entries, "no runs")
    if classification:
        close = f"final validation accuracy ≥ BN's − {ACC_TOLERANCE}"
    else:
        close = f"final training loss ≤ {LOSS_TOLERANCE} × BN's"
    return Finding(
        "noisy_bn",
        "Noisy BatchNorm trains about as well as BatchNorm, and much better than the standard "
        "network",
        status,
        numbers,
        f"for every architecture and lr: noisy BN's {close}, and its mean training loss ≤ "
        f"{FASTER_RATIO} × the standard network's",
    )


def ics_not_smaller(run: RunData) -> Finding:
    """Internal covariate shift (gradient form) is not smaller with BN (DLN: it is larger)."""
    plan = run.plan
    strict = plan.experiment == "dln"
    lr = plan.base_lr
    entries: list[_Entry] = []
    for arch in plan.archs:
        found = _need(run, arch, lr, "batchnorm", "standard")
        if isinstance(found, str):
            entries.append((None, found))
            continue
        layers = ics_layers(found)
        l2_bn, l2_std = (median_layer_diagnostic(h, "ics/", "/l2", layers) for h in found)
        cos_bn, cos_std = (median_layer_diagnostic(h, "ics/", "/cos", layers) for h in found)
        ok: bool | None = None
        if not any(math.isnan(v) for v in (l2_bn, l2_std, cos_bn, cos_std)):
            if strict:
                ok = l2_bn > l2_std and cos_bn < cos_std
            else:
                ok = l2_bn >= ICS_L2_TOLERANCE * l2_std and cos_bn <= cos_std + ICS_COS_TOLERANCE
        t_l2_bn, t_l2_std = _fmts(l2_bn, l2_std)
        t_cos_bn, t_cos_std = _fmts(cos_bn, cos_std)
        entries.append(
            (
                ok,
                f"{_where(arch, lr)}: median ‖G−G′‖ BN {t_l2_bn} vs standard {t_l2_std} "
                f"(ratio {_fmt(_ratio(l2_bn, l2_std))}); median cos(G, G′) BN {t_cos_bn} vs "
                f"standard {t_cos_std}",
            )
        )
    status, numbers = _conclude(entries, "no runs")
    if strict:
        claim = "Internal covariate shift (gradient form) is larger with BatchNorm (deep linear network)"
        criterion = (
            "at the base lr, for every architecture: BN's median ‖G−G′‖₂ over layers (all but the "
            "first, where it is 0 by definition) and measured steps > the standard network's, and BN's median cos(G, G′) < the standard's"
        )
    else:
        claim = "Internal covariate shift (gradient form) is not smaller with BatchNorm"
        criterion = (
            f"at the base lr, for every architecture: BN's median ‖G−G′‖₂ over layers (all but the "
            f"first, where it is 0 by definition) and measured steps ≥ {ICS_L2_TOLERANCE} × the standard network's, and BN's median cos(G, G′) ≤ "
            f"the standard's + {ICS_COS_TOLERANCE}"
        )
    return Finding("ics_not_smaller", claim, status, numbers, criterion)


def _smaller_with_bn(run: RunData, finding_id: str, claim: str, key: str, label: str) -> Finding:
    lr = run.plan.base_lr
    entries: list[_Entry] = []
    for arch in run.plan.archs:
        found = _need(run, arch, lr, "batchnorm", "standard")
        if isinstance(found, str):
            entries.append((None, found))
            continue
        bn, std = (median_diagnostic(h, key) for h in found)
        ok = None if math.isnan(bn) or math.isnan(std) else bn < std
        t_bn, t_std = _fmts(bn, std)
        entries.append(
            (
                ok,
                f"{_where(arch, lr)}: median {label} BN {t_bn} vs standard {t_std} "
                f"(ratio {_fmt(_ratio(bn, std))})",
            )
        )
    status, numbers = _conclude(entries, "no runs")
    return Finding(
        finding_id,
        claim,
        status,
        numbers,
        f"at the base lr, for every architecture: BN's median `{key}` over the measured steps < "
        "the standard network's",
    )


def loss_varies_less(run: RunData) -> Finding:
    """With BN the loss varies less along the gradient (Fig. 4a)."""
    return _smaller_with_bn(
        run,
        "loss_variation",
        "With BatchNorm the loss varies less along the gradient (Fig. 4a)",
        "lipschitz/loss_range",
        "loss range over η",
    )


def gradients_more_predictive(run: RunData) -> Finding:
    """With BN the gradient is more predictive (Fig. 4b)."""
    return _smaller_with_bn(
        run,
        "gradient_predictiveness",
        "With BatchNorm the gradients are more predictive (Fig. 4b)",
        "smoothness/grad_diff_max",
        "max over η of ‖g − ∇L(W − ηg)‖",
    )


def beta_smaller(run: RunData) -> Finding:
    """With BN the effective β-smoothness is smaller (Fig. 4c)."""
    return _smaller_with_bn(
        run,
        "beta_smoothness",
        "With BatchNorm the effective β-smoothness is smaller (Fig. 4c)",
        "smoothness/beta_eff",
        "β_eff",
    )


def lp_norms_like_bn(run: RunData) -> Finding:
    """ℓ1, ℓ2 and ℓ∞ normalisation train about as well as BatchNorm."""
    plan = run.plan
    classification = plan.task == "classification"
    entries: list[_Entry] = []
    for arch in plan.archs:
        for lr in plan.lrs:
            bn = run.find(arch, "batchnorm", lr)
            others = {k: run.find(arch, k, lr) for k in _LP_LABELS}
            present = {k: h for k, h in others.items() if h is not None}
            if bn is None or not present:
                missing = "batchnorm" if bn is None else "ℓp-norm"
                entries.append((None, f"{arch} lr {format_lr(lr)}: no {missing} run"))
                continue
            quality: Callable[[VariantHistory], float] = (
                final_val_acc if classification else final_train_loss
            )
            q_bn = quality(bn)
            values = {k: quality(h) for k, h in present.items()}
            ok: bool | None = None
            if not math.isnan(q_bn) and not any(math.isnan(v) for v in values.values()):
                if classification:
                    ok = all(v >= q_bn - ACC_TOLERANCE for v in values.values())
                else:
                    ok = all(v <= LOSS_TOLERANCE * q_bn for v in values.values())
            t_bn, *t_lp = _fmts(q_bn, *values.values())
            parts = ", ".join(f"{_LP_LABELS[k]} {t}" for k, t in zip(values, t_lp, strict=True))
            entries.append((ok, f"{_where(arch, lr)}: BN {t_bn}, {parts}"))
    status, numbers = _conclude(entries, "no runs")
    if classification:
        rule = f"final validation accuracy ≥ BN's − {ACC_TOLERANCE}"
        numbers = f"final val acc: {numbers}"
    else:
        rule = f"final training loss ≤ {LOSS_TOLERANCE} × BN's"
        numbers = f"final training loss: {numbers}"
    return Finding(
        "lp_norms",
        "ℓ1, ℓ2 and ℓ∞ normalisation train about as well as BatchNorm",
        status,
        numbers,
        f"for every architecture and lr, each of ℓ1, ℓ2, ℓ∞ (those trained): {rule}",
    )


#: The findings, in the order of the summary table.
FINDINGS: tuple[Callable[[RunData], Finding], ...] = (
    bn_trains_faster,
    bn_tolerates_larger_lr,
    noisy_bn_like_bn,
    ics_not_smaller,
    loss_varies_less,
    gradients_more_predictive,
    beta_smaller,
    lp_norms_like_bn,
)


def evaluate_findings(run: RunData) -> list[Finding]:
    """Check every finding of :data:`FINDINGS` on ``run``."""
    return [check(run) for check in FINDINGS]
