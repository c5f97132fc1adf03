"""The few type aliases the package shares, and the one check that a loss is a scalar.

Plain torch and numpy: every layer of the package may import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor, nn

from lightning_bn.errors import NotScalarError

__all__ = ["LossFn", "Params", "ParamsLossFn", "Series", "TensorDict", "scalar_loss"]

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
