"""``vgg-cifar10``: VGG-11 on CIFAR-10 files from a folder the user names (meant for a GPU)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lightning_bn.reproduce.experiments.base import KINDS, Experiment, PlanDefaults

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from lightning_bn.reproduce.variants import ExperimentPlan, VariantSpec

__all__ = ["EXPERIMENT"]


def _defaults(quick: bool, archs_given: bool, kinds_given: bool) -> PlanDefaults:
    notes: tuple[str, ...] = ()
    if quick and not kinds_given:
        notes = (
            "--quick trains the standard, BatchNorm and noisy-BatchNorm VGG only; the "
            "ℓp-norm and batch-size findings need the full run.",
        )
    return PlanDefaults(
        archs=("vgg",),
        kinds=("standard", "batchnorm", "noisy-batchnorm") if quick else KINDS,
        lrs=(0.1, 0.5),
        steps=500 if quick else 15_000,
        batch_size=128,
        accelerator="auto",
        notes=notes,
    )


def _model(plan: ExperimentPlan, spec: VariantSpec) -> nn.Module:
    from lightning_bn.experiments import VGG, init_weights_

    cfg: str | list[int | str] = [8, "M", 16, "M"] if plan.tiny else "vgg11"
    return init_weights_(VGG(cfg, norm=spec.norm), plan.init, spec.init_scale)


def _data(plan: ExperimentPlan, arch: str, seed: int, batch_size: int) -> pl.LightningDataModule:
    from lightning_bn.experiments import CIFAR10DataModule

    if plan.data_dir is None:
        raise ValueError("vgg-cifar10 needs a CIFAR-10 folder (data_dir)")
    workers = 0 if plan.tiny or plan.accelerator == "cpu" else min(4, os.cpu_count() or 1)
    return CIFAR10DataModule(plan.data_dir, batch_size=batch_size, seed=seed, num_workers=workers)


def _check_data_dir(data_dir: str) -> str:
    from lightning_bn.experiments import CIFAR10DataModule

    try:
        CIFAR10DataModule(data_dir).setup("fit")
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"--data-dir: {err}") from None
    return str(data_dir)


EXPERIMENT = Experiment(
    name="vgg-cifar10",
    help="VGG-11 on CIFAR-10 files from --data-dir (nothing is downloaded), lr 0.1 and 0.5, "
    "15000 steps",
    archs=("vgg",),
    defaults=_defaults,
    build_model=_model,
    build_datamodule=_data,
    data_dir_help="the folder with the CIFAR-10 python batch files (data_batch_1..5, "
    "test_batch); nothing is downloaded",
    check_data_dir=_check_data_dir,
    reuse_data=True,
    quick_help="vgg-cifar10: standard, BN and noisy BN, 500 steps",
)
