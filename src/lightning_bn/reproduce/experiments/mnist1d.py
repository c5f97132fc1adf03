"""``mnist1d`` (the default experiment): a 6×128 MLP and a small 1-D CNN on MNIST-1D.

MNIST-1D (Greydanus 2020) is the testbed in the regime where the paper states its landscape
claims: "especially in the initial phases of training". With the 16,000 training samples of the
default 20,000 generated ones, the He-initialised standard MLP at lr 0.1 is still far from
fitting them at the end of the run (its training loss stays well above zero), so every measured
step compares two networks that are still learning, unlike the 1,437 digits images, which the
standard MLP fits within a few hundred steps.

The plan follows the paper's learning-rate logic: a base lr (0.1) at which the standard network
trains, and a larger one (1.0) at which it diverges and BatchNorm does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bn.reproduce.experiments.base import KINDS, Experiment, PlanDefaults, mlp_or_cnn

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from lightning_bn.reproduce.variants import ExperimentPlan, VariantSpec

__all__ = ["EXPERIMENT", "FULL_STEPS", "QUICK_STEPS", "SAMPLES"]

#: Samples generated (80% training): enough that the standard MLP does not fit them in the run.
SAMPLES = 20_000
#: Steps per run: ``--quick`` and the full run (2.4 and 6 passes over the 16,000 training
#: samples at batch 64); the standard MLP is still far from fitting them after either.
QUICK_STEPS, FULL_STEPS = 600, 1500


def _defaults(quick: bool, archs_given: bool, kinds_given: bool) -> PlanDefaults:
    notes: tuple[str, ...] = ()
    if quick and not archs_given:
        notes = (
            f"--quick leaves out the 1-D CNN, trains {QUICK_STEPS} steps instead of "
            f"{FULL_STEPS} and 2 seeds instead of 3; every finding is still evaluated, on the "
            "MLP.",
        )
    return PlanDefaults(
        archs=("mlp",) if quick else ("mlp", "cnn"),
        kinds=KINDS,
        lrs=(0.1, 1.0),
        steps=QUICK_STEPS if quick else FULL_STEPS,
        batch_size=64,
        extra_archs=("mlp",),
        n_samples=SAMPLES,
        notes=notes,
    )


def _model(plan: ExperimentPlan, spec: VariantSpec) -> nn.Module:
    from lightning_bn.experiments.cnn1d import SmallCNN1d

    return mlp_or_cnn(plan, spec, 40, SmallCNN1d, (32, 64, 64))


def _data(plan: ExperimentPlan, arch: str, seed: int, batch_size: int) -> pl.LightningDataModule:
    from lightning_bn.experiments.data.mnist1d import MNIST1DDataModule

    return MNIST1DDataModule(
        batch_size=batch_size, seed=seed, num_samples=plan.n_samples, as_signals=arch == "cnn"
    )


EXPERIMENT = Experiment(
    name="mnist1d",
    help="MNIST-1D (20,000 generated 1-D signals, cached): 6×128 MLP and 1-D CNN, lr 0.1 "
    f"and 1.0, {FULL_STEPS} steps",
    archs=("mlp", "cnn"),
    defaults=_defaults,
    build_model=_model,
    build_datamodule=_data,
    requires=(("mnist1d", "mnist1d", "pip install mnist1d"),),
    quick_help=f"mnist1d: the MLP only, {QUICK_STEPS} steps",
)
