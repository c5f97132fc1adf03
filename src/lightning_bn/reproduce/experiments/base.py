"""What an experiment of ``lightning-bn reproduce`` is: one :class:`Experiment` per module.

An experiment module (:mod:`.mnist1d`, :mod:`.digits`, :mod:`.dln`, :mod:`.vgg_cifar10`) defines
its data, its models, its default plan (:class:`PlanDefaults`), the findings it evaluates and
its command-line help, and registers one :class:`Experiment`; the plan, the runner and the
command read that registry (:mod:`lightning_bn.reproduce.experiments`) and nothing else, so a new
experiment is a new module and one line in the registry.

This module and the experiment modules import neither torch nor Lightning at import time (the
command's ``--help`` and the plan stay light); the model and data builders import them when
called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from lightning_bn.reproduce.variants import ExperimentPlan, VariantSpec

__all__ = [
    "COMPARED_KINDS",
    "INIT_SCALES",
    "KINDS",
    "SMALL_BATCH",
    "Experiment",
    "PlanDefaults",
    "mlp_or_cnn",
]

from lightning_bn.reproduce.variants import COMPARED_KINDS, INIT_SCALES, KINDS, SMALL_BATCH


@dataclass(frozen=True)
class PlanDefaults:
    """An experiment's default plan for one budget (see
    :class:`~lightning_bn.reproduce.plan.ExperimentPlan` for the meaning of each field).

    Attributes:
        archs: architectures trained by default.
        kinds: variant kinds trained by default.
        lrs: learning rates (the first is the base one).
        steps: optimiser steps per run.
        batch_size: samples per batch.
        accelerator: Lightning accelerator.
        init_scales: scales of the initial weights of the initialisation finding.
        small_batches: batch sizes of the batch-size finding.
        extra_archs: architectures carrying the initialisation and batch-size variants.
        large_lr_kinds: kinds trained at the larger learning rates.
        step_sizes: the η grid relative to the lr (``None``: the callbacks' default).
        n_samples: samples of a generated data set.
        notes: lines the summary repeats (what the budget leaves out).
    """

    archs: tuple[str, ...]
    kinds: tuple[str, ...]
    lrs: tuple[float, ...]
    steps: int
    batch_size: int
    accelerator: str = "cpu"
    init_scales: tuple[float, ...] = INIT_SCALES
    small_batches: tuple[int, ...] = (SMALL_BATCH,)
    extra_archs: tuple[str, ...] | None = None
    large_lr_kinds: tuple[str, ...] | None = COMPARED_KINDS
    step_sizes: tuple[float, ...] | None = None
    n_samples: int = 1000
    notes: tuple[str, ...] = ()


#: ``defaults(quick, archs_given, kinds_given) -> PlanDefaults``.
DefaultsFn = Callable[[bool, bool, bool], PlanDefaults]
ModelFn = Callable[["ExperimentPlan", "VariantSpec"], "nn.Module"]
DataFn = Callable[["ExperimentPlan", str, int, int], "pl.LightningDataModule"]


@dataclass(frozen=True)
class Experiment:
    """One experiment of ``lightning-bn reproduce``.

    Attributes:
        name: the command-line name (``"mnist1d"``).
        help: one line for ``lightning-bn reproduce --help``: the data, the networks, the budget.
        archs: the architectures it can train.
        defaults: its default plan for a budget (``quick``, and whether the user chose the
            architectures or the variants).
        build_model: the network of a variant (same initialisation for every norm kind).
        build_datamodule: the data of an architecture ``(plan, arch, seed, batch_size)``.
        task: ``"classification"`` or ``"regression"``.
        requires: ``(module, name, install)`` of what the experiment imports besides the
            package's own dependencies: the module, its distribution name and how to install it.
        data_dir_help: what ``--data-dir`` means for it (``None``: it takes no ``--data-dir``).
        check_data_dir: checks the folder before anything is written (raises ``ValueError``
            with a one-line reason) and returns it as the plan stores it.
        findings: the findings it evaluates (``None``: all of them).
        reuse_data: build the data once per seed and batch size and share it between runs in
            one process (data read from files).
        quick_help: what ``--quick`` trains, for the command's help.
    """

    name: str
    help: str
    archs: tuple[str, ...]
    defaults: DefaultsFn
    build_model: ModelFn
    build_datamodule: DataFn
    task: str = "classification"
    requires: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)
    data_dir_help: str | None = None
    check_data_dir: Callable[[str], str] | None = None
    findings: tuple[str, ...] | None = None
    reuse_data: bool = False
    quick_help: str = ""


def mlp_or_cnn(
    plan: ExperimentPlan,
    spec: VariantSpec,
    n_inputs: int,
    cnn: Callable[..., nn.Module],
    cnn_widths: tuple[int, ...],
) -> nn.Module:
    """The classification models of the digits and MNIST-1D testbeds: for ``spec.arch`` ``"mlp"``
    a 6×128 MLP on ``n_inputs`` features, for ``"cnn"`` ``cnn(norm=..., widths=cnn_widths)``
    (a 16-16 MLP and widths 4-8 in a tiny plan), 10 classes, initialised by ``plan.init`` at
    ``spec.init_scale``.

    Raises:
        ValueError: another architecture.
    """
    from lightning_bn.experiments import MLP, init_weights_

    model: nn.Module
    if spec.arch == "mlp":
        model = MLP(n_inputs, (16, 16) if plan.tiny else (128,) * 6, 10, norm=spec.norm)
    elif spec.arch == "cnn":
        model = cnn(norm=spec.norm, widths=(4, 8) if plan.tiny else cnn_widths)
    else:
        raise ValueError(f"Unknown architecture {spec.arch!r} of {plan.experiment}")
    return init_weights_(model, plan.init, spec.init_scale)
