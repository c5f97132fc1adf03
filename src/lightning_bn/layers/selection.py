"""Choose submodules of a model by qualified-name glob, by type, or by a default set of types.

Plain torch. One selector serves every part of the package that lets a user name layers:
:func:`lightning_bn.diagnostics.ics.measured_layers` (the layers ICS measures),
:func:`lightning_bn.layers.convert.swap_norm_layers` (``include=``) and
:class:`lightning_bn.callbacks.NoiseInjectionCallback` (``targets=``).

A *selector* is a glob on qualified module names (``"features.*.bn"``, matched with
:func:`fnmatch.fnmatchcase`, so case-sensitive) or an ``nn.Module`` subclass (matched with
``isinstance``). A module is selected when any selector matches it (a union); ``within``
narrows the result to some types (an intersection). Each caller words its own error for a
selector that matched nothing from :attr:`Selection.unmatched`, or lets :func:`select_modules`
raise one.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    >>> [name for name, _ in select_modules(net, ["0", nn.ReLU])]
    ['0', '2']
    >>> [name for name, _ in select_modules(net, None, default=(nn.Linear,))]
    ['0', '3']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "Selection",
    "Selector",
    "check_selectors",
    "describe_modules",
    "match_modules",
    "select_modules",
    "selector_repr",
]

#: A glob on qualified module names or an ``nn.Module`` subclass.
Selector = str | type[nn.Module]

_MAX_LISTED = 30


@dataclass(frozen=True)
class Selection:
    """The result of :func:`match_modules`.

    Attributes:
        modules: ``(qualified name, module)`` pairs, in ``named_modules()`` (registration) order,
            each module once.
        unmatched: the selectors that matched no module (before ``within`` narrowed the result),
            in the order given; empty when the default was used.
    """

    modules: list[tuple[str, nn.Module]]
    unmatched: tuple[Selector, ...]


def check_selectors(value: Any, argument: str = "targets") -> tuple[Selector, ...] | None:
    """Validate a user's selectors: ``None``, one selector, or a non-empty sequence of them.

    Args:
        value: what the user passed.
        argument: the argument's name, for the error messages.

    Returns:
        ``None`` (use the default) or the selectors as a tuple.

    Raises:
        TypeError: neither ``None``, a string, a module class nor a sequence of them; an entry
            that is neither a string nor an ``nn.Module`` subclass.
        ValueError: an empty sequence or an empty string.
    """
    if value is None:
        return None
    items = [value] if isinstance(value, (str, type)) else value
    if not isinstance(items, Sequence):
        raise TypeError(
            f"Expected argument `{argument}` to be None, a glob string, an nn.Module subclass or "
            f"a sequence of them, but got {value!r}"
        )
    if len(items) == 0:
        raise ValueError(f"Expected argument `{argument}` to name at least one module, but got []")
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ValueError(
                    f"Expected argument `{argument}` to hold non-empty glob strings, but got ''"
                )
        elif not (isinstance(item, type) and issubclass(item, nn.Module)):
            raise TypeError(
                f"Expected argument `{argument}` to hold glob strings or nn.Module subclasses, "
                f"but got {item!r}"
            )
    return tuple(items)


def match_modules(
    root: nn.Module,
    selectors: Sequence[Selector] | None,
    *,
    default: tuple[type[nn.Module], ...] | Callable[[nn.Module], bool] = (),
    within: tuple[type[nn.Module], ...] | None = None,
    include_root: bool = False,
) -> Selection:
    """Select submodules of ``root`` without raising; see :class:`Selection`.

    Args:
        root: the model.
        selectors: globs and types (a union), or ``None`` for ``default``.
        default: the types selected when ``selectors`` is ``None``, or a predicate on modules
            (e.g. :func:`lightning_bn.layers.is_norm_layer`, which also recognises layers by
            structure).
        within: keep only modules of these types (applied after the selectors).
        include_root: whether ``root`` itself (name ``""``) can be selected.

    Returns:
        The selected modules and the selectors that matched nothing.
    """
    named = [(n, m) for n, m in root.named_modules() if include_root or n]
    if not isinstance(default, tuple):  # a predicate
        if selectors is None:
            picked = [(n, m) for n, m in named if default(m)]
            return Selection(
                [(n, m) for n, m in picked if within is None or isinstance(m, within)], ()
            )
        default = ()
    chosen: list[Selector] = list(default) if selectors is None else list(selectors)
    hit: set[int] = set()
    modules: list[tuple[str, nn.Module]] = []
    for name, module in named:
        matched = False
        for index, sel in enumerate(chosen):
            if fnmatch.fnmatchcase(name, sel) if isinstance(sel, str) else isinstance(module, sel):
                hit.add(index)
                matched = True
        if matched and (within is None or isinstance(module, within)):
            modules.append((name, module))
    unmatched = () if selectors is None else tuple(s for i, s in enumerate(chosen) if i not in hit)
    return Selection(modules, unmatched)


def select_modules(
    root: nn.Module,
    selectors: Sequence[Selector] | None,
    *,
    default: tuple[type[nn.Module], ...] = (),
    within: tuple[type[nn.Module], ...] | None = None,
    include_root: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Select submodules of ``root`` by globs and types; every selector must match a module.

    Args: as :func:`match_modules`.

    Returns:
        ``(qualified name, module)`` pairs in registration order.

    Raises:
        ValueError: a selector that matches no module (the message names it and lists what
            the model contains).
    """
    selection = match_modules(
        root, selectors, default=default, within=within, include_root=include_root
    )
    if selection.unmatched:
        missing = ", ".join(
            repr(s) if isinstance(s, str) else selector_repr(s) for s in selection.unmatched
        )
        raise ValueError(
            f"Expected every selector to match a module of {type(root).__name__}, but {missing} "
            f"matched none. The model contains: {describe_modules(root)}"
        )
    return selection.modules


def selector_repr(selector: Selector) -> str:
    """A glob as it is, a type by its qualified name (``torch.nn.modules.linear.Linear``)."""
    if isinstance(selector, str):
        return selector
    return f"{selector.__module__}.{selector.__qualname__}"


def describe_modules(root: nn.Module, limit: int = _MAX_LISTED) -> str:
    """``"name (Type), ..."`` for the first ``limit`` submodules, for error messages."""
    entries = [f"{name} ({type(m).__name__})" for name, m in root.named_modules() if name]
    if not entries:
        return f"no submodules (the root is {type(root).__name__})"
    listed = ", ".join(entries[:limit])
    more = len(entries) - limit
    return listed + (f", … and {more} more" if more > 0 else "")
