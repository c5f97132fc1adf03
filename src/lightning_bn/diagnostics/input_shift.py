r"""The distributional form of internal covariate shift (Ioffe and Szegedy; the paper's Fig. 2):
how a layer's input, per unit, moves when the layers before it are updated.

Plain torch. :func:`lightning_bn.diagnostics.ics.compute_ics` captures each layer's input at
:math:`W^t` and at the mixed point of its :math:`G'` pass, and logs these statistics beside the
gradient form.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["input_units", "unit_shift"]


def input_units(module: nn.Module, x: Tensor) -> Tensor:
    """Reshape a layer's input to ``(units, values)``: a unit is a channel (dimension 1) for a
    convolution and a feature (last dimension) otherwise; values run over batch (× positions)."""
    x = x.detach()
    if isinstance(module, nn.modules.conv._ConvNd):
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    return x.reshape(-1, x.shape[-1]).transpose(0, 1)


def unit_shift(before: Tensor, after: Tensor) -> dict[str, float]:
    r"""Distributional shift between two ``(units, values)`` tensors with the same number of values.

    .. math::
        \text{mean\_shift} = \frac1U \sum_u |\bar x'_u - \bar x_u|, \quad
        \text{std\_shift} = \frac1U \sum_u |s'_u - s_u|, \quad
        \text{emd} = \frac1U \sum_u \frac1n \sum_r |x'_{u,(r)} - x_{u,(r)}|,

    with :math:`s` the population (biased) standard deviation and :math:`x_{u,(r)}` the r-th
    smallest value of unit u: in one dimension the earth mover's (Wasserstein-1) distance between
    two empirical distributions of n values is the mean absolute difference of their sorted values.
    """
    values = _unit_shift_tensor(before, after).tolist()
    return dict(zip(_SHIFT_KEYS, values, strict=True))


_SHIFT_KEYS = ("mean_shift", "std_shift", "emd")


def _unit_shift_tensor(before: Tensor, after: Tensor) -> Tensor:
    """:func:`unit_shift`'s three values as one tensor (no host synchronisation on a GPU)."""
    both = torch.stack([before, after])  # (2, units, values): one kernel call per statistic
    var, mean = torch.var_mean(both, dim=2, correction=0)
    if both.device.type == "cpu":  # numpy sorts short rows about 20x faster than torch on CPU
        data = both if both.dtype in (torch.float32, torch.float64) else both.float()
        ordered = torch.from_numpy(np.sort(data.numpy(), axis=2))
    else:
        ordered = both.sort(dim=2).values
    emd = (ordered[1] - ordered[0]).abs().mean(dim=1)
    return torch.stack(
        [
            (mean[1] - mean[0]).abs().mean().double(),
            (var[1].sqrt() - var[0].sqrt()).abs().mean().double(),
            emd.mean().double(),
        ]
    )
