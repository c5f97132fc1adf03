"""The synthetic regression problem of the paper's deep linear network experiments."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_bn.experiments.data._common import (
    _check_positive_int,
    _check_seed,
)

__all__ = ["DeepLinearData", "DeepLinearDataModule", "make_deep_linear_data"]


@dataclass(frozen=True)
class DeepLinearData:
    """The deep linear network problem of the paper (spec §6): recover ``A`` from ``(x, A x)``.

    Attributes:
        A: the target map, ``(dim, dim)``, entries i.i.d. ``N(0, 1)``.
        x: inputs, ``(n_samples, dim)``, entries i.i.d. ``N(0, 1)``.
        y: targets ``A x`` for every sample, ``(n_samples, dim)`` (``y = x @ A.T`` row-wise).
    """

    A: Tensor
    x: Tensor
    y: Tensor


def make_deep_linear_data(
    n_samples: int = 1000,
    dim: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DeepLinearData:
    """Draw ``A`` and ``x`` from a seeded generator and return them with the targets ``A x``.

    ``A`` is drawn first, then ``x`` (both standard Gaussian, drawn in float64 and cast to
    ``dtype``), so the same seed gives the same ``A`` for any ``n_samples``.

    Args:
        n_samples: number of samples ``n`` (the full batch).
        dim: dimension of ``x`` and of the square matrix ``A``.
        seed: seed of the private generator.
        dtype: floating dtype of the returned tensors.

    Returns:
        :class:`DeepLinearData` with ``A`` ``(dim, dim)``, ``x`` and ``y`` ``(n_samples, dim)``.

    Raises:
        ValueError: a non-positive size or a negative seed.

    Example:
        >>> data = make_deep_linear_data(n_samples=5, dim=3)
        >>> torch.allclose(data.y, data.x @ data.A.T)
        True
    """
    _check_positive_int("n_samples", n_samples)
    _check_positive_int("dim", dim)
    _check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    x = torch.randn(n_samples, dim, generator=gen, dtype=torch.float64)
    y = x @ a.T
    return DeepLinearData(A=a.to(dtype), x=x.to(dtype), y=y.to(dtype))


class _RepeatedBatch(Dataset):
    """A map-style dataset whose every item is the same full batch ``(x, y)``."""

    def __init__(self, x: Tensor, y: Tensor, length: int) -> None:
        self.x, self.y, self.length = x, y, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.x, self.y


class DeepLinearDataModule(pl.LightningDataModule):
    """Full-batch data of the deep linear network experiment (spec §6).

    The training loader yields the same full batch ``(x, A x)`` at each of its ``steps_per_epoch``
    steps (``batch_size=None``: no collation, no shuffling), so a ``Trainer`` with
    ``max_steps=10_000`` runs 10k steps of full-batch gradient descent. The validation loader
    yields the same batch once (with BatchNorm, this evaluates the network with its running
    statistics).

    Args:
        n_samples: number of samples in the full batch.
        dim: dimension of ``x`` and ``A``.
        seed: seed of ``A`` and ``x`` (see :func:`make_deep_linear_data`).
        steps_per_epoch: training steps per epoch.

    Raises:
        ValueError: an argument outside its range.

    Example:
        >>> dm = DeepLinearDataModule(n_samples=8, dim=3, steps_per_epoch=2)
        >>> [tuple(x.shape) for x, _ in dm.train_dataloader()]
        [(8, 3), (8, 3)]
    """

    def __init__(
        self,
        n_samples: int = 1000,
        dim: int = 10,
        seed: int = 0,
        steps_per_epoch: int = 100,
    ) -> None:
        super().__init__()
        self.n_samples = _check_positive_int("n_samples", n_samples)
        self.dim = _check_positive_int("dim", dim)
        self.seed = _check_seed(seed)
        self.steps_per_epoch = _check_positive_int("steps_per_epoch", steps_per_epoch)
        self.save_hyperparameters()
        self.data = make_deep_linear_data(n_samples, dim, seed)

    def train_dataloader(self) -> DataLoader:
        """``steps_per_epoch`` copies of the full batch ``(x, y)``."""
        return DataLoader(
            _RepeatedBatch(self.data.x, self.data.y, self.steps_per_epoch), batch_size=None
        )

    def val_dataloader(self) -> DataLoader:
        """The full batch, once."""
        return DataLoader(_RepeatedBatch(self.data.x, self.data.y, 1), batch_size=None)
