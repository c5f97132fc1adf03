"""Built-in experiments of the paper: data, models and LightningModules."""

from lightning_bn.experiments.cnn1d import SmallCNN1d
from lightning_bn.experiments.data import (
    CIFAR10DataModule,
    DeepLinearData,
    DeepLinearDataModule,
    DigitsDataModule,
    MNIST1DDataModule,
    load_mnist1d,
    make_deep_linear_data,
    read_cifar10_batch,
    write_cifar10_like,
)
from lightning_bn.experiments.deep_linear import DeepLinearNetwork
from lightning_bn.experiments.models import (
    INIT_SCHEMES,
    MLP,
    VGG,
    VGG_CONFIGS,
    SmallCNN,
    init_weights_,
)
from lightning_bn.experiments.modules import (
    ClassificationModule,
    RegressionModule,
    squared_error_loss,
)

__all__ = [
    "INIT_SCHEMES",
    "MLP",
    "VGG",
    "VGG_CONFIGS",
    "CIFAR10DataModule",
    "ClassificationModule",
    "DeepLinearData",
    "DeepLinearDataModule",
    "DeepLinearNetwork",
    "DigitsDataModule",
    "MNIST1DDataModule",
    "RegressionModule",
    "SmallCNN",
    "SmallCNN1d",
    "init_weights_",
    "load_mnist1d",
    "make_deep_linear_data",
    "read_cifar10_batch",
    "squared_error_loss",
    "write_cifar10_like",
]
