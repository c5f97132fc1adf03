"""``dln``: the paper's deep linear network (25 layers of 10×10, full-batch gradient descent)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lightning_bn.reproduce.experiments.base import Experiment, PlanDefaults

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from lightning_bn.reproduce.variants import ExperimentPlan, VariantSpec

__all__ = ["EXPERIMENT", "dln_step_sizes"]


def dln_step_sizes(n: int = 12) -> tuple[float, ...]:
    """The η grid relative to the lr: ``n`` log-spaced values over ``[1/100, 30]`` (spec §2)."""
    lo, hi = math.log(0.01), math.log(30.0)
    return tuple(round(math.exp(lo + (hi - lo) * i / (n - 1)), 6) for i in range(n))


def _defaults(quick: bool, archs_given: bool, kinds_given: bool) -> PlanDefaults:
    # Full-batch gradient descent on a fixed problem: no batch size to vary, and the network has
    # its own initialisation (DeepLinearNetwork).
    return PlanDefaults(
        archs=("dln",),
        kinds=("standard", "batchnorm"),
        lrs=(1e-6,),
        steps=1000 if quick else 10_000,
        batch_size=1000,
        init_scales=(),
        small_batches=(),
        step_sizes=dln_step_sizes(),
        n_samples=1000,
    )


def _model(plan: ExperimentPlan, spec: VariantSpec) -> nn.Module:
    from lightning_bn.experiments import DeepLinearNetwork

    return DeepLinearNetwork(
        depth=4 if plan.tiny else 25, width=10, norm=spec.norm, init_scale=spec.init_scale
    )


def _data(plan: ExperimentPlan, arch: str, seed: int, batch_size: int) -> pl.LightningDataModule:
    from lightning_bn.experiments import DeepLinearDataModule

    return DeepLinearDataModule(
        n_samples=plan.n_samples, dim=10, seed=seed, steps_per_epoch=plan.val_every_steps
    )


EXPERIMENT = Experiment(
    name="dln",
    help="deep linear network (25 layers of 10×10, full-batch gradient descent, lr 1e-6), "
    "10000 steps",
    archs=("dln",),
    defaults=_defaults,
    build_model=_model,
    build_datamodule=_data,
    task="regression",
    quick_help="dln: 1000 steps",
)
