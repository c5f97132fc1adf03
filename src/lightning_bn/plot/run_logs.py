"""Read logged runs back for ``lightning-bn plot``: CSVLogger and TensorBoard logs, reproduce runs.

A *run* given to ``lightning-bn plot`` (or :func:`lightning_bn.plot_runs`) is one of

- a Lightning :class:`~lightning.pytorch.loggers.CSVLogger` ``metrics.csv`` file;
- a TensorBoard event file (``events.out.tfevents.*``, as Lightning's
  :class:`~lightning.pytorch.loggers.TensorBoardLogger` writes), read with the ``tensorboard``
  package's own reader (``pip install lightning-bn[tensorboard]``); TensorBoard keeps scalars
  in float32, so its values are the CSV values rounded to float32;
- a folder holding either, directly or at any depth of ``version_N`` folders (the newest
  version is taken, and the choice is said in :attr:`LoggedRun.notes`; a folder holding both
  a ``metrics.csv`` and event files is read from the CSV, which keeps float64);
- a ``lightning-bn reproduce`` run folder (it holds ``run.json``): each of its variants whose
  training finished becomes one run; unfinished ones are listed as incomplete, never drawn.

Every problem with a file (missing, unreadable, not a CSV, cut short, no diagnostic key)
raises :class:`LogFormatError` whose message is one line naming the file and the problem.
This module needs neither matplotlib nor Lightning.

Example::

    from lightning_bn.plot.run_logs import load_runs

    runs = load_runs(["lightning_logs/bn", "lightning_logs/plain"], labels=["BN", "plain"])
    [r.label for r in runs]  # ['BN', 'plain']
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import lightning_bn.callbacks  # noqa: F401  (defines the built-in callbacks: their keys are declared)
from lightning_bn._types import Series
from lightning_bn.logging.csv_log import LogFormatError, read_csv_log
from lightning_bn.logging.keys import instance_of, owners, prefixes

__all__ = [
    "DIAGNOSTIC_PREFIXES",  # noqa: F822 (module __getattr__)
    "Loaded",
    "LogFormatError",
    "LoggedRun",
    "diagnostic_prefixes",
    "find_metrics_csv",
    "find_run_log",
    "load_runs",
    "parse_steps",
    "read_csv_log",
    "read_event_log",
]


#: The key prefixes of lightning-bn's four diagnostic callbacks.
_METRICS = "metrics.csv"
_VERSION = re.compile(r"version_(\d+)\Z")
_EVENTS = "events.out.tfevents.*"


@dataclass
class LoggedRun:
    """One run as ``lightning-bn plot`` reads it.

    Attributes:
        label: its legend entry.
        source: the file its history was read from.
        series: logged key -> ``(steps int64, values float64)``, sorted by step.
        notes: lines to show the user about how it was read (the version chosen, ...).
    """

    label: str
    source: Path
    series: dict[str, Series] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def diverged_at(self, key: str = "train/loss") -> int | None:
        """The first step at which ``key`` (the training loss) is not finite, else ``None``."""
        steps, values = self.series.get(key, (np.zeros(0, np.int64), np.zeros(0)))
        bad = ~np.isfinite(values)
        return int(steps[int(np.argmax(bad))]) if bad.any() else None


@dataclass
class Loaded:
    """What :func:`load_runs` found.

    Attributes:
        runs: the runs to draw, in the order given (a reproduce run's variants in plan order).
        incomplete: one line per run left out because it did not finish (each says
            "incomplete" and why).
    """

    runs: list[LoggedRun]
    incomplete: list[str] = field(default_factory=list)


def find_metrics_csv(folder: Path) -> tuple[Path, str | None]:
    """The ``metrics.csv`` of a run folder: directly in it, or in its newest ``version_N``.

    Args:
        folder: the folder given by the user.

    Returns:
        The file, and a line saying which version was chosen among several (else ``None``).

    Raises:
        LogFormatError: no ``metrics.csv`` in the folder or below it.
    """
    path, note = find_run_log(folder, tensorboard=False)
    return path, note


def _is_event_file(path: Path) -> bool:
    return path.is_file() and path.name.startswith("events.out.tfevents.")


def find_run_log(folder: Path, tensorboard: bool = True) -> tuple[Path, str | None]:
    """The log of a run folder: its ``metrics.csv``, or (with ``tensorboard``) the folder of its
    TensorBoard event files; directly in ``folder`` or in its newest ``version_N``.

    Returns:
        A ``metrics.csv`` file or a folder of event files, and a line saying which version was
        chosen among several (else ``None``).

    Raises:
        LogFormatError: no log in the folder or below it.
    """
    direct = folder / _METRICS
    if direct.is_file():
        return direct, None
    if tensorboard and any(_is_event_file(p) for p in folder.glob(_EVENTS)):
        return folder, None
    found = {p.parent: p for p in folder.rglob(_METRICS) if p.is_file()}
    if tensorboard:
        for event in folder.rglob(_EVENTS):
            if _is_event_file(event):
                found.setdefault(event.parent, event.parent)  # a CSV beside it is preferred
    if not found:
        raise LogFormatError(
            f"{folder}: no {_METRICS} in this folder or below it, nor a TensorBoard event file"
            " (expected a Lightning CSVLogger or TensorBoardLogger folder, a lightning-bn"
            " reproduce run, a metrics.csv or an events.out.tfevents.* file)"
            if tensorboard
            else f"{folder}: no {_METRICS} in this folder or below it (expected a Lightning "
            "CSVLogger folder, a lightning-bn reproduce run, or a metrics.csv file)"
        )
    if len(found) == 1:
        return next(iter(found.values())), None

    def newest(parent: Path) -> tuple[int, float]:
        # the highest version number wins; the modification time breaks ties between trees
        numbers = [int(m[1]) for part in parent.parts if (m := _VERSION.match(part))]
        return (numbers[-1] if numbers else -1), found[parent].stat().st_mtime

    chosen = max(found, key=newest)
    rel = chosen.relative_to(folder)
    return found[chosen], f"{folder}: {len(found)} logged versions; using the newest, {rel}"


def read_event_log(path: Path) -> dict[str, Series]:
    """Every scalar of a TensorBoard event file, or of all event files in a folder.

    Read with ``tensorboard``'s ``EventAccumulator`` (every value kept, no sampling). A step
    logged twice (a resumed run) keeps its last value.

    Returns:
        tag -> ``(steps int64, values float64)``, sorted by step.

    Raises:
        LogFormatError: ``tensorboard`` is not installed, or the file cannot be read.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise LogFormatError(
            f"{path}: reading TensorBoard logs needs the tensorboard package"
            " (pip install 'lightning-bn[tensorboard]')"
        ) from None
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
    try:
        accumulator.Reload()
    except Exception as err:  # a corrupt record: one line naming the file
        raise LogFormatError(f"{path}: not a readable TensorBoard event file ({err})") from None
    series: dict[str, Series] = {}
    for tag in accumulator.Tags().get("scalars", []):
        points = {int(e.step): float(e.value) for e in accumulator.Scalars(tag)}
        steps = np.array(sorted(points), dtype=np.int64)
        series[tag] = (steps, np.array([points[int(s)] for s in steps], dtype=np.float64))
    return series


def parse_steps(text: str) -> tuple[int | None, int | None]:
    """``"FROM:TO"`` (either side may be empty) as ``(FROM, TO)``.

    Raises:
        ValueError: not two integers ``>= 0`` separated by ``:`` with ``FROM <= TO``.
    """
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"expected FROM:TO (e.g. 100:500, 100: or :500), got {text!r}")
    try:
        lo, hi = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ValueError(f"expected FROM:TO with integer steps, got {text!r}") from None
    if (lo is not None and lo < 0) or (hi is not None and hi < 0):
        raise ValueError(f"expected steps >= 0, got {text!r}")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"expected FROM <= TO, got {text!r}")
    return lo, hi


def _window(series: dict[str, Series], steps: tuple[int | None, int | None]) -> dict[str, Series]:
    lo, hi = steps
    if lo is None and hi is None:
        return series
    out: dict[str, Series] = {}
    for key, (s, v) in series.items():
        keep = np.ones(s.shape, dtype=bool)
        if lo is not None:
            keep &= s >= lo
        if hi is not None:
            keep &= s <= hi
        out[key] = (s[keep], v[keep])
    return out


def diagnostic_prefixes() -> tuple[str, ...]:
    """The key prefixes of every callback class defined so far (``"ics/"``, ``"lipschitz/"``,
    ...): a run is drawn when it logged a key with one of them."""
    return prefixes()


def _has_diagnostics(series: dict[str, Series]) -> bool:
    # a named callback's keys (`ics@late/...`) count as its class's
    return any(instance_of(key) is not None for key in series)


def _csv_run(path: Path, label: str, note: str | None) -> LoggedRun:
    from lightning_bn.plot.text_cells import text_cells

    notes: list[str] = []
    if path.is_dir() or _is_event_file(path):
        series = read_event_log(path)
    else:
        series = read_csv_log(path)
        texts = text_cells(path, diagnostic_prefixes())
        if texts and not _has_diagnostics(series):
            key, (row, cell, count) = next(iter(texts.items()))
            raise LogFormatError(
                f"{path}: column {key!r} holds text where numbers are expected (row {row}: "
                f"{cell!r}; {count} such cell(s), {len(texts)} column(s))"
            )
        notes = [
            f"{k}: {n} text cell(s) skipped, first in row {r}: {c!r}"
            for k, (r, c, n) in texts.items()
        ]
    if not _has_diagnostics(series):
        known = diagnostic_prefixes()
        classes = owners(known)
        raise LogFormatError(
            f"{path}: no lightning-bn diagnostic key ({', '.join(p + '…' for p in known)});"
            f" were {', '.join(classes[:-1])} or {classes[-1]} in the Trainer?"
            if len(classes) > 1
            else f"{path}: no lightning-bn diagnostic key; was a diagnostic callback in the Trainer?"
        )
    return LoggedRun(label, path, series, ([note] if note else []) + notes)


def _reproduce_runs(folder: Path, label: str, loaded: Loaded) -> list[LoggedRun]:
    """The finished variants of a reproduce run; unfinished ones go to ``loaded.incomplete``."""
    from lightning_bn.reproduce.history import load_run  # its RunFormatError is a LogFormatError

    run = load_run(folder)
    for vid, reason in run.incomplete.items():
        loaded.incomplete.append(f"{label}/{vid}: incomplete ({reason}); not drawn")
    return [
        LoggedRun(f"{label}/{vid}", folder / f"csv/{vid}/metrics.csv", dict(history.series))
        for vid, history in run.histories.items()
    ]


def _non_finite_notes(run: LoggedRun) -> list[str]:
    """Where the run's values stop being finite: "diverged" for the loss, NaN/inf said as such."""
    notes: list[str] = []
    if (step := run.diverged_at()) is not None:
        value = run.series["train/loss"][1]
        first = value[~np.isfinite(value)][0]
        notes.append(f"diverged: training loss {_word(first)} from step {step}")
    for key, (steps, values) in run.series.items():
        bad = ~np.isfinite(values)
        if key != "train/loss" and instance_of(key) is not None and bad.any():
            where = int(steps[int(np.argmax(bad))])
            kinds = sorted({_word(v) for v in values[bad]})
            notes.append(
                f"{key}: {' and '.join(kinds)} at {int(bad.sum())} of {values.size} steps "
                f"(first at step {where}); drawn up to there"
            )
    return notes


def _word(value: float) -> str:
    return "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")


def _default_labels(paths: Sequence[Path]) -> list[str]:
    """Folder names (a metrics.csv: its folder's); parents added until they are distinct."""

    def name(path: Path, depth: int) -> str:
        base = path.parent if path.name == _METRICS or _is_event_file(path) else path
        parts = base.resolve().parts
        return "/".join(parts[-depth:]) if parts else str(base)

    labels = [name(p, 1) for p in paths]
    for depth in range(2, 6):
        if len(set(labels)) == len(labels):
            break
        labels = [
            name(p, depth) if labels.count(lab) > 1 else lab
            for p, lab in zip(paths, labels, strict=True)
        ]
    return labels


def load_runs(
    paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    steps: tuple[int | None, int | None] = (None, None),
) -> Loaded:
    """Read every run given to ``lightning-bn plot``.

    Args:
        paths: metrics.csv files, TensorBoard event files, CSVLogger or TensorBoardLogger
            folders, or reproduce run folders.
        labels: one legend entry per path (default: the folder names).
        steps: keep the steps in ``[FROM, TO]`` (``None``: unbounded).

    Returns:
        The runs (their ``notes`` say which ``version_N`` was taken, where one diverged) and
        the incomplete runs left out.

    Raises:
        LogFormatError: a path is missing or unreadable, or holds no diagnostic key.
        ValueError: ``labels`` is not one label per path.
    """
    given = [Path(p) for p in paths]
    if not paths:
        raise ValueError("Expected argument `runs` to name at least one run, but got none")
    if labels is None:
        labels = _default_labels(given)
    elif len(labels) != len(paths):
        raise ValueError(
            f"Expected argument `labels` to give one label per run ({len(paths)}), but got "
            f"{len(labels)}: {list(labels)!r}"
        )
    loaded = Loaded([])
    for path, label in zip(given, labels, strict=True):
        if path.is_file():
            runs = [_csv_run(path, label, None)]
        elif path.is_dir() and (path / "run.json").is_file():
            runs = _reproduce_runs(path, label, loaded)
        elif path.is_dir():
            log_path, note = find_run_log(path)
            runs = [_csv_run(log_path, label, note)]
        else:
            raise LogFormatError(f"{path}: does not exist (no such file or folder)")
        for run in runs:
            run.series = _window(run.series, steps)
            run.notes += _non_finite_notes(run)
        loaded.runs.extend(runs)
    return loaded


def __getattr__(name: str) -> Any:
    # read at each access: a callback class defined later adds its prefix
    if name == "DIAGNOSTIC_PREFIXES":
        return diagnostic_prefixes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
