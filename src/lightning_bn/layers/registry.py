"""String registry of the interchangeable normalisation layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_bn.layers._base import _BatchStatNorm
from lightning_bn.layers.batch_norm import BatchNorm
from lightning_bn.layers.layer_norm import LayerNorm
from lightning_bn.layers.lp_norm import L1Norm, L2Norm, LinfNorm

__all__ = [
    "NORM_LAYERS",
    "create_norm_layer",
    "is_batch_stat_norm",
    "is_channels_last",
    "resolve_norm_kind",
]


def _identity(num_features: int, **kwargs: Any) -> nn.Module:
    return nn.Identity()


#: Valid ``kind`` strings and the factory each one names.
NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "batchnorm": BatchNorm,
    "l1": L1Norm,
    "l2": L2Norm,
    "linf": LinfNorm,
    "layernorm": LayerNorm,
    "none": _identity,
}


def resolve_norm_kind(kind: str | type[nn.Module]) -> Callable[..., nn.Module]:
    """Return the factory for ``kind`` (a registry name or a module class).

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
        TypeError: neither a string nor an ``nn.Module`` subclass.
    """
    if isinstance(kind, type) and issubclass(kind, nn.Module):
        return kind
    if not isinstance(kind, str):
        raise TypeError(
            f"Expected argument `kind` to be a string or an nn.Module subclass, but got {kind!r}"
        )
    key = kind.strip().lower().replace("_", "").replace("-", "")
    if key not in NORM_LAYERS:
        raise ValueError(
            f"Expected argument `kind` to be one of {', '.join(map(repr, NORM_LAYERS))}"
            f" (or an nn.Module class), but got {kind!r}"
        )
    return NORM_LAYERS[key]


def create_norm_layer(kind: str | type[nn.Module], num_features: int, **kwargs: Any) -> nn.Module:
    """Build a normalisation layer by name: ``"batchnorm" | "l1" | "l2" | "linf" | "layernorm" | "none"``.

    Args:
        kind: a name from :data:`NORM_LAYERS` or a class taking ``num_features`` first.
        num_features: number of channels.
        **kwargs: keyword arguments of the layer (``eps``, ``momentum``, ``affine``, ...).
            ``"none"`` ignores them and returns :class:`torch.nn.Identity`.

    Raises:
        ValueError: unknown ``kind`` (the message lists the valid ones) or bad layer arguments.

    Example:
        >>> create_norm_layer("l1", 16, eps=1e-3)
        L1Norm(16, eps=0.001, momentum=0.1, affine=True, track_running_stats=True, p=1, centered_divisor=True)
    """
    return resolve_norm_kind(kind)(num_features, **kwargs)


def is_batch_stat_norm(module: nn.Module) -> bool:
    """True for layers that normalise with batch statistics (torch and ours)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchStatNorm))


def is_channels_last(module: nn.Module) -> bool:
    """Whether the module's features (units) sit in the last dimension of its input and output:
    ``torch.nn.LayerNorm``, ``torch.nn.Linear``, our :class:`LayerNorm` without
    ``channels_first``, or any layer with ``channels_last=True``; otherwise dimension 1."""
    if isinstance(module, (nn.LayerNorm, nn.Linear)):
        return True
    if isinstance(module, LayerNorm):
        return not module.channels_first
    return bool(getattr(module, "channels_last", False))
