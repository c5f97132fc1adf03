"""Pieces shared by the built-in data modules: argument checks, batch trimming, seeded shuffling."""

from __future__ import annotations

from typing import Any

import torch

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
