"""Data of the built-in experiments: scikit-learn digits, MNIST-1D, the deep linear problem,
CIFAR-10 files.

Everything here works offline: the digits ship with scikit-learn, MNIST-1D is generated on the
machine (and cached), the deep linear problem is synthetic, and CIFAR-10 is read from the
standard python-pickle batch files in a folder the user names (nothing is downloaded).

One module per data set: :mod:`.digits`, :mod:`.mnist1d`, :mod:`.dln` (deep linear network),
:mod:`.cifar10`; every name is also importable from here, as before the split.
"""

from lightning_bn.experiments.data import cifar10
from lightning_bn.experiments.data.cifar10 import *  # noqa: F403  (re-exported: cifar10.__all__)
from lightning_bn.experiments.data.digits import DigitsDataModule
from lightning_bn.experiments.data.dln import (
    DeepLinearData,
    DeepLinearDataModule,
    make_deep_linear_data,
)
from lightning_bn.experiments.data.mnist1d import MNIST1DDataModule, load_mnist1d

__all__ = [
    "DeepLinearData",
    "DeepLinearDataModule",
    "DigitsDataModule",
    "MNIST1DDataModule",
    "load_mnist1d",
    "make_deep_linear_data",
]
__all__ += cifar10.__all__
