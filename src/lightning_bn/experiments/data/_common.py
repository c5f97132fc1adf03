"""Pieces shared by the built-in data modules: argument checks, batch trimming, seeded shuffling,
the data loaders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn._validation import check_int


def _check_positive_int(name: str, value: Any) -> int:
    return check_int(name, value, minimum=1)


def _check_non_negative_int(name: str, value: Any) -> int:
    return check_int(name, value, minimum=0)


def _check_seed(value: Any) -> int:
    # torch.Generator.manual_seed takes a 64-bit seed: larger ones overflow inside torch
    return check_int("seed", value, minimum=0, maximum=2**63 - 1)


def _drop_last(n: int, batch_size: int) -> bool:
    """Drop the last training batch only when it would hold a single sample.

    A batch of one breaks every batch-statistics layer in training ("Expected more than 1 value
    per channel"), and dropping a larger remainder would waste data for no reason.
    """
    return n > batch_size and n % batch_size == 1


def _seeded_generator(seed: int) -> torch.Generator:
    # A private generator makes the shuffling order independent of the global RNG, so code that
    # draws random numbers during training (a diagnostic, a noise layer) cannot change the data order.
    return torch.Generator().manual_seed(seed)


def _loader(
    dataset: TensorDataset,
    batch_size: int,
    seed: int,
    num_workers: int,
    *,
    train: bool,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """Training batches shuffled by a generator of their own (the last one dropped only when it
    would hold a single sample), or validation batches in a fixed order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and _drop_last(len(dataset), batch_size),
        generator=_seeded_generator(seed) if train else None,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class _ArraysDataModule(pl.LightningDataModule):
    """A data module over two in-memory ``TensorDataset`` s, filled by ``setup``: the data
    loaders of the digits and MNIST-1D modules (``batch_size``, ``seed``, ``num_workers``)."""

    batch_size: int
    seed: int
    num_workers: int
    train_dataset: TensorDataset | None
    val_dataset: TensorDataset | None

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(x, y)``."""
        self.setup("fit")
        assert self.train_dataset is not None
        return _loader(self.train_dataset, self.batch_size, self.seed, self.num_workers, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches ``(x, y)`` in a fixed order."""
        self.setup("validate")
        assert self.val_dataset is not None
        return _loader(self.val_dataset, self.batch_size, self.seed, self.num_workers, train=False)
