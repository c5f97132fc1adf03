"""Logger extras: what a diagnostic callback adds for one kind of logger beyond its scalars.

Every Lightning logger of the trainer receives every scalar through ``log_metrics``; some
loggers can do more (W&B: a summary per metric, the callback's settings in the run config,
charts at the end of fit). :class:`~lightning_bn.callbacks.base.DiagnosticCallback` calls the
three hooks of every registered :class:`LoggerExtras` and knows no logger by name; each extra
decides from ``trainer.loggers`` whether it has anything to do (and does nothing otherwise).

:mod:`lightning_bn.logging.wandb` registers the W&B extras when the package is imported. A
user may register their own (e.g. for a TensorBoard layout) with :func:`register_logger_extras`.

Example::

    from lightning_bn.logging.extras import register_logger_extras

    class PrintKeys:
        name = "print"

        def on_setup(self, trainer, callback_name, settings):
            print(callback_name, dict(settings))

        def on_log(self, trainer, keys):
            pass

        def on_fit_end(self, trainer, history):
            print(history.keys())

    register_logger_extras(PrintKeys())
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = [
    "LoggerExtras",
    "MetricHistory",
    "logger_extras",
    "register_logger_extras",
    "unregister_logger_extras",
]


class MetricHistory:
    """The measurements a callback logged: key -> {step: value}.

    A diagnostic callback feeds it every measurement it logs, so logger extras can draw
    charts at the end of fit and the figure builders of :mod:`lightning_bn.figures.draw` can read
    it (:meth:`series` gives a key's ``(steps, values)``). Logging a key again at a step it
    already holds replaces the value (a resumed run that repeats a step does not draw it twice).
    ``state_dict``/``load_state_dict`` let a callback keep it across a checkpoint resume.

    Example::

        history = MetricHistory()
        history.add(10, {"ics/model.0/l2": 0.3, "ics/model.0/cos": 0.9})
        steps, values = history.series("ics/model.0/l2")  # ([10], [0.3])
    """

    def __init__(self) -> None:
        """Create an empty history."""
        self._series: dict[str, dict[int, float]] = {}

    def add(self, step: int, values: Mapping[str, Any]) -> None:
        """Record one measurement.

        Args:
            step: The trainer's ``global_step`` of the measurement.
            values: Key -> scalar (a float, int, 0-d tensor or numpy scalar).

        Raises:
            TypeError: If ``step`` is not an integer or a value is not a scalar.
        """
        try:
            if isinstance(step, bool):
                raise TypeError
            step = operator.index(step)
        except TypeError:
            raise TypeError(f"Expected argument `step` to be an int, but got {step!r}") from None
        for key, value in values.items():
            try:
                number = float(value)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(
                    f"Expected the value of `{key}` to be a scalar, but got {value!r}"
                ) from err
            self._series.setdefault(key, {})[step] = number

    def keys(self) -> list[str]:
        """The keys recorded, in the order first seen."""
        return list(self._series)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``key``, sorted by step; empty lists for an unknown key."""
        points = sorted(self._series.get(key, {}).items())
        return [s for s, _ in points], [v for _, v in points]

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def __len__(self) -> int:
        return len(self._series)

    def state_dict(self) -> dict[str, Any]:
        """The history as plain lists, for a checkpoint."""
        return {"series": {k: sorted(v.items()) for k, v in self._series.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the history with one saved by :meth:`state_dict`."""
        self._series = {
            str(k): {int(s): float(v) for s, v in points}
            for k, points in state_dict["series"].items()
        }


@runtime_checkable
class LoggerExtras(Protocol):
    """What a diagnostic callback does for one kind of logger besides ``log_metrics``.

    Each hook receives the trainer and acts on the loggers in ``trainer.loggers`` it knows
    (on global rank zero, where loggers write); with none of them it does nothing. A hook
    may raise: the callback turns an exception into a
    :class:`~lightning_bn.callbacks.base.DiagnosticWarning` and training goes on.

    Attributes:
        name: Shown in warnings, such as ``"W&B"``.
    """

    name: str

    def on_setup(self, trainer: Trainer, callback_name: str, settings: Mapping[str, Any]) -> None:
        """At ``setup("fit")``: the callback's class name and constructor arguments."""

    def on_log(self, trainer: Trainer, keys: Iterable[str]) -> None:
        """Right before the callback logs a measurement with these keys."""

    def on_fit_end(self, trainer: Trainer, history: MetricHistory) -> None:
        """At the end of fit, with everything the callback logged (also before a resume)."""


_REGISTRY: list[LoggerExtras] = []


def register_logger_extras(extras: LoggerExtras) -> None:
    """Add ``extras`` to those every diagnostic callback calls (once; order kept).

    Raises:
        TypeError: If ``extras`` does not implement :class:`LoggerExtras`.
    """
    if not isinstance(extras, LoggerExtras):
        raise TypeError(
            "Expected argument `extras` to implement `LoggerExtras` (name, on_setup, on_log,"
            f" on_fit_end), but got {extras!r}"
        )
    if not any(e is extras for e in _REGISTRY):
        _REGISTRY.append(extras)


def unregister_logger_extras(extras: LoggerExtras) -> None:
    """Remove ``extras`` (no error when it is not registered)."""
    _REGISTRY[:] = [e for e in _REGISTRY if e is not extras]


def logger_extras() -> tuple[LoggerExtras, ...]:
    """The registered extras, in registration order."""
    return tuple(_REGISTRY)
