"""Every deprecated import path of lightning-bn, with the version that removes it.

Modules that moved keep their old name for a while: importing ``lightning_bn.plotting`` gives a
module that forwards every attribute to :mod:`lightning_bn.figures.draw` and warns once with a
:class:`DeprecationWarning` that names the new path and the version that removes the old one.
Names that moved between modules are listed in :data:`MOVED_NAMES` and forwarded the same way.

The package root installs :class:`_MovedModuleFinder` on :data:`sys.meta_path` when it is
imported; nothing else in the package imports this module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["MOVED_MODULES", "MOVED_NAMES", "REMOVED_IN", "install", "moved_name"]

#: The release that removes every alias below.
REMOVED_IN = "0.3.0"

#: Old module path -> new module path.
MOVED_MODULES: dict[str, str] = {
    "lightning_bn.batched": "lightning_bn.probe.batched",
    "lightning_bn.convert": "lightning_bn.layers.convert",
    "lightning_bn.csv_log": "lightning_bn.logging.csv_log",
    "lightning_bn.diagnostics.noise": "lightning_bn.noise",
    "lightning_bn.logger_extras": "lightning_bn.logging.extras",
    "lightning_bn.panels": "lightning_bn.logging.panels",
    "lightning_bn.paramvec": "lightning_bn.diagnostics.paramvec",
    "lightning_bn.plotting": "lightning_bn.figures.draw",
    "lightning_bn.run_figures": "lightning_bn.plot.run_figures",
    "lightning_bn.run_logs": "lightning_bn.plot.run_logs",
    "lightning_bn.selection": "lightning_bn.layers.selection",
    "lightning_bn.wandb_panels": "lightning_bn.logging.wandb",
}

#: ``(old module, name) -> (new module, new name)`` for names that left the module they were
#: imported from (the old module may itself be an alias of :data:`MOVED_MODULES`).
MOVED_NAMES: dict[tuple[str, str], tuple[str, str]] = {
    ("lightning_bn.plotting", "plot_run"): ("lightning_bn.reproduce.figures", "plot_run"),
    ("lightning_bn.logging.panels", "PAPER_PANELS"): ("lightning_bn.callbacks", "PAPER_PANELS"),
    ("lightning_bn.panels", "PAPER_PANELS"): ("lightning_bn.callbacks", "PAPER_PANELS"),
    ("lightning_bn.logging.wandb", "PAPER_PANELS"): ("lightning_bn.callbacks", "PAPER_PANELS"),
    ("lightning_bn.wandb_panels", "PAPER_PANELS"): ("lightning_bn.callbacks", "PAPER_PANELS"),
    ("lightning_bn.logging.wandb", "PAPER_SUMMARIES"): (
        "lightning_bn.callbacks",
        "PAPER_SUMMARIES",
    ),
    ("lightning_bn.wandb_panels", "PAPER_SUMMARIES"): ("lightning_bn.callbacks", "PAPER_SUMMARIES"),
    ("lightning_bn.wandb_panels", "PanelHistory"): ("lightning_bn.logging.extras", "MetricHistory"),
    ("lightning_bn.logging.wandb", "PanelHistory"): (
        "lightning_bn.logging.extras",
        "MetricHistory",
    ),
}


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"`{old}` is deprecated and will be removed in lightning-bn {REMOVED_IN}; use `{new}`",
        DeprecationWarning,
        stacklevel=3,
    )


class _Alias(types.ModuleType):
    """A moved module under its old name: every attribute is read from the new module."""

    def __init__(self, old: str, new: str) -> None:
        super().__init__(old, f"Deprecated alias of :mod:`{new}` (removed in {REMOVED_IN}).")
        self.__alias_of__ = new

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        moved = MOVED_NAMES.get((self.__name__, name))
        if moved is not None:
            _warn(f"{self.__name__}.{name}", f"{moved[0]}.{moved[1]}")
            return getattr(importlib.import_module(moved[0]), moved[1])
        return getattr(importlib.import_module(self.__alias_of__), name)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__alias_of__))


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        _warn(spec.name, self.new)
        return _Alias(spec.name, self.new)

    def exec_module(self, module: types.ModuleType) -> None:
        importlib.import_module(self.new)  # a typo in the table fails at import, not later


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of moved modules (and nothing else)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def moved_name(module: str, name: str) -> Any:
    """The value of a name that left ``module`` (its module ``__getattr__`` calls this), with a
    :class:`DeprecationWarning`.

    Raises:
        AttributeError: ``name`` never was in ``module``.
    """
    moved = MOVED_NAMES.get((module, name))
    if moved is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn(f"{module}.{name}", f"{moved[0]}.{moved[1]}")
    return getattr(importlib.import_module(moved[0]), moved[1])


def install() -> None:
    """Put the finder of moved modules on :data:`sys.meta_path` (once)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
