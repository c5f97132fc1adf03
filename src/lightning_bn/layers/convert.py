"""Swap the normalisation layers inside an existing model (timm's ``convert_sync_batchnorm`` style)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_bn._validation import ArgumentTypeError
from lightning_bn.layers.carry import carry_over, check_carriable
from lightning_bn.layers.layer_norm import LayerNorm
from lightning_bn.layers.registry import (
    SWAPPABLE_NORM_TYPES,
    accepts_channels_last,
    is_batch_stat_norm,
    is_channels_last,
    resolve_norm_kind,
)
from lightning_bn.layers.selection import match_modules

__all__ = ["SWAPPABLE_TYPES", "swap_norm_layers"]

#: Module types that :func:`swap_norm_layers` replaces (the registry's
#: :data:`~lightning_bn.layers.SWAPPABLE_NORM_TYPES`, under its 0.1.0 name).
SWAPPABLE_TYPES: tuple[type[nn.Module], ...] = SWAPPABLE_NORM_TYPES


def _num_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        return int(shape[-1]) if len(shape) == 1 else None
    n = getattr(module, "num_features", None)
    return int(n) if isinstance(n, int) else None


def _inherited_kwargs(old: nn.Module, factory: Any) -> dict[str, Any]:
    """Settings of ``old`` that carry over to the new layer, and the layout flag it needs."""
    kwargs: dict[str, Any] = {}
    if is_batch_stat_norm(old):
        kwargs.update(
            eps=old.eps,
            momentum=old.momentum,
            affine=old.affine,
            track_running_stats=old.track_running_stats,
        )
    elif isinstance(old, (LayerNorm, nn.LayerNorm)):
        kwargs.update(eps=old.eps)
        affine = getattr(old, "affine", None)
        if affine is None:
            affine = bool(getattr(old, "elementwise_affine", True))
        kwargs.update(affine=affine)
    if accepts_channels_last(factory):
        kwargs["channels_last"] = is_channels_last(old)
    return kwargs


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in module.parameters(recurse=False):
        return t
    for b in module.buffers(recurse=False):
        if b.is_floating_point():
            return b
    return None


def _copy_matching(old: nn.Module, new: nn.Module) -> None:
    """Copy the ``state_dict`` entries of the same key and shape (affine γ, β; running stats),
    through ``load_state_dict`` so that the layers' own conversions apply (L2Norm's divisor from
    BatchNorm's ``running_var`` and back)."""
    with torch.no_grad():
        target = new.state_dict()
        matching = {
            k: v for k, v in old.state_dict().items() if k in target and v.shape == target[k].shape
        }
        new.load_state_dict(matching, strict=False)


def _make(old: nn.Module, factory: Any, layer_kwargs: dict[str, Any], name: str = "") -> nn.Module:
    check_carriable(name, old)
    num_features = _num_features(old)
    if num_features is None:
        raise ValueError(
            f"Cannot swap {type(old).__name__} with a multi-dimensional normalized_shape; "
            "only a 1-D feature size is supported"
        )
    ref = _first_tensor(old)
    kwargs = _inherited_kwargs(old, factory)
    kwargs.update(layer_kwargs)
    if ref is not None and isinstance(factory, type):
        kwargs.setdefault("device", ref.device)
        kwargs.setdefault("dtype", ref.dtype)
    new = factory(num_features, **kwargs)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    _copy_matching(old, new)
    carry_over(name, old, new)
    new.train(old.training)
    return new


def _contained_norm_types(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()})


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}"
            f" ({model!r:.60})"
        )
    # torch.compile wraps the module in an OptimizedModule (the eager one is `_orig_mod`)
    frozen = [
        type(m).__name__
        for m in (model, *model.modules())
        if isinstance(m, torch.jit.ScriptModule) or type(m).__name__ == "OptimizedModule"
    ]
    if frozen:
        raise TypeError(
            f"Expected argument `model` to be an eager nn.Module, but got a {frozen[0]}:"
            " scripted/compiled modules cannot be swapped; swap before scripting"
        )
    return model


def _check_include(include: Any) -> list[str] | None:
    if include is None:
        return None
    items = [include] if isinstance(include, str) else include
    if isinstance(items, (bytes, dict)) or not isinstance(items, Iterable):
        raise ArgumentTypeError(
            "Expected argument `include` to be None, a glob string or a sequence of them,"
            f" but got {include!r}"
        )
    patterns = list(items)
    if not patterns:
        raise ValueError(
            f"Expected argument `include` to name at least one module glob, but got {include!r}"
            " (None swaps every normalisation layer)"
        )
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ArgumentTypeError(
                f"Expected argument `include` to hold non-empty glob strings, but got {include!r}"
            )
    return patterns


def swap_norm_layers(
    model: nn.Module,
    kind: str | type[nn.Module],
    *,
    include: str | Iterable[str] | None = None,
    **layer_kwargs: Any,
) -> nn.Module:
    """Replace every normalisation layer of ``model`` by a layer of ``kind``, recursively.

    Replaced: :class:`torch.nn.BatchNorm1d` / ``2d`` / ``3d``, :class:`torch.nn.SyncBatchNorm`,
    :class:`torch.nn.LayerNorm` (1-D ``normalized_shape``) and every layer of this package. The new
    layer gets the old one's ``num_features``, ``eps``, ``momentum``, ``affine`` and
    ``track_running_stats`` (unless ``layer_kwargs`` says otherwise), its device, dtype and
    train/eval mode; parameters and buffers of the same name and shape are copied (γ, β and, between
    BatchNorm types, the running statistics). The layout follows the old layer: a BatchNorm replaced
    by :class:`LayerNorm` becomes channel-wise (``channels_last=False``), a LayerNorm over the last
    dimension replaced by a batch layer gets ``channels_last=True``. ``"none"`` gives
    :class:`torch.nn.Identity` (the paper's "standard" network).

    What the user set on the old layer is kept (:mod:`lightning_bn.layers.carry`): each parameter's
    ``requires_grad`` (a frozen layer stays frozen), forward, forward-pre and backward hooks (a
    handle kept from ``register_forward_hook`` still removes the hook), a missing bias
    (``nn.LayerNorm(bias=False)`` gets no trainable bias: a fixed zero shift outside the
    ``state_dict``) and parametrisations (``torch.nn.utils.parametrize``, with their originals).

    Args:
        model: the model; modified in place.
        kind: ``"batchnorm" | "l1" | "l2" | "linf" | "layernorm" | "none"`` or a class.
        include: glob(s) on qualified module names (``"features.*"``); only matches are swapped.
        **layer_kwargs: keyword arguments for the new layers.

    A layer registered at several places (one module object shared by two parents, or twice
    in one) is replaced by one new layer at every place: the sharing is kept. A glob in
    ``include`` that matches one of its names selects it everywhere.

    Returns:
        The model, or the new layer when ``model`` itself is a normalisation layer.

    Raises:
        ValueError: unknown ``kind`` (lists the valid ones), an empty ``include``, no layer
            matched (names the normalisation types the model does contain), a layer with
            state-dict hooks (the deprecated ``weight_norm``/``spectral_norm``), or a parametrised
            tensor the new layer lacks; nothing is replaced then.
        TypeError: ``model`` is not an ``nn.Module``, or is scripted (``torch.jit.script``) or
            compiled (``torch.compile``): swap before scripting; ``include`` is neither a string
            nor an iterable of strings.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        >>> swap_norm_layers(net, "l1")[1]
        L1Norm(8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, p=1, centered_divisor=True)
    """
    _check_model(model)
    factory = resolve_norm_kind(kind)
    patterns = _check_include(include)

    selection = match_modules(
        model,
        patterns,
        default=SWAPPABLE_NORM_TYPES,
        within=SWAPPABLE_NORM_TYPES,
        include_root=True,
    )
    targets = [name for name, _ in selection.modules]
    if not targets:
        found = _contained_norm_types(model)
        contained = ", ".join(found) if found else "no normalisation layer"
        flt = f" matching include={include!r}" if patterns else ""
        raise ValueError(
            f"swap_norm_layers found no layer to replace{flt}; the model contains: {contained}. "
            "Replaceable types: BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm and lightning_bn layers."
        )
    if "" in targets:
        return _make(model, factory, layer_kwargs)
    for name, module in selection.modules:  # refuse before anything is replaced
        check_carriable(name, module)
    # by identity: a module registered at several places gets one new module at all of them
    new_by_id = {id(m): _make(m, factory, layer_kwargs, n) for n, m in selection.modules}
    for parent in list(model.modules()):
        # `_modules`, not named_children(): that one lists a module registered twice only once
        for child_name, child in list(parent._modules.items()):
            if id(child) in new_by_id:
                setattr(parent, child_name, new_by_id[id(child)])
    return model
