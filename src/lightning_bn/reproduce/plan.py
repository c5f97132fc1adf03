"""What ``lightning-bn reproduce`` trains: the variants of each experiment and their budgets.

An :class:`ExperimentPlan` is plain data (it is saved as JSON in the run folder, so
``lightning-bn plot`` can redraw a run without re-running it). :func:`build_plan` fills it in
from an experiment's defaults (:mod:`lightning_bn.reproduce.experiments`: ``mnist1d``, the
default, ``digits``, ``dln``, ``vgg-cifar10``) and the command-line choices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace

from lightning_bn.reproduce.experiments import DEFAULT_EXPERIMENT, REGISTRY, get_experiment
from lightning_bn.reproduce.variants import (
    COMPARED_KINDS,
    INIT_SCALES,
    KINDS,
    MEASUREMENTS_PER_RUN,
    SMALL_BATCH,
    ExperimentPlan,
    VariantSpec,
    _every,
    format_lr,
    kind_norm,
)

__all__ = [
    "ARCHS",
    "COMPARED_KINDS",
    "EXPERIMENTS",
    "FULL_SEEDS",
    "INITS",
    "INIT_SCALES",
    "KINDS",
    "QUICK_SEEDS",
    "SMALL_BATCH",
    "ExperimentPlan",
    "VariantSpec",
    "build_plan",
    "default_jobs",
    "format_lr",
    "kind_norm",
]

#: Experiments of the reproduce command (the registry's names; the first is the default).
EXPERIMENTS: tuple[str, ...] = (
    DEFAULT_EXPERIMENT,
    *(n for n in REGISTRY if n != DEFAULT_EXPERIMENT),
)

#: Architectures of each experiment.
ARCHS: dict[str, tuple[str, ...]] = {name: e.archs for name, e in REGISTRY.items()}

#: Initialisations of ``--init`` (the same names as
#: :data:`lightning_bn.experiments.models.INIT_SCHEMES`, here without importing torch).
INITS: tuple[str, ...] = ("kaiming", "default")


def default_jobs() -> int:
    """Runs at a time by default: 2 (the two cores of a small machine), 1 on a single core."""
    return max(1, min(2, os.cpu_count() or 1))


#: Default number of seeds: ``--quick`` and the full run.
QUICK_SEEDS, FULL_SEEDS = 2, 3


def build_plan(
    experiment: str = DEFAULT_EXPERIMENT,
    *,
    quick: bool = False,
    steps: int | None = None,
    lrs: Sequence[float] | None = None,
    seed: int = 0,
    seeds: int | None = None,
    init: str = "kaiming",
    kinds: Sequence[str] | None = None,
    archs: Sequence[str] | None = None,
    measure_every: int | None = None,
    data_dir: str | None = None,
    accelerator: str | None = None,
    threads: int | None = 1,
    tiny: bool = False,
) -> ExperimentPlan:
    """The plan of one reproduce run, from the command-line choices.

    Defaults per experiment (``quick`` in brackets; each experiment module of
    :mod:`lightning_bn.reproduce.experiments` holds its own):

    =========== ============== ============================ ============ ========== ========
    experiment  architectures  variants                     lrs          steps      seeds
    =========== ============== ============================ ============ ========== ========
    mnist1d     mlp, cnn [mlp] all seven at 0.1; standard   0.1, 1.0     2000       3 [2]
                               and BN at 1.0; init ×0.25,                [1000]
                               ×4 and batch 4 (MLP only)
    digits      mlp, cnn [mlp] as mnist1d                   0.1, 1.0     1000 [300] 3 [2]
    dln         dln            standard, batchnorm          1e-6         10000      3 [2]
                                                                         [1000]
    vgg-cifar10 vgg            all seven [standard, BN,     0.1, 0.5     15000      3 [2]
                               noisy BN]; init and batch                 [500]
                               variants
    =========== ============== ============================ ============ ========== ========

    Only the standard and BatchNorm runs at the default scale and batch size carry the
    diagnostic callbacks (the findings compare those two); the diagnostics measure about 20
    times per run (``measure_every = steps // 20``). Every variant is trained once per seed.

    Args:
        experiment: one of :data:`EXPERIMENTS`.
        quick: the reduced budget.
        steps: optimiser steps per run (overrides the default).
        lrs: learning rates (overrides the default; sorted, duplicates removed).
        seed: the base seed (runs use ``seed, seed + 1, …``).
        seeds: number of seeds (default 2 with ``quick``, else 3).
        init: ``"kaiming"`` (He initialisation, the fair baseline) or ``"default"`` (PyTorch's,
            on which the deep standard MLP sits on a loss plateau).
        kinds: variant kinds to train (default above).
        archs: architectures to train (default above).
        measure_every: steps between diagnostic measurements (default ``steps // 20``).
        data_dir: the CIFAR-10 folder.
        accelerator: Lightning accelerator (default ``"cpu"``, ``"auto"`` for VGG).
        threads: torch intra-op threads on CPU per run (``None``: leave torch's setting).
        tiny: tiny models and few measurements, for tests.

    Returns:
        The plan.

    Raises:
        ValueError: an unknown experiment, kind, architecture or initialisation, or a value out
            of range.
    """
    exp = get_experiment(experiment)
    if init not in INITS:
        raise ValueError(f"Expected `init` to be one of {', '.join(INITS)}, but got {init!r}")
    defaults = exp.defaults(quick, bool(archs), bool(kinds))
    notes = list(defaults.notes)
    init_scales, small_batches = defaults.init_scales, defaults.small_batches
    extra_archs = defaults.extra_archs
    default_archs, default_kinds = defaults.archs, defaults.kinds
    chosen_archs = tuple(archs) if archs else default_archs
    for arch in chosen_archs:
        if arch not in ARCHS[experiment]:
            raise ValueError(
                f"Expected architectures of {experiment!r}, among {', '.join(ARCHS[experiment])},"
                f" but got {arch!r}"
            )
    chosen_kinds = tuple(k for k in KINDS if k in set(kinds)) if kinds else default_kinds
    for kind in kinds or ():
        kind_norm(kind)
    if "layernorm" not in chosen_kinds or "batchnorm" not in chosen_kinds:
        small_batches = ()
    if "standard" not in chosen_kinds or "batchnorm" not in chosen_kinds:
        init_scales = ()
    chosen_lrs = tuple(sorted({float(v) for v in lrs})) if lrs else defaults.lrs
    for lr in chosen_lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"Expected learning rates > 0, but got {lr!r}")
    n_steps = defaults.steps if steps is None else int(steps)
    if n_steps < 1:
        raise ValueError(f"Expected `steps` >= 1, but got {steps!r}")
    n_seeds = (QUICK_SEEDS if quick else FULL_SEEDS) if seeds is None else int(seeds)
    if n_seeds < 1:
        raise ValueError(f"Expected `seeds` >= 1, but got {seeds!r}")
    per_run = 4 if tiny else MEASUREMENTS_PER_RUN
    every = measure_every if measure_every is not None else _every(n_steps, per_run)
    if every < 1:
        raise ValueError(f"Expected `measure_every` >= 1, but got {measure_every!r}")
    if extra_archs is not None:
        extra_archs = tuple(a for a in chosen_archs if a in extra_archs) or None
        if extra_archs is None:  # e.g. --archs cnn: the extra variants go on the CNN
            extra_archs = chosen_archs
    plan = ExperimentPlan(
        experiment=experiment,
        archs=chosen_archs,
        kinds=chosen_kinds,
        lrs=chosen_lrs,
        steps=n_steps,
        batch_size=16 if tiny and defaults.batch_size > 64 else defaults.batch_size,
        measure_every=every,
        log_every=max(1, n_steps // 200),
        power_iters=3 if tiny else 20,
        step_sizes=defaults.step_sizes,
        seed=int(seed),
        seeds=n_seeds,
        init=init,
        init_scales=init_scales,
        small_batches=small_batches,
        extra_archs=extra_archs,
        large_lr_kinds=defaults.large_lr_kinds,
        diagnose_kinds=COMPARED_KINDS,
        quick=quick,
        tiny=tiny,
        data_dir=data_dir,
        accelerator=accelerator or defaults.accelerator,
        threads=threads,
        task=exp.task,
        n_samples=min(64 if exp.task == "regression" else 600, defaults.n_samples)
        if tiny
        else defaults.n_samples,
        val_every_steps=max(1, n_steps // 20),
        notes=tuple(notes),
    )
    return plan if not tiny else replace(plan, notes=(*plan.notes, "tiny models (test mode)."))
