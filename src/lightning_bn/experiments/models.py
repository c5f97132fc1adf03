"""Models of the built-in experiments, each with its normalisation chosen by one argument.

``norm`` is a name of :func:`lightning_bn.layers.create_norm_layer` (``"batchnorm" | "l1" | "l2" |
"linf" | "layernorm" | "none"``) or a layer class taking ``num_features`` first, so the paper's
variants (standard, BatchNorm, ℓp normalisation, LayerNorm) are the same architecture with a
different argument. ``"none"`` leaves an :class:`torch.nn.Identity` in the norm slot, so module
names (``blocks.0.norm``, ``features.3.norm``, ...) are the same in every variant; noisy BatchNorm
is the ``"batchnorm"`` model with :class:`~lightning_bn.callbacks.NoiseInjectionCallback`.

Linear and convolution layers keep their bias in every variant (before a BatchNorm layer it is
redundant but harmless), so swapping the norm layers with
:func:`lightning_bn.layers.swap_norm_layers` gives exactly the model built with the other ``norm``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bn._validation import check_int
from lightning_bn.layers import LayerNorm, create_norm_layer
from lightning_bn.layers.registry import resolve_norm_kind

__all__ = [
    "INIT_SCHEMES",
    "MLP",
    "VGG",
    "VGG_CONFIGS",
    "SmallCNN",
    "count_parameters",
    "init_weights_",
    "make_norm",
]

#: Initialisations of :func:`init_weights_`.
INIT_SCHEMES: tuple[str, ...] = ("kaiming", "default")

NormKind = str | type[nn.Module]

#: Layer configurations of the CIFAR-style VGG networks: channel counts, ``"M"`` = 2×2 max-pool.
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        *(64, 64, "M", 128, 128, "M", 256, 256, 256, "M"),
        *(512, 512, 512, "M", 512, 512, 512, "M"),
    ],
    "vgg19": [
        *(64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"),
        *(512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
    ],
}


def make_norm(
    norm: NormKind, num_features: int, norm_kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build the norm layer of a model: ``create_norm_layer`` with the layout these models need.

    Every layer here has its channels in dimension 1 (``(N, C)`` after a Linear layer,
    ``(N, C, H, W)`` after a convolution), so :class:`~lightning_bn.layers.LayerNorm` gets
    ``channels_last=False`` (over ``(N, C)`` that is the same as the default last-dimension form).

    Args:
        norm: a registry name or a layer class.
        num_features: number of channels ``C``.
        norm_kwargs: extra keyword arguments of the layer (``eps``, ``momentum``, ``affine``, ...).

    Raises:
        ValueError: an unknown ``norm`` (the message lists the valid names).
        TypeError: ``norm`` neither a string nor an ``nn.Module`` subclass.
    """
    kwargs = dict(norm_kwargs or {})
    factory = resolve_norm_kind(norm)
    layer_norm = isinstance(factory, type) and issubclass(factory, LayerNorm)
    if layer_norm and "channels_first" not in kwargs:  # the deprecated spelling still wins
        kwargs.setdefault("channels_last", False)
    return create_norm_layer(norm, num_features, **kwargs)


def _check_sizes(name: str, values: Any, allow_empty: bool = True) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    try:
        sizes = tuple(values)
    except TypeError:
        sizes = ()
        values_ok = False
    else:
        values_ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)
    if not values_ok or (not allow_empty and not sizes):
        raise ValueError(
            f"Expected argument `{name}` to be a{'' if allow_empty else ' non-empty'} sequence of "
            f"positive integers, but got {values!r}"
        )
    return sizes


def _check_positive_int(name: str, value: Any) -> int:
    return check_int(name, value, minimum=1)


class MLP(nn.Module):
    """Fully connected classifier: ``[Linear → norm → ReLU (→ Dropout)] × len(hidden) → Linear``.

    Inputs of any shape ``(N, *)`` are flattened to ``(N, in_features)``. Block ``i`` is
    ``blocks.i`` with children ``linear``, ``norm``, ``act`` (and ``drop`` when ``dropout > 0``);
    the output layer is ``head``.

    Parameter count (affine norm layers, 2 parameters per feature; ``"none"``: 0):
    ``Σ_i (d_{i-1}·d_i + d_i + 2·d_i) + d_L·num_classes + num_classes`` with ``d_0 = in_features``.

    Args:
        in_features: input size (64 for flattened digits).
        hidden: widths of the hidden layers (may be empty: a linear classifier).
        num_classes: output size.
        norm: normalisation after each hidden Linear layer.
        dropout: dropout probability after each activation.
        norm_kwargs: keyword arguments of the norm layers.

    Shape:
        Input ``(N, *)`` with ``in_features`` entries per sample; output ``(N, num_classes)``.

    Raises:
        ValueError: bad sizes, ``dropout`` outside [0, 1) or an unknown ``norm``.

    Example:
        >>> import torch
        >>> MLP(64, (32, 32), 10, norm="l1")(torch.randn(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 128, 128),
        num_classes: int = 10,
        norm: NormKind = "batchnorm",
        dropout: float = 0.0,
        norm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.hidden = _check_sizes("hidden", hidden)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0 <= dropout < 1
        ):
            raise ValueError(f"Expected argument `dropout` to be in [0, 1), but got {dropout!r}")
        self.norm = norm
        blocks = []
        width = in_features
        for h in self.hidden:
            layers: OrderedDict[str, nn.Module] = OrderedDict(
                linear=nn.Linear(width, h),
                norm=make_norm(norm, h, norm_kwargs),
                act=nn.ReLU(),
            )
            if dropout > 0:
                layers["drop"] = nn.Dropout(dropout)
            blocks.append(nn.Sequential(layers))
            width = h
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of a batch ``(N, *)``."""
        return self.head(self.blocks(x.flatten(1)))


def _conv_block(
    in_channels: int,
    out_channels: int,
    norm: NormKind,
    norm_kwargs: Mapping[str, Any] | None,
    conv: type[nn.Conv1d | nn.Conv2d] = nn.Conv2d,
) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=conv(in_channels, out_channels, kernel_size=3, padding=1),
            norm=make_norm(norm, out_channels, norm_kwargs),
            act=nn.ReLU(),
        )
    )


def pooled_conv_stages(
    dims: int,
    in_channels: int,
    widths: Sequence[int],
    size: int,
    norm: NormKind,
    norm_kwargs: Mapping[str, Any] | None,
) -> tuple[nn.Sequential, int, int]:
    """``[conv 3 → norm → ReLU → max-pool 2]`` per width, in ``dims`` (1 or 2) dimensions, the
    pool only while the input side ``size`` is at least 2; stage ``i`` is child ``i`` with
    children ``conv``, ``norm``, ``act`` (and ``pool``).

    Returns:
        The stages, the channels and the side length they output.
    """
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if dims == 1 else (nn.Conv2d, nn.MaxPool2d)
    stages, channels = [], in_channels
    for width in widths:
        stage = _conv_block(channels, width, norm, norm_kwargs, conv)
        if size >= 2:
            stage.add_module("pool", pool(2))
            size //= 2
        stages.append(stage)
        channels = width
    return nn.Sequential(*stages), channels, size


class _PooledConvNet(nn.Module):
    """The arguments and stages :class:`SmallCNN` and :class:`SmallCNN1d` share."""

    in_channels: int
    num_classes: int
    widths: tuple[int, ...]
    norm: NormKind
    features: nn.Sequential

    def build(
        self,
        dims: int,
        in_channels: int,
        num_classes: int,
        norm: NormKind,
        widths: Sequence[int],
        size: int,
        norm_kwargs: Mapping[str, Any] | None,
    ) -> tuple[int, int]:
        """Check and keep the arguments, build ``features``; return its channels and side."""
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.widths = _check_sizes("widths", widths, allow_empty=False)
        self.norm = norm
        self.features, channels, side = pooled_conv_stages(
            dims, in_channels, self.widths, size, norm, norm_kwargs
        )
        return channels, side


class SmallCNN(_PooledConvNet):
    """Small convolutional classifier for 8×8 images (scikit-learn digits).

    Stage ``i`` is ``features.i``: conv 3×3 (padding 1) → norm → ReLU, then a 2×2 max-pool while
    the feature map is at least 2×2 (8×8 → 4×4 → 2×2 → 1×1 with the default three stages). The
    classifier averages what is left over space and applies ``head`` (a Linear layer).

    Args:
        in_channels: input channels.
        num_classes: output size.
        norm: normalisation after each convolution.
        widths: output channels of the stages.
        input_size: side of the (square) input, which decides where to pool.
        norm_kwargs: keyword arguments of the norm layers.

    Shape:
        Input ``(N, in_channels, H, W)``; output ``(N, num_classes)``.

    Raises:
        ValueError: bad sizes or an unknown ``norm``.

    Example:
        >>> import torch
        >>> SmallCNN(norm="layernorm")(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        norm: NormKind = "batchnorm",
        widths: Sequence[int] = (32, 64, 128),
        input_size: int = 8,
        norm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.input_size = _check_positive_int("input_size", input_size)
        channels, _ = self.build(2, in_channels, num_classes, norm, widths, input_size, norm_kwargs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        return self.head(self.pool(self.features(x)).flatten(1))


class VGG(nn.Module):
    """CIFAR-style VGG (the paper's VGG experiments): conv 3×3 → norm → ReLU blocks, max-pools.

    ``cfg`` is a name of :data:`VGG_CONFIGS` or a list of channel counts and ``"M"`` (2×2 max-pool).
    Entry ``i`` of ``cfg`` is ``features.i`` (a block with ``conv``, ``norm``, ``act``, or a
    ``MaxPool2d``). The classifier flattens the final map (``512 × 1 × 1`` for 32×32 inputs and the
    standard configurations), applies ``[Linear → norm → ReLU]`` blocks for ``classifier_hidden``
    (none by default, the common CIFAR variant) and a final Linear layer ``classifier.head``.

    Args:
        cfg: ``"vgg11" | "vgg13" | "vgg16" | "vgg19"`` or a custom list.
        num_classes: output size.
        norm: normalisation after each convolution (and hidden classifier layer).
        in_channels: input channels.
        input_size: side of the square input (32 for CIFAR-10).
        classifier_hidden: widths of hidden fully connected layers before the output layer.
        norm_kwargs: keyword arguments of the norm layers.

    Shape:
        Input ``(N, in_channels, input_size, input_size)``; output ``(N, num_classes)``.

    Raises:
        ValueError: an unknown configuration name, a bad entry, more pools than the input allows,
            or an unknown ``norm``.

    Example:
        >>> import torch
        >>> VGG([8, "M", 16, "M"], input_size=8)(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        cfg: str | Sequence[int | str] = "vgg11",
        num_classes: int = 10,
        norm: NormKind = "batchnorm",
        in_channels: int = 3,
        input_size: int = 32,
        classifier_hidden: Sequence[int] = (),
        norm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(cfg, str):
            if cfg.lower() not in VGG_CONFIGS:
                raise ValueError(
                    f"Expected argument `cfg` to be one of {', '.join(map(repr, VGG_CONFIGS))} "
                    f"or a list of channel counts and 'M', but got {cfg!r}"
                )
            layers_cfg: list[int | str] = list(VGG_CONFIGS[cfg.lower()])
        else:
            layers_cfg = list(cfg)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.input_size = _check_positive_int("input_size", input_size)
        hidden = _check_sizes("classifier_hidden", classifier_hidden)
        self.cfg = layers_cfg
        self.norm = norm
        features: list[nn.Module] = []
        channels, size = in_channels, input_size
        for entry in layers_cfg:
            if entry == "M":
                if size < 2:
                    raise ValueError(
                        f"VGG configuration {cfg!r} pools a {size}×{size} map; "
                        f"input_size={input_size} is too small for it"
                    )
                features.append(nn.MaxPool2d(2))
                size //= 2
            elif isinstance(entry, int) and not isinstance(entry, bool) and entry > 0:
                features.append(_conv_block(channels, entry, norm, norm_kwargs))
                channels = entry
            else:
                raise ValueError(
                    f"Expected entries of `cfg` to be positive integers or 'M', but got {entry!r}"
                )
        if not any(isinstance(f, nn.Sequential) for f in features):
            raise ValueError(f"Expected `cfg` to contain at least one convolution, got {cfg!r}")
        self.features = nn.Sequential(*features)
        width = channels * size * size
        classifier: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for i, h in enumerate(hidden):
            classifier[f"fc{i}"] = nn.Sequential(
                OrderedDict(
                    linear=nn.Linear(width, h), norm=make_norm(norm, h, norm_kwargs), act=nn.ReLU()
                )
            )
            width = h
        classifier["head"] = nn.Linear(width, num_classes)
        self.classifier = nn.Sequential(classifier)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        return self.classifier(self.features(x))


def init_weights_(model: nn.Module, init: str = "kaiming", scale: float = 1.0) -> nn.Module:
    r"""Initialise the Linear and convolution weights of a ReLU network in place.

    ``init="kaiming"`` is what practitioners use for ReLU networks (He et al. 2015; torchvision's
    VGG does the same for its convolutions): every Linear or convolution weight is drawn from
    :math:`N(0, 2 / \text{fan\_in})` (``kaiming_normal_``, ``nonlinearity="relu"``), except the
    last such layer (the classifier head, not followed by a ReLU), drawn from
    :math:`N(0, 1 / \text{fan\_in})`; biases are set to 0. The activations then keep their scale
    through the depth, so a deep standard network trains at a moderate learning rate.
    ``init="default"`` keeps PyTorch's own initialisation (:math:`U(\pm 1/\sqrt{\text{fan\_in}})`
    for weights and biases), under which a 6-layer ReLU MLP shrinks its signal by about
    :math:`(1/\sqrt 3)^{6}` per forward pass and starts on a loss plateau.

    ``scale`` then multiplies every one of those weights (biases untouched): the Ioffe & Szegedy
    claim that BatchNorm makes training less sensitive to the initialisation scale is checked with
    ``scale`` 0.25 and 4. Norm layers are not touched.

    Args:
        model: the network (its modules in forward order, as every model of this module is).
        init: one of :data:`INIT_SCHEMES`.
        scale: a finite number > 0.

    Returns:
        ``model``.

    Raises:
        ValueError: an unknown ``init`` or a bad ``scale``.
    """
    if init not in INIT_SCHEMES:
        raise ValueError(
            f"Expected argument `init` to be one of {', '.join(map(repr, INIT_SCHEMES))}, "
            f"but got {init!r}"
        )
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"Expected argument `scale` to be a finite number > 0, but got {scale!r}")
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if init == "kaiming":
                last = i == len(layers) - 1
                nn.init.kaiming_normal_(layer.weight, nonlinearity="linear" if last else "relu")
                if layer.bias is not None:
                    layer.bias.zero_()
            if scale != 1.0:
                layer.weight.mul_(float(scale))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (used by tests and the reproduce summary)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
