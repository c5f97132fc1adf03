"""The one registry of normalisation layers: names to factories, and the norm types by role.

Every part of the package that asks "is this a normalisation layer?" asks here: the noise
callback's default targets, :func:`~lightning_bn.layers.convert.swap_norm_layers` and the landscape
diagnostic's per-layer quantities (timm's ``create_norm.py`` plays this role there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_bn._validation import check_int
from lightning_bn.layers._base import _BatchStatNorm
from lightning_bn.layers.batch_norm import BatchNorm
from lightning_bn.layers.layer_norm import LayerNorm
from lightning_bn.layers.lp_norm import L1Norm, L2Norm, LinfNorm

__all__ = [
    "BATCH_STAT_NORM_TYPES",
    "NORM_LAYERS",
    "NORM_TYPES",
    "SWAPPABLE_NORM_TYPES",
    "accepts_channels_last",
    "create_norm_layer",
    "is_batch_stat_norm",
    "is_batchnorm",
    "is_channels_last",
    "is_norm_layer",
    "is_rms_norm",
    "overrides_norm_forward",
    "resolve_norm_kind",
]

#: Layers that normalise with statistics over the batch: torch's ``_BatchNorm`` (BatchNorm1d/2d/3d,
#: SyncBatchNorm and the lazy variants) and lightning-bn's BatchNorm and ℓp norms.
BATCH_STAT_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    _BatchStatNorm,
)

#: Layers that :func:`~lightning_bn.layers.convert.swap_norm_layers` replaces: the batch-statistics
#: layers, lightning-bn's LayerNorm and :class:`torch.nn.LayerNorm` (with a 1-D shape).
SWAPPABLE_NORM_TYPES: tuple[type[nn.Module], ...] = (
    *BATCH_STAT_NORM_TYPES,
    LayerNorm,
    nn.LayerNorm,
)

#: :class:`torch.nn.RMSNorm` where this torch has it (2.4 and later).
_TORCH_RMS_TYPES: tuple[type[nn.Module], ...] = (
    (nn.RMSNorm,) if isinstance(getattr(nn, "RMSNorm", None), type) else ()
)

#: Every normalisation layer type: the swappable ones, :class:`torch.nn.GroupNorm`,
#: :class:`torch.nn.InstanceNorm1d`/``2d``/``3d`` (and their lazy variants) and
#: :class:`torch.nn.RMSNorm`. RMS norms that libraries write themselves (Hugging Face's
#: ``T5LayerNorm``, ``LlamaRMSNorm``) have no common type: :func:`is_norm_layer` finds them by
#: structure.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    *SWAPPABLE_NORM_TYPES,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    *_TORCH_RMS_TYPES,
)

#: Modules whose classes define the forward of a normalisation layer that this package trusts to
#: return the normalised output itself (a subclass that overrides ``forward`` may do more).
_TRUSTED_FORWARD_MODULES = ("torch.nn.", "lightning_bn.")

# lightning-bn's layers, all of which take the `channels_last` layout flag
_OWN_LAYOUT_TYPES: tuple[type[nn.Module], ...] = (_BatchStatNorm, LayerNorm)


def _identity(num_features: int, **kwargs: Any) -> nn.Module:
    # checked like the real layers' size, so that a swap to "none" fails where the others do
    check_int("num_features", num_features, minimum=1)
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


def is_norm_layer(module: nn.Module) -> bool:
    """True for every normalisation layer: those of :data:`NORM_TYPES` (torch's and ours) and
    the RMS norms libraries write themselves (:func:`is_rms_norm`)."""
    return isinstance(module, NORM_TYPES) or is_rms_norm(module)


def is_rms_norm(module: nn.Module) -> bool:
    r"""True for an RMS norm, :math:`z = w \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}` over
    the last dimension: :class:`torch.nn.RMSNorm`, or by structure a module a library wrote itself
    (Hugging Face's ``T5LayerNorm``, ``LlamaRMSNorm``, ``MistralRMSNorm``, ...): a class named
    ``*RMSNorm`` or ``*LayerNorm`` with no submodules, one 1-D parameter ``weight`` and an
    ``eps`` or ``variance_epsilon`` attribute. Its features are the last dimension."""
    if isinstance(module, _TORCH_RMS_TYPES):
        return True
    if isinstance(module, NORM_TYPES):
        return False
    name = type(module).__name__.lower()
    if not (name.endswith("rmsnorm") or name.endswith("layernorm")):
        return False
    if next(module.children(), None) is not None:
        return False
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    if set(params) - {"weight", "bias"} or weight is None or weight.dim() != 1:
        return False
    return hasattr(module, "variance_epsilon") or hasattr(module, "eps")


def overrides_norm_forward(module: nn.Module) -> bool:
    """True for a subclass of a normalisation layer type whose ``forward`` is its own (or a
    third-party base's): it may do more than normalise, as timm's ``BatchNormAct2d``,
    ``GroupNormAct`` and ``LayerNormAct`` do (``act(drop(norm(x)))``). Such a layer's output is
    not the normalisation's output; :mod:`lightning_bn.layers.fused` finds the latter."""
    if not isinstance(module, NORM_TYPES):
        return False
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return not cls.__module__.startswith(_TRUSTED_FORWARD_MODULES)
    return False


def is_batch_stat_norm(module: nn.Module) -> bool:
    """True for layers that normalise with batch statistics (torch and ours)."""
    return isinstance(module, BATCH_STAT_NORM_TYPES)


def is_batchnorm(module: nn.Module) -> bool:
    """True for BatchNorm proper, the standard-deviation divisor of Theorem 4.1: torch's
    ``_BatchNorm`` family and lightning-bn's :class:`BatchNorm` (not the ℓp norms)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNorm))


def accepts_channels_last(factory: Callable[..., nn.Module]) -> bool:
    """Whether ``factory`` is a lightning-bn layer class, all of which take ``channels_last``."""
    return isinstance(factory, type) and issubclass(factory, _OWN_LAYOUT_TYPES)


def is_channels_last(module: nn.Module) -> bool:
    """Whether the module's features (units) sit in the last dimension of its input and output:
    ``torch.nn.LayerNorm``, ``torch.nn.Linear``, an RMS norm (:func:`is_rms_norm`), or any layer with ``channels_last=True`` (our
    :class:`LayerNorm` by default); otherwise dimension 1."""
    if isinstance(module, (nn.LayerNorm, nn.Linear)) or is_rms_norm(module):
        return True
    return bool(getattr(module, "channels_last", False))
