"""What :func:`~lightning_bn.layers.swap_norm_layers` carries from an old layer to its
replacement besides the settings and values: which parameters train, the hooks, a missing bias and
parametrisations. Plain torch."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["carry_over", "check_carriable"]

#: The hook tables of an ``nn.Module`` that are moved as they are (the dictionaries themselves, so
#: the ``RemovableHandle`` a user kept still removes the hook from the new layer).
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
#: Hook tables that are not carried: a layer that has any is refused (they usually name the old
#: layer's parameters, e.g. the deprecated ``torch.nn.utils.spectral_norm``).
_STATE_HOOK_TABLES = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _lacks_bias(module: nn.Module) -> bool:
    """Whether ``module`` scales but does not shift (``nn.LayerNorm(bias=False)``, or a layer this
    module gave a fixed zero shift)."""
    return isinstance(getattr(module, "weight", None), nn.Parameter) and not isinstance(
        getattr(module, "bias", None), nn.Parameter
    )


def check_carriable(name: str, old: nn.Module) -> None:
    """Refuse, in one line, a layer whose extras the swap cannot carry.

    Raises:
        ValueError: the layer has state-dict hooks (the deprecated ``weight_norm`` or
            ``spectral_norm`` install them).
    """
    tables = [t for t in _STATE_HOOK_TABLES if getattr(old, t, None)]
    if tables:
        where = f"`{name}`" if name else "the model"
        raise ValueError(
            f"swap_norm_layers cannot carry the state-dict hooks of {where}"
            f" ({type(old).__name__}: {', '.join(tables)}; e.g. the deprecated"
            " torch.nn.utils.weight_norm/spectral_norm); remove them before swapping and use"
            " torch.nn.utils.parametrize (which is carried over)"
        )


def carry_over(name: str, old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` what ``old`` had besides settings and same-named values, in place.

    * ``requires_grad`` of every parameter of the same name; a parameter ``old`` has no
      counterpart of is frozen when every parameter of ``old`` was;
    * a missing bias (``nn.LayerNorm(bias=False)``): the new layer's bias becomes a fixed zero
      buffer outside the ``state_dict``, so no trainable shift appears;
    * forward, forward-pre and backward hooks (the same tables: kept handles still remove them);
    * parametrisations (``torch.nn.utils.parametrize``): the same parametrisation modules are
      registered on the new layer and the originals copied, so the parametrised tensor is the
      old one.

    Raises:
        ValueError: ``old`` has a parametrised tensor the new layer does not have (e.g. ``affine``
            turned off by the swap's keyword arguments).
    """
    if not any(True for _ in new.parameters()) and not any(True for _ in new.buffers()):
        return  # "none": nn.Identity has nothing to carry into
    where = f"`{name}`" if name else "the model"
    bias = getattr(new, "bias", None)
    if _lacks_bias(old) and isinstance(bias, nn.Parameter):
        del new.bias
        new.register_buffer("bias", torch.zeros_like(bias).detach(), persistent=False)
    if parametrize.is_parametrized(old):
        _carry_parametrisations(where, old, new)
    old_params = dict(old.named_parameters())
    frozen = bool(old_params) and not any(p.requires_grad for p in old_params.values())
    for pname, param in new.named_parameters():
        if pname in old_params:
            param.requires_grad_(old_params[pname].requires_grad)
        elif frozen:
            param.requires_grad_(False)
    for table in _HOOK_TABLES:
        hooks = getattr(old, table, None)
        if hooks is None:
            continue
        hooks.update(getattr(new, table, {}))
        setattr(new, table, hooks)


def _carry_parametrisations(where: str, old: nn.Module, new: nn.Module) -> None:
    tables = cast(nn.ModuleDict, old.parametrizations)
    ours_tables = lambda: cast(nn.ModuleDict, new.parametrizations)  # noqa: E731
    for tensor_name, plist in tables.items():
        if not isinstance(getattr(new, tensor_name, None), torch.Tensor):
            raise ValueError(
                f"swap_norm_layers cannot carry the parametrisation of `{tensor_name}` of {where}:"
                f" the new {type(new).__name__} has no `{tensor_name}` (keep `affine=True`)"
            )
        for p in cast(parametrize.ParametrizationList, plist):
            parametrize.register_parametrization(new, tensor_name, p, unsafe=True)
        ours, theirs = ours_tables()[tensor_name], plist
        with torch.no_grad():
            for attr in ("original", *(f"original{i}" for i in range(8))):
                src = getattr(theirs, attr, None)
                dst = getattr(ours, attr, None)
                if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                    if src.shape != dst.shape:
                        raise ValueError(
                            f"swap_norm_layers cannot carry the parametrisation of `{tensor_name}`"
                            f" of {where}: its original has shape {tuple(src.shape)}, the new"
                            f" layer's {tuple(dst.shape)}"
                        )
                    dst.copy_(src)
                    dst.requires_grad_(src.requires_grad)
