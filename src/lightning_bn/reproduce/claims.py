"""The findings on training itself: speed, learning rate, noisy BatchNorm, ℓp norms, steps to
accuracy, initialisation and batch size (each a statistic of per-run quantities per seed)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from lightning_bn.reproduce.finding import Finding, _Context, _finding, _fmt, _Runs, _skip
from lightning_bn.reproduce.history import VariantHistory
from lightning_bn.reproduce.plan import format_lr
from lightning_bn.reproduce.quantities import _acc, _final_loss, _mean_loss, final_val_acc
from lightning_bn.reproduce.statistics import ratio as _ratio
from lightning_bn.reproduce.variants import VariantSpec

__all__ = [
    "bn_tolerates_larger_lr",
    "bn_trains_faster",
    "init_sensitivity",
    "lp_norms_like_bn",
    "noisy_bn_faster",
    "noisy_bn_like_bn",
    "small_batch",
    "steps_to_accuracy",
]

_LP = ("l1", "l2", "linf")


def bn_trains_faster(ctx: _Context) -> Finding:
    """BatchNorm trains faster than the standard network (at the base learning rate)."""
    return _faster_than_standard(ctx, "bn_trains_faster", "bn", "batchnorm", "BN")


def _faster_than_standard(ctx: _Context, key: str, role: str, kind: str, shown: str) -> Finding:
    """The mean training loss of variant ``kind`` (``role`` in the runs, ``shown`` in the
    detail line) over that of the standard network."""
    return _finding(
        ctx,
        key,
        {role: ctx.spec(kind), "std": ctx.spec("standard")},
        lambda r, rng: _ratio(_mean_loss(r[role], rng), _mean_loss(r["std"], rng)),
        lambda r: (
            f"mean loss {shown} {_fmt(_mean_loss(r[role], None))}, standard "
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
    return _final_comparison(
        ctx, "bn_larger_lr", needs, ("BN", "standard"), f" at lr {format_lr(hi)}:", ("std", "bn")
    )


def noisy_bn_like_bn(ctx: _Context) -> Finding:
    """Noisy BatchNorm trains about as well as BatchNorm (Fig. 2)."""
    needs = {"noisy": ctx.spec("noisy-batchnorm"), "bn": ctx.spec("batchnorm")}
    return _final_comparison(ctx, "noisy_bn", needs, ("noisy BN", "BN"), "", ("noisy", "bn"))


def _final_comparison(
    ctx: _Context,
    key: str,
    needs: dict[str, VariantSpec],
    names: tuple[str, str],
    where: str,
    loss_ratio: tuple[str, str],
) -> Finding:
    """How the two variants of ``needs`` (in order, shown as ``names``) end: on classification
    the first's final validation accuracy minus the second's; on regression the final-loss ratio
    of the ``loss_ratio`` pair (numerator, denominator). ``where`` follows the quantity in the
    detail line."""
    a, b = needs
    if ctx.task == "classification":
        return _finding(
            ctx,
            key,
            needs,
            lambda r, rng: _acc(r[a], rng) - _acc(r[b], rng),
            lambda r: (
                f"val acc{where} {names[0]} {_fmt(final_val_acc(r[a]))}, "
                f"{names[1]} {_fmt(final_val_acc(r[b]))}"
            ),
        )
    num, den = loss_ratio
    return _finding(
        ctx,
        key,
        needs,
        lambda r, rng: _ratio(_final_loss(r[num], rng), _final_loss(r[den], rng)),
        lambda r: (
            f"final loss{where} {names[0]} {_fmt(_final_loss(r[a], None))}, "
            f"{names[1]} {_fmt(_final_loss(r[b], None))}"
        ),
    )


def noisy_bn_faster(ctx: _Context) -> Finding:
    """Noisy BatchNorm still trains faster than the standard network (Fig. 2)."""
    return _faster_than_standard(ctx, "noisy_bn_faster", "noisy", "noisy-batchnorm", "noisy BN")


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
    skipped = _without_extra_runs(ctx, "init_sensitivity", scales, "scaled-initialisation")
    if skipped is not None:
        return skipped
    needs = {f"{k}@1": ctx.spec(k) for k in ("batchnorm", "standard")}
    for kind in ("batchnorm", "standard"):
        for scale in scales:
            needs[f"{kind}@{scale:g}"] = ctx.spec(kind, init_scale=scale)

    def move(r: _Runs, kind: str, rng: np.random.Generator | None) -> float:
        base = _acc(r[f"{kind}@1"], rng)
        return max(abs(_acc(r[f"{kind}@{s:g}"], rng) - base) for s in scales)

    def describe(r: _Runs) -> str:
        return (
            "val acc "
            + ", ".join(
                f"{label} "
                + "/".join(_fmt(final_val_acc(r[f"{kind}@{s:g}"])) for s in (1.0, *scales))
                for kind, label in (("batchnorm", "BN"), ("standard", "standard"))
            )
            + f" (×{'/×'.join(f'{s:g}' for s in (1.0, *scales))})"
        )

    return _bn_minus_other(
        ctx, "init_sensitivity", needs, move, ("batchnorm", "standard"), describe
    )


def small_batch(ctx: _Context) -> Finding:
    """BatchNorm loses more accuracy than LayerNorm at a small batch size."""
    skipped = _without_extra_runs(ctx, "small_batch", ctx.plan.small_batches, "small-batch")
    if skipped is not None:
        return skipped
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

    def describe(r: _Runs) -> str:
        return (
            f"val acc at batch {big}/{small}: BN {_fmt(final_val_acc(r['bn']))}/"
            f"{_fmt(final_val_acc(r['bn_small']))}, LayerNorm {_fmt(final_val_acc(r['ln']))}/"
            f"{_fmt(final_val_acc(r['ln_small']))}"
        )

    return _bn_minus_other(ctx, "small_batch", needs, lost, ("bn", "ln"), describe)


def _without_extra_runs(
    ctx: _Context, name: str, variants: Sequence[object], what: str
) -> Finding | None:
    """Why the accuracy claim ``name`` on the plan's extra variants (scaled initialisations,
    small batches) cannot be evaluated on this architecture, as its skipped finding, or ``None``:
    a regression task has no accuracy, and ``variants`` may be empty or trained on other
    architectures only (``what`` names them in the reason)."""
    if ctx.task != "classification":
        return _skip(ctx, name, "no accuracy in a regression task")
    extra = ctx.plan.extra_archs
    if not variants or (extra is not None and ctx.arch not in extra):
        return _skip(ctx, name, f"no {what} runs in this plan")
    return None


def _bn_minus_other(
    ctx: _Context,
    name: str,
    needs: dict[str, VariantSpec],
    change: Callable[[_Runs, str, np.random.Generator | None], float],
    kinds: tuple[str, str],
    describe: Callable[[_Runs], str],
) -> Finding:
    """The finding ``name`` whose statistic is ``change(runs, kind, rng)`` (how much a variant
    moves a network's accuracy) of BatchNorm, ``kinds[0]``, minus that of ``kinds[1]``."""
    bn, other = kinds
    return _finding(
        ctx, name, needs, lambda r, rng: change(r, bn, rng) - change(r, other, rng), describe
    )


#: The findings by name (the keys of :data:`CRITERIA`), in the order of the summary.
