"""Read a finished (or interrupted) reproduce run back from its ``run.json`` and CSV files.

The CSV files are those of Lightning's :class:`~lightning.pytorch.loggers.CSVLogger`: one row
per logging call with a ``step`` column and one column per metric key (empty where the row does
not hold the key). :func:`read_metrics_csv` merges the rows into one series per key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_bn.csv_log import LogFormatError, TruncatedLogError, read_csv_log
from lightning_bn.reproduce.plan import ExperimentPlan, VariantSpec

__all__ = [
    "MANIFEST",
    "RunData",
    "RunFormatError",
    "VariantHistory",
    "load_run",
    "read_metrics_csv",
]

#: Name of the run description at the top of a run folder.
MANIFEST = "run.json"

Series = tuple[np.ndarray, np.ndarray]


class RunFormatError(LogFormatError):
    """The folder is not a reproduce run (no readable ``run.json``), or a file is unreadable."""


#: ``run.json`` statuses meaning that every variant finished.
COMPLETE_STATUSES = ("finished", "completed", "done")


def read_metrics_csv(path: str | Path) -> dict[str, Series]:
    """Read a CSVLogger ``metrics.csv`` into ``key -> (steps, values)``, sorted by step.

    A key logged twice at the same step keeps the later value; ``nan``/``inf`` are kept as such.

    Args:
        path: the CSV file.

    Returns:
        One ``(steps int64 array, values float64 array)`` pair per metric key (``step`` and
        ``epoch`` excluded).

    Raises:
        RunFormatError: the file is unreadable or not a CSVLogger file (one line naming it).
        TruncatedLogError: the file ends inside a row (its run was interrupted).
    """
    try:
        return read_csv_log(path)
    except TruncatedLogError:
        raise
    except LogFormatError as err:
        raise RunFormatError(str(err)) from None


@dataclass
class VariantHistory:
    """Every metric one variant logged.

    Attributes:
        spec: the variant.
        series: ``key -> (steps, values)``.
    """

    spec: VariantSpec
    series: dict[str, Series] = field(default_factory=dict)

    @classmethod
    def from_lists(
        cls, spec: VariantSpec, series: Mapping[str, tuple[Sequence[int], Sequence[float]]]
    ) -> VariantHistory:
        """Build a history from plain lists (tests and hand-made examples)."""
        return cls(
            spec,
            {
                k: (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
                for k, (s, v) in series.items()
            },
        )

    def get(self, key: str) -> Series:
        """``(steps, values)`` of ``key``; empty arrays when it was never logged."""
        if key in self.series:
            return self.series[key]
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)

    def last(self, key: str) -> float:
        """The value at the last step of ``key`` (``nan`` when never logged)."""
        _, values = self.get(key)
        return float(values[-1]) if values.size else math.nan

    def layers(self, prefix: str, suffix: str) -> list[str]:
        """Layer names ``<layer>`` of keys ``<prefix><layer><suffix>``, in first-logged order."""
        pattern = re.compile(re.escape(prefix) + "(?P<layer>.+)" + re.escape(suffix) + r"\Z")
        return [m["layer"] for key in self.series if (m := pattern.match(key))]

    def values_matching(self, prefix: str, suffix: str) -> np.ndarray:
        """All values of every ``<prefix><layer><suffix>`` key, concatenated."""
        parts = [self.get(f"{prefix}{layer}{suffix}")[1] for layer in self.layers(prefix, suffix)]
        return np.concatenate(parts) if parts else np.zeros(0)


@dataclass
class RunData:
    """A reproduce run: its plan, manifest and the history of every variant found on disk.

    Attributes:
        path: the run folder.
        plan: the experiment plan.
        manifest: the parsed ``run.json``.
        histories: ``variant id -> history`` for every variant whose CSV file exists, in plan
            order.
        missing: ids of planned variants without a complete history (an interrupted run):
            no CSV file, or one that is in :attr:`incomplete`.
        incomplete: ``variant id -> why`` for every variant whose training did not finish
            (no CSV file, a CSV cut short, or no ``final/*`` metrics in a run whose
            ``run.json`` status is not finished). These are never in :attr:`histories`.
    """

    path: Path
    plan: ExperimentPlan
    manifest: dict[str, Any]
    histories: dict[str, VariantHistory]
    missing: list[str] = field(default_factory=list)
    incomplete: dict[str, str] = field(default_factory=dict)

    def find(self, arch: str, kind: str, lr: float) -> VariantHistory | None:
        """The history of a variant, or ``None`` when it was not trained."""
        return self.histories.get(VariantSpec(arch, kind, lr).id)

    @classmethod
    def from_histories(
        cls, plan: ExperimentPlan, histories: Iterable[VariantHistory], path: Path | None = None
    ) -> RunData:
        """A run built in memory (tests, or histories gathered another way)."""
        return cls(
            path=path or Path("."),
            plan=plan,
            manifest={"plan": plan.to_dict()},
            histories={h.spec.id: h for h in histories},
        )


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder written by ``lightning-bn reproduce``.

    Args:
        run_dir: the folder holding ``run.json``.

    Returns:
        The run, with the history of every variant that has a CSV file.

    Raises:
        RunFormatError: the folder does not exist, or has no readable ``run.json``.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunFormatError(f"run folder {str(path)!r} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise RunFormatError(
            f"{str(path)!r} is not a lightning-bn reproduce run: it has no {MANIFEST}"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        plan = ExperimentPlan.from_dict(manifest["plan"])
        entries = list(manifest["variants"])
    except (ValueError, KeyError, TypeError) as err:
        raise RunFormatError(
            f"{str(manifest_path)!r} is not a valid run description: {err}"
        ) from err
    status = str(manifest.get("status", "finished"))
    finished = status in COMPLETE_STATUSES
    listed = manifest.get("completed", manifest.get("completed_runs", []))
    completed = {str(v) for v in listed} if isinstance(listed, list) else set()
    histories: dict[str, VariantHistory] = {}
    incomplete: dict[str, str] = {}
    for entry in entries:
        spec = VariantSpec.from_dict(entry)
        csv_path = path / str(entry.get("csv", f"csv/{spec.id}/metrics.csv"))
        if not csv_path.is_file():
            incomplete[spec.id] = f"no {csv_path.relative_to(path)}"
            continue
        try:
            series = read_metrics_csv(csv_path)
        except TruncatedLogError as err:
            incomplete[spec.id] = str(err)
            continue
        entry_status = entry.get("status")
        done = (
            finished
            or spec.id in completed
            or entry_status in COMPLETE_STATUSES
            # the reproduce runner logs final/* once a variant's training has ended
            or (entry_status is None and "final/steps" in series)
        )
        if not done:
            incomplete[spec.id] = f"run.json status {status!r} and its training did not finish"
            continue
        histories[spec.id] = VariantHistory(spec, series)
    return RunData(
        path=path,
        plan=plan,
        manifest=manifest,
        histories=histories,
        missing=list(incomplete),
        incomplete=incomplete,
    )
