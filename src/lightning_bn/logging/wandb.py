"""Weights & Biases set-up for the diagnostic callbacks: metric summaries, config, paper panels.

This is the one module of lightning-bn that knows W&B. The diagnostic callbacks reach it only
through :mod:`lightning_bn.logging.extras`: :class:`WandbExtras` is registered there when the
package is imported and acts when a ``WandbLogger`` is among ``trainer.loggers``.

Plain functions that the callbacks call with their ``trainer``; each one acts on the W&B run
of every :class:`~lightning.pytorch.loggers.WandbLogger` in ``trainer.loggers``, on global rank
zero only, and does nothing when there is none (so a run with a CSV or TensorBoard logger
alone is unaffected). ``wandb`` is imported lazily: importing this module needs neither a
configured ``wandb`` nor an account.

Two facts about W&B shape this module (wandb 0.31, ``wandb-core``):

* ``define_metric`` accepts a ``*`` only as the *last* character (``"ics/*"``);
  ``"ics/*/l2"`` raises. Suffix globs are also unreliable next to the ``"*"`` glob that
  ``WandbLogger`` defines (``define_metric("*", step_metric="trainer/global_step")``): wandb
  picks the first matching glob in map order, so a run may or may not get the summary.
  :func:`define_metrics` therefore matches its glob patterns here against the concrete keys
  the callback will log and defines each key by its full name.
* In a ``define_metric`` name a ``.`` separates nested keys; a key that contains a dot (layer
  names such as ``model.0``) must be written with the dot escaped, ``ics/model\\.0/l2``, or
  its summary lands on a nested path and the logged key keeps the default (last value).

Example::

    from lightning_bn.logging.wandb import (
        define_metrics, log_config, log_paper_panels
    )
    from lightning_bn.logging.keys import summaries

    # in __init__()
    history = MetricHistory()

    # in setup(), once the layer names are known
    keys = [f"ics/{name}/{q}" for name in layer_names for q in ("l2", "cos")]
    define_metrics(trainer, summaries(), keys=keys)
    log_config(trainer, "ICSCallback", {"every_n_steps": 10, "layers": layer_names})

    # after each measurement
    history.add(trainer.global_step, metrics)

    # in on_fit_end()
    log_paper_panels(trainer, history)
"""

from __future__ import annotations

import enum
import fnmatch
import math
import re
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import WandbLogger

from lightning_bn.logging.extras import MetricHistory, register_logger_extras
from lightning_bn.logging.keys import Panel, instance_summaries, panels_for

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from wandb.wandb_run import Run

__all__ = [
    "STEP_METRIC",
    "Panel",
    "WandbExtras",
    "define_metrics",
    "finish_active_run",
    "log_config",
    "log_paper_panels",
    "wandb_runs",
]

STEP_METRIC = "trainer/global_step"
"""The x axis: ``WandbLogger.log_metrics`` adds this key to every row it logs."""

_SUMMARY_OPS = ("min", "max", "mean", "first", "last", "none")
_GLOB_CHARS = frozenset("*?[")

# Metric names already defined per run, so that repeated calls add no duplicate records.
_DEFINED: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def _targets(trainer: Trainer) -> list[tuple[Run, str]]:
    """``(run, key prefix)`` of every WandbLogger on rank zero (the prefix the logger adds)."""
    if not trainer.is_global_zero:
        return []
    targets: list[tuple[Run, str]] = []
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        # WandbLogger.log_metrics prepends f"{prefix}{LOGGER_JOIN_CHAR}" to every key; the
        # prefix has no public accessor.
        prefix = getattr(logger, "_prefix", "") or ""
        key_prefix = f"{prefix}{logger.LOGGER_JOIN_CHAR}" if prefix else ""
        if not any(r is run and p == key_prefix for r, p in targets):
            targets.append((run, key_prefix))
    return targets


def wandb_runs(trainer: Trainer) -> list[Run]:
    """The W&B run of every ``WandbLogger`` in ``trainer.loggers``.

    Reading ``logger.experiment`` starts the run if the logger has not started it yet.

    Args:
        trainer: The trainer whose loggers to inspect.

    Returns:
        The runs, each once, in logger order; an empty list on a rank other than global
        rank zero or when no ``WandbLogger`` is attached.
    """
    runs: list[Run] = []
    for run, _ in _targets(trainer):
        if not any(r is run for r in runs):
            runs.append(run)
    return runs


def _check_summary(pattern: str, summary: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"Expected metric patterns to be non-empty strings, but got {pattern!r}")
    if not isinstance(summary, str):
        raise TypeError(
            f"Expected the summary for `{pattern}` to be a str, but got {type(summary).__name__}"
        )
    ops = [op.strip().lower() for op in summary.split(",")]
    bad = [op for op in ops if op not in _SUMMARY_OPS]
    if bad:
        raise ValueError(
            f"Expected the summary for `{pattern}` to be a comma-separated list of "
            f"{', '.join(_SUMMARY_OPS)}, but got {summary!r}"
        )


def _resolve(patterns: Mapping[str, str], keys: Iterable[str] | None) -> dict[str, str]:
    """Metric name -> summary: each key takes its first matching pattern's summary.

    Without ``keys`` the patterns themselves are the names, so none may contain a glob.
    """
    if keys is None:
        globs = [p for p in patterns if _GLOB_CHARS.intersection(p)]
        if globs:
            raise ValueError(
                f"Expected argument `keys` (the concrete metric keys) for the glob patterns "
                f"{globs}: W&B accepts a `*` only at the end of a name, so the globs are "
                "matched against the keys here"
            )
        return dict(patterns)
    resolved: dict[str, str] = {}
    for key in [keys] if isinstance(keys, str) else keys:
        for pattern, summary in patterns.items():
            if fnmatch.fnmatchcase(key, pattern):
                resolved[key] = summary
                break
    return resolved


def _escape(name: str) -> str:
    """A key as ``define_metric`` expects it: dots escaped so it is not read as a nested path."""
    return name.replace(".", "\\.")


def define_metrics(
    trainer: Trainer, patterns: Mapping[str, str], keys: Iterable[str] | None = None
) -> list[str]:
    """Define each metric on the W&B runs: x axis ``trainer/global_step`` and a summary.

    Calls ``run.define_metric("trainer/global_step")`` and, for every metric name,
    ``run.define_metric(name, step_metric="trainer/global_step", summary=...)``. The names
    are the ``keys``, each with the summary of the first pattern it matches (keys that match
    no pattern are left alone); without ``keys``, the patterns themselves. Patterns are
    ``fnmatch`` globs matched here, so ``"ics/*/l2"`` works although W&B only accepts a
    trailing ``*``. Names get the logger's ``prefix`` and have their dots escaped for W&B.

    Calling again is cheap: names already defined with the same summary are skipped, so a
    callback may pass the keys of each ``log_metrics`` call before making it. Call it before
    the first value of a key is logged: the summary covers the values logged after it.

    Args:
        trainer: The trainer whose ``WandbLogger`` runs to configure.
        patterns: Key glob -> summary, such as ``{"ics/*/l2": "max", "ics/*/cos": "min"}``;
            a summary is one of ``min``, ``max``, ``mean``, ``first``, ``last``, ``none`` or
            a comma-separated list of them. See :func:`lightning_bn.logging.keys.summaries`.
        keys: The concrete keys the caller logs, such as ``"ics/model.0/l2"``; ``None``
            to define the patterns as they are (then none may contain a glob).

    Returns:
        The metric names (prefixed, unescaped) newly defined on at least one run; empty on
        ranks other than zero and without a ``WandbLogger``.

    Raises:
        ValueError: If a pattern is empty, a summary names an unknown operation, or
            ``keys`` is ``None`` and a pattern contains a glob.
        TypeError: If a summary is not a string.
    """
    for pattern, summary in patterns.items():
        _check_summary(pattern, summary)
    resolved = _resolve(patterns, keys)

    defined: list[str] = []
    for run, prefix in _targets(trainer):
        done = _DEFINED.setdefault(run, {})
        if STEP_METRIC not in done:
            run.define_metric(STEP_METRIC)
            done[STEP_METRIC] = ""
        for name, summary in resolved.items():
            full = prefix + name
            if done.get(full) == summary:
                continue
            run.define_metric(_escape(full), step_metric=STEP_METRIC, summary=summary)
            done[full] = summary
            if full not in defined:
                defined.append(full)
    return defined


def _config_value(value: Any) -> Any:
    """A JSON-friendly copy of a setting: containers recursed, callables by name, rest as str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _config_value(value.value)
    if isinstance(value, Mapping):
        return {str(k): _config_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_config_value(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_config_value(v) for v in value), key=repr)
    numel = getattr(value, "numel", None)
    if callable(numel) and numel() == 1 and hasattr(value, "item"):
        return value.item()  # one-element tensor or array
    if callable(value):
        return getattr(value, "__qualname__", None) or repr(value)
    return str(value)


def log_config(trainer: Trainer, name: str, settings: Mapping[str, Any]) -> None:
    """Put a callback's settings in the W&B run config under ``name``.

    Updates with ``allow_val_change=True``, so a second fit (or a resumed run) may change
    them. Values are made JSON-friendly: tuples and sets become lists, enums their value,
    one-element tensors a number, callables their qualified name, anything else ``str``.

    Args:
        trainer: The trainer whose ``WandbLogger`` runs to update.
        name: The config key, such as ``"ICSCallback"``.
        settings: The callback's constructor arguments (or any mapping).

    Raises:
        ValueError: If ``name`` is empty.
        TypeError: If ``settings`` is not a mapping.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected argument `name` to be a non-empty str, but got {name!r}")
    if not isinstance(settings, Mapping):
        raise TypeError(
            f"Expected argument `settings` to be a mapping, but got {type(settings).__name__}"
        )
    value = _config_value(settings)
    for run in wandb_runs(trainer):
        run.config.update({name: value}, allow_val_change=True)


def log_paper_panels(
    trainer: Trainer,
    history: MetricHistory,
    panels: Iterable[Panel] | None = None,
) -> list[str]:
    """Log the paper's figures as W&B line-series charts (``wandb.plot.line_series``).

    Each panel becomes one chart against ``trainer/global_step``: the min-max bands of the
    loss landscape (``panels/loss_range``) and of gradient predictiveness
    (``panels/grad_predictiveness``), ``panels/beta_smoothness``, one line per layer in
    ``panels/ics_l2``, ``panels/ics_cos``, ``panels/thm41_ratio`` and
    ``panels/act_grad_norm``, and ``panels/hessian_top_eig`` and ``panels/grad_curvature``
    (the panels the callback classes declare, which ``lightning-bn plot`` draws
    under the same names). A panel with no data
    in ``history`` is skipped; non-finite values are left out of the charts. Call it at the
    end of fit; calling it again logs new versions of the charts (W&B shows the latest).

    Args:
        trainer: The trainer whose ``WandbLogger`` runs to log to.
        history: The measurements (see :class:`~lightning_bn.logging.extras.MetricHistory`).
        panels: The charts to draw; by default every panel the callback classes declare,
            for each callback instance in ``history`` (:func:`lightning_bn.logging.keys.panels_for`:
            a callback with ``name="late"`` gets ``panels/ics_l2@late``, ...). A density panel
            (``kind="density"``) is a ``wandb.Table`` of ``step``, ``lo``, ``hi``, ``bin``,
            ``value`` (the bin's centre) and ``mass`` per measured step and bin.

    Returns:
        The keys logged (with the logger's prefix); empty on ranks other than zero, without
        a ``WandbLogger`` or without data.
    """
    targets = _targets(trainer)
    if not targets:
        return []
    import wandb

    drawn: list[tuple[Panel, list[str], list[list[int]], list[list[float]]]] = []
    tables: dict[str, Any] = {}
    for panel in panels_for(history.keys()) if panels is None else panels:
        if panel.kind == "density":
            rows = _density_rows(history, panel.lines[0][0].removesuffix("*"))
            if rows:
                tables[panel.key] = rows
            continue
        labels: list[str] = []
        xs: list[list[int]] = []
        ys: list[list[float]] = []
        for key, label in panel.resolve(history.keys()):
            points = [(s, v) for s, v in zip(*history.series(key), strict=True) if math.isfinite(v)]
            if points:
                labels.append(label)
                xs.append([s for s, _ in points])
                ys.append([v for _, v in points])
        if labels:
            drawn.append((panel, labels, xs, ys))
    if not drawn and not tables:
        return []

    logged: list[str] = []
    for run, prefix in targets:
        payload: dict[str, Any] = {
            prefix + panel.key: wandb.plot.line_series(
                xs, ys, keys=labels, title=panel.title, xname=STEP_METRIC
            )
            for panel, labels, xs, ys in drawn
        }
        for key, rows in tables.items():
            payload[prefix + key] = wandb.Table(columns=list(_DENSITY_COLUMNS), data=rows)
        run.log({**payload, STEP_METRIC: trainer.global_step})
        logged.extend(k for k in payload if k not in logged)
    return logged


_DENSITY_COLUMNS = ("step", "lo", "hi", "bin", "value", "mass")


def _density_rows(history: MetricHistory, family: str) -> list[list[float]]:
    """One row per measured step and bin of a logged histogram (``<family>lo``, ``hi``, ``bin_<j>``)."""
    pattern = re.compile(re.escape(family) + r"bin_(\d+)\Z")
    names = history.keys()
    bins = sorted((int(m[1]), key) for key in names if (m := pattern.match(key)))
    lo = dict(zip(*history.series(family + "lo"), strict=True))
    hi = dict(zip(*history.series(family + "hi"), strict=True))
    rows: list[list[float]] = []
    for step in sorted(set(lo) & set(hi)):
        width = (hi[step] - lo[step]) / max(len(bins), 1)
        for j, key in bins:
            mass = dict(zip(*history.series(key), strict=True)).get(step)
            if mass is not None and math.isfinite(mass):
                centre = lo[step] + (j + 0.5) * width
                rows.append([step, lo[step], hi[step], j, centre, mass])
    return rows


class WandbExtras:
    """The W&B extras of every diagnostic callback (a :class:`~lightning_bn.logging.extras.LoggerExtras`).

    - ``on_setup``: the callback's settings into the run config (:func:`log_config`);
    - ``on_log``: a summary per key before its first value (:func:`define_metrics` with
      the summaries the callback classes declare);
    - ``on_fit_end``: the paper's charts (:func:`log_paper_panels`).

    Each does nothing unless a ``WandbLogger`` is attached (and only on global rank zero).
    """

    name = "W&B"

    def on_setup(self, trainer: Trainer, callback_name: str, settings: Mapping[str, Any]) -> None:
        """Put ``settings`` in the run config under ``callback_name``."""
        log_config(trainer, callback_name, settings)

    def on_log(self, trainer: Trainer, keys: Iterable[str]) -> None:
        """Define the summary of each new key (the paper's min/max/last)."""
        define_metrics(trainer, instance_summaries(), keys=keys)

    def on_fit_end(self, trainer: Trainer, history: MetricHistory) -> None:
        """Log the paper's figures as W&B line-series charts."""
        log_paper_panels(trainer, history)


def finish_active_run() -> None:
    """Finish the process's current W&B run if one is open (``wandb`` imported only then).

    ``WandbLogger`` reuses a run left open by an earlier ``wandb.init``; a caller that starts
    one run per experiment calls this first.
    """
    import sys

    wandb = sys.modules.get("wandb")  # no run can be open if wandb was never imported
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


#: The instance registered with :func:`lightning_bn.logging.extras.register_logger_extras`.
WANDB_EXTRAS = WandbExtras()
register_logger_extras(WANDB_EXTRAS)


def __getattr__(name: str) -> Any:
    # the tables of the built-in callbacks moved to lightning_bn.callbacks (which defines them)
    from lightning_bn import _deprecated

    return _deprecated.moved_name(__name__, name)
