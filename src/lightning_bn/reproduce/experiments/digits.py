"""``digits``: a 6×128 MLP and a small CNN on scikit-learn's 1,797 handwritten digits.

The data ship with scikit-learn (offline). The He-initialised standard MLP fits the 1,437
training images within a few hundred steps, after which its gradient (and every landscape
quantity with it) vanishes; the findings therefore decide on the steps before either network
fitted its data (see :mod:`lightning_bn.reproduce.criteria`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bn.reproduce.experiments.base import KINDS, Experiment, PlanDefaults, mlp_or_cnn

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from lightning_bn.reproduce.variants import ExperimentPlan, VariantSpec

__all__ = ["EXPERIMENT"]


def _defaults(quick: bool, archs_given: bool, kinds_given: bool) -> PlanDefaults:
    notes: tuple[str, ...] = ()
    if quick and not archs_given:
        notes = (
            "--quick leaves out the small CNN, trains 300 steps instead of 1000 and 2 seeds "
            "instead of 3; every finding is still evaluated, on the MLP.",
        )
    return PlanDefaults(
        archs=("mlp",) if quick else ("mlp", "cnn"),
        kinds=KINDS,
        lrs=(0.1, 1.0),
        steps=300 if quick else 1000,
        batch_size=64,
        extra_archs=("mlp",),
        notes=notes,
    )


def _model(plan: ExperimentPlan, spec: VariantSpec) -> nn.Module:
    from lightning_bn.experiments import SmallCNN

    return mlp_or_cnn(plan, spec, 64, SmallCNN, (32, 64, 128))


def _data(plan: ExperimentPlan, arch: str, seed: int, batch_size: int) -> pl.LightningDataModule:
    from lightning_bn.experiments import DigitsDataModule

    return DigitsDataModule(batch_size=batch_size, seed=seed, as_images=arch == "cnn")


EXPERIMENT = Experiment(
    name="digits",
    help="scikit-learn's digits (1,797 8×8 images): 6×128 MLP and small CNN, lr 0.1 and 1.0, "
    "1000 steps",
    archs=("mlp", "cnn"),
    defaults=_defaults,
    build_model=_model,
    build_datamodule=_data,
    requires=(("sklearn", "scikit-learn", "pip install 'lightning-bn[examples]'"),),
    quick_help="digits: the MLP only, 300 steps",
)
