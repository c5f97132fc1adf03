"""scikit-learn's handwritten digits as a LightningDataModule (shipped with scikit-learn, offline)."""

from __future__ import annotations

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

__all__ = ["DigitsDataModule"]


class DigitsDataModule(_ArraysDataModule):
    """scikit-learn's handwritten digits (1797 real 8×8 grey images, 10 classes) for Lightning.

    Pixels (0-16) are scaled to [0, 1], then standardised per pixel with the mean and the (biased)
    standard deviation of the *training* split; a pixel that is constant over the training split
    keeps its centred value (its standard deviation is replaced by 1). The train/validation split
    is stratified by class and depends on ``seed`` only (``sklearn.model_selection
    .train_test_split``); the training order is shuffled with a private generator seeded with
    ``seed``, so it does not depend on the global RNG.

    Attributes after :meth:`setup`: ``train_dataset`` and ``val_dataset`` (``TensorDataset`` of
    float32 inputs and int64 labels), ``train_indices`` and ``val_indices`` (rows of
    ``load_digits()``), ``mean`` and ``std`` (float64 numpy arrays of shape ``(64,)``, statistics of
    the scaled training pixels).

    Args:
        batch_size: samples per training and validation batch.
        val_fraction: share of the 1797 samples held out for validation, in (0, 1).
        seed: seed of the split and of the shuffling.
        as_images: yield ``(N, 1, 8, 8)`` images instead of flat ``(N, 64)`` vectors.
        num_workers: worker processes of the data loaders.

    Raises:
        ValueError: an argument outside its range.

    Example:
        >>> dm = DigitsDataModule(batch_size=32, as_images=True)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), x.dtype, y.dtype
        ((32, 1, 8, 8), torch.float32, torch.int64)
    """

    num_classes: int = 10
    num_features: int = 64
    image_shape: tuple[int, int, int] = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        as_images: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = _check_positive_int("batch_size", batch_size)
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not 0 < val_fraction < 1
        ):
            raise ValueError(
                f"Expected argument `val_fraction` to be a number in (0, 1), but got {val_fraction!r}"
            )
        self.val_fraction = float(val_fraction)
        self.seed = _check_seed(seed)
        self.as_images = check_bool("as_images", as_images)
        self.num_workers = _check_non_negative_int("num_workers", num_workers)
        self.save_hyperparameters()
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample: ``(1, 8, 8)`` with ``as_images``, else ``(64,)``."""
        return self.image_shape if self.as_images else (self.num_features,)

    def setup(self, stage: str | None = None) -> None:
        """Load the digits, split them and standardise with the training statistics (idempotent)."""
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.asarray(digits.data, dtype=np.float64) / 16.0
        labels = np.asarray(digits.target, dtype=np.int64)
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)),
            test_size=self.val_fraction,
            stratify=labels,
            random_state=self.seed,
        )
        train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
        mean = images[train_idx].mean(axis=0)
        std = images[train_idx].std(axis=0)
        std = np.where(std > 0, std, 1.0)
        self.train_indices, self.val_indices = train_idx, val_idx
        self.mean, self.std = mean, std
        self.train_dataset = self._dataset((images[train_idx] - mean) / std, labels[train_idx])
        self.val_dataset = self._dataset((images[val_idx] - mean) / std, labels[val_idx])

    def _dataset(self, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        inputs = torch.as_tensor(x, dtype=torch.float32)
        if self.as_images:
            inputs = inputs.reshape(-1, *self.image_shape)
        return TensorDataset(inputs.contiguous(), torch.as_tensor(y, dtype=torch.int64))
