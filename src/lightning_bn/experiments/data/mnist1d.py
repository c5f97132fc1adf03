"""MNIST-1D (Greydanus 2020) as a LightningDataModule, generated offline and cached.

MNIST-1D is a procedurally generated classification problem: each sample is one of ten 1-D
templates, padded, sheared, scaled, translated and mixed with correlated and i.i.d. noise, then
resampled to 40 points. It was designed for small-scale science of deep learning: MLPs reach
about 60-70% and 1-D CNNs 90%+ test accuracy, and, with enough samples, a network's training loss
stays well above zero for thousands of steps (it does not memorise its data early, as networks
on scikit-learn's 1,797 digits do within a few hundred steps).

The arrays come from the ``mnist1d`` package's own generator (``mnist1d.data.make_dataset``,
never its download path), run once per set of generator arguments and cached as ``.npz`` in the
user's cache folder (``$XDG_CACHE_HOME/lightning-bn/mnist1d``, ``~/.cache/lightning-bn/mnist1d``
without it), keyed by a hash of the arguments. The file is written to a temporary name and
renamed, so an interrupted generation never leaves half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_bn._validation import check_bool
from lightning_bn.experiments.data._common import (
    _ArraysDataModule,
    _check_non_negative_int,
    _check_positive_int,
    _check_seed,
)

__all__ = [
    "MNIST1D_DEFAULT_SAMPLES",
    "MNIST1D_SEED",
    "MNIST1DDataModule",
    "load_mnist1d",
    "mnist1d_args",
    "mnist1d_cache_dir",
]

#: Samples generated (train and test together) by default: with 16,000 training samples the
#: standard 6×128 MLP at lr 0.1 is still far from fitting them after 2,000 steps (with 5,000 it
#: fits them near step 1,450).
MNIST1D_DEFAULT_SAMPLES = 20_000
#: Seed of the generator (the ``mnist1d`` package's default): every run sees the same data set.
MNIST1D_SEED = 42

_MISSING = "MNIST-1D needs the `mnist1d` package: pip install mnist1d"


def mnist1d_args(num_samples: int = MNIST1D_DEFAULT_SAMPLES, seed: int = MNIST1D_SEED) -> dict:
    """The generator's arguments: the package's defaults with ``num_samples`` and ``seed``.

    The download address (``url``) is left out: nothing is downloaded.

    Raises:
        ImportError: the ``mnist1d`` package is not installed (one line saying so).
    """
    try:
        from mnist1d.data import get_dataset_args
    except ImportError:
        raise ImportError(_MISSING) from None
    args = dict(get_dataset_args(as_dict=True))
    args.pop("url", None)
    args["num_samples"] = _check_positive_int("num_samples", num_samples)
    args["seed"] = _check_seed(seed)
    return args


def mnist1d_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning-bn/mnist1d`` (``~/.cache/...`` when the variable is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lightning-bn" / "mnist1d"


def _key(args: Mapping[str, Any]) -> str:
    text = json.dumps(dict(args), sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _global_rng_kept() -> Any:
    # make_dataset seeds numpy's and Python's global generators; put them back afterwards, so
    # that generating the data does not change anything else the process draws.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _generate(args: Mapping[str, Any]) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ImportError(_MISSING) from None
    view = get_dataset_args()
    for name, value in args.items():
        setattr(view, name, value)
    with _global_rng_kept():
        data = make_dataset(view)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def load_mnist1d(
    num_samples: int = MNIST1D_DEFAULT_SAMPLES,
    seed: int = MNIST1D_SEED,
    cache_dir: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """The MNIST-1D arrays, from the cache or generated (then cached).

    Args:
        num_samples: samples generated, split 80/20 into training and test samples.
        seed: seed of the generator.
        cache_dir: the cache folder (default :func:`mnist1d_cache_dir`).

    Returns:
        ``{"x": (n_train, 40) float32, "y": (n_train,) int64, "x_test", "y_test"}``.

    Raises:
        ImportError: the ``mnist1d`` package is not installed and the arrays are not cached.
    """
    args = mnist1d_args(num_samples, seed)
    folder = Path(cache_dir) if cache_dir is not None else mnist1d_cache_dir()
    path = folder / f"mnist1d-{_key(args)}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                return {k: stored[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache file is regenerated
    data = _generate(args)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".mnist1d-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            arrays: dict[str, Any] = {**data, "args": np.asarray(json.dumps(args, sort_keys=True))}
            np.savez(file, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return data


class MNIST1DDataModule(_ArraysDataModule):
    """MNIST-1D for Lightning: 40-point 1-D signals, 10 classes, the generator's own split.

    The data set is fixed by ``num_samples`` and ``data_seed`` (the generator's arguments); the
    training order is shuffled with a private generator seeded with ``seed``. The generator
    already centres the signals and scales them to unit standard deviation.

    Args:
        batch_size: samples per training and validation batch.
        seed: seed of the shuffling.
        num_samples: samples generated (80% training, 20% validation).
        data_seed: seed of the generator.
        as_signals: yield ``(N, 1, 40)`` signals (for a 1-D CNN) instead of ``(N, 40)`` vectors.
        num_workers: worker processes of the data loaders.
        cache_dir: the cache folder (default :func:`mnist1d_cache_dir`).

    Raises:
        ValueError: an argument outside its range.
        ImportError: (in :meth:`setup`) ``mnist1d`` missing and the arrays not cached.
    """

    num_classes: int = 10
    num_features: int = 40

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        num_samples: int = MNIST1D_DEFAULT_SAMPLES,
        data_seed: int = MNIST1D_SEED,
        as_signals: bool = False,
        num_workers: int = 0,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.seed = _check_seed(seed)
        self.num_samples = _check_positive_int("num_samples", num_samples)
        self.data_seed = _check_seed(data_seed)
        self.as_signals = check_bool("as_signals", as_signals)
        self.num_workers = _check_non_negative_int("num_workers", num_workers)
        self.cache_dir = cache_dir
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample: ``(1, 40)`` with ``as_signals``, else ``(40,)``."""
        return (1, self.num_features) if self.as_signals else (self.num_features,)

    def setup(self, stage: str | None = None) -> None:
        """Load (or generate) the arrays (idempotent)."""
        if self.train_dataset is not None:
            return
        data = load_mnist1d(self.num_samples, self.data_seed, self.cache_dir)
        self.train_dataset = self._dataset(data["x"], data["y"])
        self.val_dataset = self._dataset(data["x_test"], data["y_test"])

    def _dataset(self, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        inputs = torch.as_tensor(x, dtype=torch.float32).reshape(-1, *self.input_shape)
        return TensorDataset(inputs.contiguous(), torch.as_tensor(y, dtype=torch.int64))
