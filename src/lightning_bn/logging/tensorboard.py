"""TensorBoard extras for the diagnostic callbacks: a custom-scalars layout of the paper's panels.

With a :class:`~lightning.pytorch.loggers.TensorBoardLogger` in ``trainer.loggers``, the first
measurement logged in a run writes one layout of TensorBoard's *custom scalars* dashboard to
the logger's event file (``SummaryWriter.add_custom_scalars``): one category per diagnostic
callback instance of the trainer (``ics``, ``ics@late``, ``hessian``, ...) and in it one chart
per panel the callback class declares (:mod:`lightning_bn.logging.keys`), under the panel's
title and with the instance's own key prefix:

- a band panel (Fig. 4a loss range, Fig. 4b gradient predictiveness) is a *margin* chart, the
  lower edge as the line and the band up to the upper edge;
- a per-layer panel is one chart whose tag regex takes every layer (``^ics/.+/l2$``): the
  layers grouped;
- a density panel is two charts, the spectrum's range (``lo``, ``hi``) and the bin masses;
- every declared key no panel shows gets a chart of its own, so each logged family is there.

The layout is written once per run, when every callback of the trainer is set up and knows
its prefix (TensorBoard reads one layout per run). Without a ``TensorBoardLogger`` (or off
global rank zero) nothing happens. Registered with :mod:`lightning_bn.logging.extras` when
:mod:`lightning_bn.logging` is imported; the callbacks know nothing of TensorBoard.

Example::

    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = pl.Trainer(logger=TensorBoardLogger("tb_logs"), callbacks=[ICSCallback()])
    trainer.fit(model)  # then: tensorboard --logdir tb_logs, tab "Custom Scalars"
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import TensorBoardLogger

from lightning_bn.logging.extras import MetricHistory, register_logger_extras
from lightning_bn.logging.keys import LoggedKeys, Panel

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["TENSORBOARD_EXTRAS", "TensorBoardExtras", "custom_scalars_layout"]

#: ``{category: {chart title: ["Multiline", [tag regex, ...]] or ["Margin", [value, lower,
#: upper]]}}``, the dict ``SummaryWriter.add_custom_scalars`` takes.
Layout = dict[str, dict[str, list[Any]]]


def _regex(template: str) -> str:
    """A declared key (``{layer}`` for a layer, ``*`` for anything) as an anchored tag regex."""
    parts = re.split(r"(\{layer\}|\*)", template)
    body = "".join(".+" if p == "{layer}" else ".*" if p == "*" else re.escape(p) for p in parts)
    return f"^{body}$"


def _moved(key: str, base: str, prefix: str) -> str:
    return prefix + key.removeprefix(base) if key.startswith(base) else key


def _panel_charts(panel: Panel, tag: str) -> dict[str, list[Any]]:
    keys = [tag + key for key, _ in panel.lines]
    if panel.kind == "band":
        return {panel.title: ["Margin", [keys[0], keys[0], keys[1]]]}
    if panel.kind == "density":
        family = keys[0].removesuffix("*")
        return {
            f"{panel.title}: spectrum range": [
                "Multiline",
                [_regex(family + "lo"), _regex(family + "hi")],
            ],
            f"{panel.title}: bin masses": ["Multiline", [f"^{re.escape(family)}bin_\\d+$"]],
        }
    return {panel.title: ["Multiline", [_regex(k) for k in keys]]}


def custom_scalars_layout(
    instances: Iterable[tuple[LoggedKeys, str]], tag_prefix: str = ""
) -> Layout:
    """The custom-scalars layout of some callback instances.

    Args:
        instances: ``(declaration, key prefix)`` per callback instance, such as
            ``(ICSCallback.logged_keys, "ics@late/")``.
        tag_prefix: what the logger puts before every key (``TensorBoardLogger(prefix="a")``
            logs ``a-ics/...``).

    Returns:
        ``{category: {chart title: chart}}``: one category per instance, one chart per panel
        and per declared key no panel shows.

    Example:
        >>> from lightning_bn.callbacks import ICSCallback
        >>> layout = custom_scalars_layout([(ICSCallback.logged_keys, "ics@late/")])
        >>> layout["ics@late"]["Internal covariate shift: cos(G, G′) per layer (Fig. 3) [ics@late]"]
        ['Multiline', ['^ics@late/.+/cos$']]
    """
    layout: Layout = {}
    for logged, prefix in instances:
        charts: dict[str, list[Any]] = {}
        shown: set[str] = set()
        for panel in sorted(logged.panels, key=lambda p: p.order):
            moved = panel.for_prefix(logged.prefix, prefix)
            charts.update(_panel_charts(moved, tag_prefix))
            shown.update(key for key, _ in panel.lines)
        for key in logged.keys:
            if key.pattern not in shown:
                regex = _regex(tag_prefix + _moved(key.pattern, logged.prefix, prefix))
                charts[_moved(key.pattern, logged.prefix, prefix)] = ["Multiline", [regex]]
        layout[prefix.removesuffix("/")] = charts
    return layout


def _instances(trainer: Trainer) -> list[tuple[LoggedKeys, str]]:
    """``(declaration, key prefix)`` of each diagnostic callback of the trainer, in order."""
    out: list[tuple[LoggedKeys, str]] = []
    for callback in getattr(trainer, "callbacks", []):
        logged = getattr(type(callback), "logged_keys", None)
        prefix = getattr(callback, "key_prefix", None)
        if isinstance(logged, LoggedKeys) and isinstance(prefix, str):
            out.append((logged, prefix + "/"))
    return out


class TensorBoardExtras:
    """The TensorBoard extras (a :class:`~lightning_bn.logging.extras.LoggerExtras`).

    ``on_log`` (and ``on_fit_end``, for a run that measured nothing) writes the custom-scalars
    layout of every diagnostic callback of the trainer, once per event file.
    """

    name = "TensorBoard"

    def __init__(self) -> None:
        """No layout written yet."""
        self._written: weakref.WeakSet[Any] = weakref.WeakSet()

    def on_setup(self, trainer: Trainer, callback_name: str, settings: Mapping[str, Any]) -> None:
        """Nothing: a sibling callback may not know its key prefix yet."""

    def on_log(self, trainer: Trainer, keys: Iterable[str]) -> None:
        """Write the layout before the run's first measurement."""
        self.write_layout(trainer)

    def on_fit_end(self, trainer: Trainer, history: MetricHistory) -> None:
        """Write the layout if no measurement did."""
        self.write_layout(trainer)

    def write_layout(self, trainer: Trainer) -> bool:
        """Write the layout to each ``TensorBoardLogger``'s writer that has none yet.

        Returns:
            Whether a layout was written.
        """
        if not trainer.is_global_zero:
            return False
        wrote = False
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            if writer in self._written:
                continue
            # TensorBoardLogger.log_metrics prepends f"{prefix}-"; the prefix has no accessor
            prefix = getattr(logger, "_prefix", "") or ""
            tag_prefix = f"{prefix}{logger.LOGGER_JOIN_CHAR}" if prefix else ""
            writer.add_custom_scalars(custom_scalars_layout(_instances(trainer), tag_prefix))
            writer.flush()
            self._written.add(writer)
            wrote = True
        return wrote


#: The instance registered with :func:`lightning_bn.logging.extras.register_logger_extras`.
TENSORBOARD_EXTRAS = TensorBoardExtras()
register_logger_extras(TENSORBOARD_EXTRAS)
