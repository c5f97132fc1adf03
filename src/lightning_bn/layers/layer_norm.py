"""Layer normalisation (Ba, Kiros & Hinton 2016), with the same constructor as the batch layers."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lightning_bn._validation import check_bool
from lightning_bn.layers._base import (
    check_momentum,
    init_affine_norm,
)

__all__ = ["LayerNorm"]


class LayerNorm(nn.Module):
    r"""Normalise each sample over its feature dimensions.

    .. math::
        \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad y = \gamma \hat x + \beta,

    with the biased :math:`\sigma^2`, both statistics per sample:

    - ``channels_last=True`` (default): over the last dimension of ``(N, ..., C)``, exactly
      :class:`torch.nn.LayerNorm` with ``normalized_shape = C``;
    - ``channels_last=False``: over ``C`` and every spatial dimension of ``(N, C, *)`` (a feature
      map), with a per-channel γ, β: the drop-in for a BatchNorm layer in a CNN
      (equal to ``torch.nn.GroupNorm(1, C)``).

    The flag has the name and meaning it has on the batch layers (where the channel sits); only
    the default differs, as each layer's usual layout does.

    No batch statistics, so training and evaluation compute the same function. ``momentum`` and
    ``track_running_stats`` are accepted (and ignored) so that this layer replaces any other.

    Args:
        num_features: size ``C`` of the feature (channel) dimension.
        eps: added to the variance.
        affine: learn ``weight`` and ``bias`` of shape ``(C,)``.
        channels_last: the features are the last dimension (default); ``False`` normalises a
            ``(N, C, *)`` map over ``C`` and the spatial dimensions.
        channels_first: deprecated alias of ``channels_last=not channels_first`` (0.1.0 spelling);
            emits a :class:`DeprecationWarning`.
        momentum: ignored (no running statistics; accepted so this layer replaces any other).
        track_running_stats: ignored (likewise).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        ValueError: bad arguments, or an input whose feature size is not ``num_features``.
        TypeError: both ``channels_last`` and the deprecated ``channels_first`` given.
    """

    num_features: int
    eps: float
    affine: bool
    weight: nn.Parameter  # None without ``affine``, as torch's
    bias: nn.Parameter

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        channels_last: bool | None = None,
        channels_first: bool | None = None,
        momentum: float | None = None,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        init_affine_norm(self, num_features, eps, affine, device, dtype)
        check_momentum(momentum)
        check_bool("track_running_stats", track_running_stats)
        if channels_first is not None:
            if channels_last is not None:
                raise TypeError(
                    "LayerNorm got both `channels_last` and its deprecated alias `channels_first`; "
                    "pass only `channels_last`"
                )
            _warn_channels_first()
            channels_last = not check_bool("channels_first", channels_first)
        self.channels_last = (
            True if channels_last is None else check_bool("channels_last", channels_last)
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
            f"channels_last={self.channels_last}"
        )

    @property
    def channels_first(self) -> bool:
        """Deprecated: ``not channels_last`` (the 0.1.0 spelling of the layout flag)."""
        _warn_channels_first()
        return not self.channels_last

    @channels_first.setter
    def channels_first(self, value: bool) -> None:
        _warn_channels_first()
        self.channels_last = not bool(value)

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.channels_last:
            if x.dim() < 2 or x.shape[1] != self.num_features:
                raise ValueError(
                    f"Expected input of shape (N, {self.num_features}, *) (channels_last=False), "
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
        if x.numel() == 0:  # as torch.nn.LayerNorm: an empty output (no statistics, no warning)
            y = x * 1.0
        else:
            var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
            y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _warn_channels_first() -> None:
    warnings.warn(
        "LayerNorm's `channels_first` is deprecated since 0.2.0: use `channels_last` "
        "(`channels_first=True` is `channels_last=False`), the flag of every lightning-bn layer",
        DeprecationWarning,
        stacklevel=3,
    )
