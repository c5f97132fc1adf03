"""Data of the built-in experiments: scikit-learn digits, MNIST-1D, the deep linear problem,
CIFAR-10 files.

Everything here works offline: the digits ship with scikit-learn, MNIST-1D is generated on the
machine (and cached), the deep linear problem is synthetic, and CIFAR-10 is read from the
standard python-pickle batch files in a folder the user names (nothing is downloaded).

One module per data set: :mod:`.digits`, :mod:`.mnist1d`, :mod:`.dln` (deep linear network),
:mod:`.cifar10`; every name is also importable from here, as before the split.
"""

from lightning_bn.experiments.data.cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    CIFAR10DataModule,
    find_cifar10_dir,
    random_crop_flip,
    read_cifar10_batch,
    write_cifar10_like,
)
from lightning_bn.experiments.data.digits import DigitsDataModule
from lightning_bn.experiments.data.dln import (
    DeepLinearData,
    DeepLinearDataModule,
    make_deep_linear_data,
)
from lightning_bn.experiments.data.mnist1d import MNIST1DDataModule, load_mnist1d

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_TEST_FILE",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10DataModule",
    "DeepLinearData",
    "DeepLinearDataModule",
    "DigitsDataModule",
    "MNIST1DDataModule",
    "find_cifar10_dir",
    "load_mnist1d",
    "make_deep_linear_data",
    "random_crop_flip",
    "read_cifar10_batch",
    "write_cifar10_like",
]
