"""A small 1-D convolutional classifier (MNIST-1D signals), its normalisation chosen by one argument."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_bn.experiments.models import NormKind, _check_positive_int, _PooledConvNet

__all__ = ["SmallCNN1d"]


class SmallCNN1d(_PooledConvNet):
    """Small 1-D convolutional classifier: ``[conv1d 3 → norm → ReLU → max-pool 2] × len(widths)``,
    flatten, ``head`` (a Linear layer).

    Stage ``i`` is ``features.i`` with children ``conv``, ``norm``, ``act`` and ``pool`` (the pool
    only while the signal is at least 2 long): 40 → 20 → 10 → 5 points with three stages. The
    classifier flattens the last feature map (channels × length, so that the position of a
    pattern in the signal stays available, which MNIST-1D's classes depend on).

    Args:
        in_channels: input channels.
        num_classes: output size.
        norm: normalisation after each convolution (a name of
            :func:`lightning_bn.layers.create_norm_layer` or a layer class).
        widths: output channels of the stages.
        input_length: length of the input signal.
        norm_kwargs: keyword arguments of the norm layers.

    Shape:
        Input ``(N, in_channels, input_length)``; output ``(N, num_classes)``.

    Raises:
        ValueError: bad sizes or an unknown ``norm``.

    Example:
        >>> import torch
        >>> SmallCNN1d(norm="batchnorm")(torch.randn(4, 1, 40)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        norm: NormKind = "batchnorm",
        widths: Sequence[int] = (32, 64, 64),
        input_length: int = 40,
        norm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.input_length = _check_positive_int("input_length", input_length)
        channels, length = self.build(
            1, in_channels, num_classes, norm, widths, input_length, norm_kwargs
        )
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of signals ``(N, C, L)``."""
        return self.head(self.features(x).flatten(1))
