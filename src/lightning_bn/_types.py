"""The few type aliases the package shares, and the one check that a loss is a scalar.

Plain torch and numpy: every layer of the package may import this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from lightning_bn.errors import NotScalarError

__all__ = [
    "LossFn",
    "Params",
    "ParamsLossFn",
    "Series",
    "SeriesHistory",
    "TensorDict",
    "scalar_loss",
    "series_arrays",
]

#: Tensors by qualified parameter (or buffer) name: a parameter point, a gradient, a direction.
TensorDict = dict[str, Tensor]

#: A parameter point (the same type as :data:`TensorDict`, named for what it holds).
Params = TensorDict

#: ``loss_fn(module, batch) -> Tensor``: the loss of a model on a batch, instead of its
#: ``training_step``.
LossFn = Callable[[nn.Module, Any], Tensor]

#: ``loss_fn(params) -> Tensor``: a scalar loss of a parameter dict (Hessian-vector products).
ParamsLossFn = Callable[[TensorDict], Tensor]

#: One logged key's history: ``(steps, values)``, two 1-d arrays of the same length.
Series = tuple[np.ndarray, np.ndarray]


def series_arrays(series: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> dict[str, Series]:
    """Plain lists ``key -> (steps, values)`` as :data:`Series` (int64 steps, float64 values)."""
    return {
        k: (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
        for k, (s, v) in series.items()
    }


class SeriesHistory:
    """What a run logged, ``key -> (steps, values)`` in first-logged order, and the lookups
    every history type shares (the figures' runs, the reproduce variants); a subclass holds
    ``series``."""

    series: Mapping[str, Series]

    def get(self, key: str) -> Series:
        """``(steps, values)`` of ``key``; empty arrays when it was never logged."""
        if key in self.series:
            return self.series[key]
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)

    def last(self, key: str) -> float:
        """The value at the last step of ``key`` (``nan`` when never logged)."""
        _, values = self.get(key)
        return float(values[-1]) if values.size else math.nan

    def layers(self, prefix: str, suffix: str) -> list[str]:
        """Layer names ``<layer>`` of keys ``<prefix><layer><suffix>``, in first-logged order."""
        pattern = re.compile(re.escape(prefix) + "(?P<layer>.+)" + re.escape(suffix) + r"\Z")
        return [m["layer"] for key in self.series if (m := pattern.match(key))]

    def values_matching(self, prefix: str, suffix: str) -> np.ndarray:
        """All values of every ``<prefix><layer><suffix>`` key, concatenated."""
        parts = [self.get(f"{prefix}{layer}{suffix}")[1] for layer in self.layers(prefix, suffix)]
        return np.concatenate(parts) if parts else np.zeros(0)


def scalar_loss(out: object, source: str = "the loss") -> Tensor:
    """``out`` as a 0-d tensor, if it is a tensor with one element.

    Args:
        out: What a training step, ``loss_fn`` or ``downstream`` callable returned.
        source: Names the callable in the error message.

    Raises:
        NotScalarError: ``out`` is not a tensor with exactly one element (a ``TypeError`` and
            a ``ValueError``).

    Example:
        >>> import torch
        >>> scalar_loss(torch.ones(1, 1)).shape
        torch.Size([])
    """
    if not isinstance(out, Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise NotScalarError(f"Expected {source} to be a scalar tensor, but got {shape}")
    return out.reshape(())
