"""Hooks at a normalisation layer's own output, also inside layers that fuse an activation.

Plain torch. Third-party libraries subclass a torch norm layer and return more than the
normalisation: timm's ``BatchNormAct2d``, ``GroupNormAct`` and ``LayerNormAct`` compute
``act(drop(norm(x)))``. A forward hook on such a module sees the activation's output, so a
gradient taken there is not :math:`\\partial L / \\partial z` at the norm's output (Theorem 4.1)
and noise added there is not the paper's "noisy BatchNorm".

:func:`register_norm_output_hook` calls a hook with the normalisation's own output :math:`z`
and lets it replace :math:`z`:

- a layer whose ``forward`` is torch's or lightning-bn's
  (:func:`~lightning_bn.layers.registry.overrides_norm_forward` is false): a plain forward hook
  on the module (its output *is* :math:`z`);
- a layer that overrides ``forward``: while its forward runs, a
  :class:`torch.overrides.TorchFunctionMode` catches the first call of a normalisation function
  (``F.batch_norm``, ``F.group_norm``, ``F.layer_norm``, ``F.instance_norm``, ``F.rms_norm``)
  and hands its result to the hook, before the activation sees it. A forward that calls none of
  them (a normalisation written out by hand) gets one warning naming the layer, and the hook is
  not called for it: no number is reported there rather than a wrong one.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_bn.layers.registry import overrides_norm_forward

__all__ = ["NORM_FUNCTIONS", "NormOutputHook", "register_norm_output_hook"]

#: The functions whose result is a normalisation layer's output :math:`z`.
NORM_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    f
    for f in (
        F.batch_norm,
        F.group_norm,
        F.layer_norm,
        F.instance_norm,
        getattr(F, "rms_norm", None),
    )
    if f is not None
)

#: ``hook(module, args, z) -> Tensor | None``: ``args`` are the module's positional inputs, ``z``
#: the normalisation's output; a returned tensor replaces ``z``.
NormOutputHook = Callable[[nn.Module, tuple[Any, ...], Tensor], "Tensor | None"]

# layers already warned about (weak: a warning must not keep a model alive)
_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class _CatchNormOutput(TorchFunctionMode):
    """Calls ``hook`` on the result of the first normalisation function called under it."""

    def __init__(self, module: nn.Module, args: tuple[Any, ...], hook: NormOutputHook) -> None:
        super().__init__()
        self.module, self.args, self.hook = module, args, hook
        self.seen = False

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.seen and func in NORM_FUNCTIONS and isinstance(out, Tensor):
            self.seen = True
            replaced = self.hook(self.module, self.args, out)
            if replaced is not None:
                return replaced
        return out


class _FusedHandle:
    """Removes the pre-hook and forward hook of a fused layer together."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def register_norm_output_hook(
    module: nn.Module, hook: NormOutputHook, *, name: str = "", prepend: bool = False
) -> RemovableHandle | _FusedHandle:
    """Call ``hook(module, args, z)`` with the normalisation's own output at every forward.

    Args:
        module: a normalisation layer (a plain one or one that fuses an activation).
        hook: called with the module's positional inputs and :math:`z`; a returned tensor
            replaces :math:`z` (before any activation the layer applies after it).
        name: the layer's qualified name, for the warning about a forward in which no
            normalisation function was found.
        prepend: run before the module's other hooks (as ``register_forward_hook(prepend=)``).

    Returns:
        A handle whose ``remove()`` removes every hook this call registered.
    """
    if not overrides_norm_forward(module):

        def plain(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            return hook(mod, args, output)  # a non-tensor output is the hook's to refuse

        return module.register_forward_hook(plain, prepend=prepend)

    modes: list[_CatchNormOutput] = []

    def enter(mod: nn.Module, args: tuple[Any, ...]) -> None:
        mode = _CatchNormOutput(mod, args, hook)
        mode.__enter__()
        modes.append(mode)

    def leave(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not modes:
            return
        mode = modes.pop()
        mode.__exit__(None, None, None)
        if not mode.seen and mod not in _warned:
            _warned.add(mod)
            warnings.warn(
                f"lightning-bn: `{name or type(mod).__name__}` ({type(mod).__name__}) overrides"
                " the forward of its normalisation layer and calls no normalisation function"
                " (F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm, F.rms_norm) in it,"
                " so its normalised output cannot be told from what it returns: the layer is"
                " skipped (no value, no noise there)",
                stacklevel=2,
            )

    pre = module.register_forward_pre_hook(enter, prepend=prepend)
    post = module.register_forward_hook(leave, prepend=not prepend, always_call=True)
    return _FusedHandle(pre, post)
