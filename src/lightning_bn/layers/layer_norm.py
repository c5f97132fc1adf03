"""Layer normalisation (Ba, Kiros & Hinton 2016), with the same constructor as the batch layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_bn.layers._base import check_eps, check_momentum, check_num_features

__all__ = ["LayerNorm"]


class LayerNorm(nn.Module):
    r"""Normalise each sample over its feature dimensions.

    .. math::
        \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad y = \gamma \hat x + \beta,

    with the biased :math:`\sigma^2`, both statistics per sample:

    - default (channels last): over the last dimension of ``(N, ..., C)``, exactly
      :class:`torch.nn.LayerNorm` with ``normalized_shape = C``;
    - ``channels_first=True``: over ``C`` and every spatial dimension of ``(N, C, *)`` (a feature
      map), with a per-channel γ, β: the drop-in for a BatchNorm layer in a CNN
      (equal to ``torch.nn.GroupNorm(1, C)``).

    No batch statistics, so training and evaluation compute the same function. ``momentum`` and
    ``track_running_stats`` are accepted (and ignored) so that this layer replaces any other.

    Args:
        num_features: size ``C`` of the feature (channel) dimension.
        eps: added to the variance.
        momentum: ignored (no running statistics).
        affine: learn ``weight`` and ``bias`` of shape ``(C,)``.
        track_running_stats: ignored.
        channels_first: normalise a ``(N, C, *)`` map over ``C`` and the spatial dimensions.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        ValueError: bad arguments, or an input whose feature size is not ``num_features``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = None,
        affine: bool = True,
        track_running_stats: bool = False,
        channels_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = check_num_features(num_features)
        self.eps = check_eps(eps)
        check_momentum(momentum)
        self.affine = bool(affine)
        self.channels_first = bool(channels_first)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
            f"channels_first={self.channels_first}"
        )

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_first:
            if x.dim() < 2 or x.shape[1] != self.num_features:
                raise ValueError(
                    f"Expected input of shape (N, {self.num_features}, *) (channels_first=True), "
                    f"got {tuple(x.shape)}"
                )
            dims = list(range(1, x.dim()))
            shape = [1, self.num_features] + [1] * (x.dim() - 2)
        else:
            if x.dim() < 1 or x.shape[-1] != self.num_features:
                raise ValueError(
                    f"Expected input with {self.num_features} features in the last dimension, "
                    f"got shape {tuple(x.shape)}"
                )
            dims = [-1]
            shape = [self.num_features]
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y
