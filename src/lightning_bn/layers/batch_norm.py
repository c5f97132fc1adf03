"""Batch normalisation (Ioffe & Szegedy 2015, Algorithm 1), one class for every input rank."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_bn.layers._base import _BatchStatNorm

__all__ = ["BatchNorm"]


class BatchNorm(_BatchStatNorm):
    r"""Batch normalisation over the batch (and spatial) dimensions of each channel.

    .. math::
        \hat x = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}, \qquad y = \gamma \hat x + \beta,

    with :math:`\mu_B` and the biased :math:`\sigma_B^2 = \frac1m \sum (x - \mu_B)^2` taken per channel
    over the :math:`m = N \cdot \prod \text{spatial}` entries. In training the running averages
    accumulate :math:`\mu_B` and the unbiased :math:`\frac{m}{m-1}\sigma_B^2` (exponential average with
    ``momentum``, or a cumulative average for ``momentum=None``); evaluation uses them.
    Matches :class:`torch.nn.BatchNorm1d`, ``BatchNorm2d`` and ``BatchNorm3d`` (outputs, gradients,
    running statistics and ``state_dict`` keys).

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance (``0`` allowed, then Theorem 4.1 of Santurkar et al. is an identity).
        momentum: weight of the new batch in the running averages, or ``None`` for a cumulative average.
        affine: learn ``weight`` (γ) and ``bias`` (β).
        track_running_stats: keep running averages for evaluation; without them batch statistics are
            used in evaluation too.
        channels_last: the channel is the last dimension, ``(N, ..., C)``, instead of dimension 1.
        device: device of parameters and buffers.
        dtype: dtype of parameters and buffers.

    Shape:
        Input ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; output the same.

    Raises:
        ValueError: bad constructor arguments; at call time an input of rank outside 2-5, a channel
            count different from ``num_features``, or one value per channel in training.

    Example:
        >>> import torch
        >>> bn = BatchNorm(3)
        >>> bn(torch.randn(8, 3, 4, 4)).shape
        torch.Size([8, 3, 4, 4])
    """

    running_var: Tensor | None

    def _register_scale_buffer(self, value: Tensor | None) -> None:
        self.register_buffer("running_var", value)

    def _running_scale(self) -> Tensor | None:
        return self.running_var

    def _batch_stats(self, x: Tensor, dims: list[int], m: int) -> tuple[Tensor, Tensor, Tensor]:
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        divisor = torch.sqrt(var + self.eps)
        unbiased = var.detach() * (m / (m - 1)) if m > 1 else var.detach()
        return mean, divisor, unbiased

    def _eval_divisor(self, running_scale: Tensor) -> Tensor:
        return torch.sqrt(running_scale + self.eps)
