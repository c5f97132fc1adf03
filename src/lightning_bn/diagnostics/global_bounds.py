r"""Theorem 4.1 for a synchronised BatchNorm layer: both sides with the global batch's statistics.

A synchronised layer (:mod:`lightning_bn.layers.sync`) normalises each process's slice with the
mean and variance of the global batch (:math:`M` entries per channel over all processes), so the
theorem's unit vector :math:`y_j \in \mathbb{R}^M` is spread over the processes. With
:math:`\mu_j, \sigma_j^2` of the global batch, :math:`\bar g_j = \frac1M \sum g_j` and
:math:`\pi_j = \langle g_j - \bar g_j 1, \hat y_j \rangle` (sums over every process),

.. math::
    \mathrm{rhs}_j = \frac{\gamma_j^2}{s_j^2}\Bigl(\bigl\lVert g_j - \bar g_j 1
        - \tfrac{\pi_j}{M}\hat y_j \bigr\rVert^2 + \frac{\epsilon\,\pi_j^2}{M(\sigma_j^2+\epsilon)}\Bigr),
    \qquad \mathrm{lhs}_j = \lVert \nabla_{y_j} L \rVert^2,

the split form of :func:`lightning_bn.diagnostics.bounds.theorem41_bound`. Each process returns
its share, so that the sum over processes is the single-process value on the concatenated batch.
Plain torch; the reduction is passed in (a sum over processes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_bn.diagnostics.bounds import _flat_channels, _per_channel

__all__ = ["theorem41_shares"]


def theorem41_shares(
    y: Tensor,
    grad_y: Tensor,
    grad_z: Tensor,
    weight: Tensor | None,
    eps: float,
    *,
    all_reduce_sum: Callable[[Tensor], Tensor],
    world_size: int,
    channel_dim: int = 1,
) -> tuple[Tensor, Tensor]:
    r"""This process's shares ``(lhs, rhs)``, each ``(C,)``, of Theorem 4.1 on the global batch.

    Summed over the processes they give :math:`\mathrm{lhs}_j` and :math:`\mathrm{rhs}_j` of the
    global batch (above); every process must call this with the same layer. Three reductions of
    ``(C,)``-sized vectors.

    Args:
        y, grad_y, grad_z: this process's slice of the layer input, of :math:`\partial L/\partial
            y` and of :math:`\partial L / \partial z` (same shape, channel at ``channel_dim``).
        weight: :math:`\gamma` ``(C,)`` or ``None``.
        eps: the layer's :math:`\epsilon`.
        all_reduce_sum: sum of a tensor over the processes (the same on every process).
        world_size: number of processes (the global terms are split evenly between them).
        channel_dim: dimension of the channels.
    """
    y2, g2, gamma = _per_channel(y, grad_z, weight, eps, channel_dim, grad_y=grad_y)
    dy2 = _flat_channels(grad_y, channel_dim).to(y2.dtype)
    c, m = y2.shape
    sums = all_reduce_sum(torch.cat([y2.sum(dim=1), g2.sum(dim=1), y2.new_full((1,), float(m))]))
    total = sums[-1]
    mean, g_mean = sums[:c] / total, sums[c : 2 * c] / total
    dev = y2 - mean[:, None]
    var = all_reduce_sum(dev.square().sum(dim=1)) / total
    s = torch.sqrt(var + eps)
    yhat = dev / s[:, None]
    gc = g2 - g_mean[:, None]
    proj = all_reduce_sum((gc * yhat).sum(dim=1))
    residual = gc - (proj / total)[:, None] * yhat
    global_term = proj.square() * eps / (total * (var + eps)) / world_size
    rhs = (gamma / s).square() * (residual.square().sum(dim=1) + global_term)
    return dy2.square().sum(dim=1), rhs
