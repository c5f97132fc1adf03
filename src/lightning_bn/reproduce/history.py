"""Read a finished (or interrupted) reproduce run back from its ``run.json`` and CSV files.

The CSV files are those of Lightning's :class:`~lightning.pytorch.loggers.CSVLogger`: one row
per logging call with a ``step`` column and one column per metric key (empty where the row does
not hold the key). :func:`read_metrics_csv` merges the rows into one series per key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_bn._types import Series, SeriesHistory, series_arrays
from lightning_bn.logging.csv_log import LogFormatError, TruncatedLogError, read_csv_log
from lightning_bn.reproduce.interrupt import process_gone
from lightning_bn.reproduce.plan import ExperimentPlan, VariantSpec

__all__ = [
    "HI",
    "LO",
    "MANIFEST",
    "RunData",
    "RunFormatError",
    "VariantHistory",
    "load_run",
    "read_metrics_csv",
    "seed_median",
]

#: Name of the run description at the top of a run folder.
MANIFEST = "run.json"


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
class VariantHistory(SeriesHistory):
    """Every metric one variant logged.

    Attributes:
        spec: the variant.
        series: ``key -> (steps, values)``.
        seed: the seed of the run (``None``: a median over seeds, see :func:`seed_median`).
    """

    spec: VariantSpec
    series: dict[str, Series] = field(default_factory=dict)
    seed: int | None = None

    @classmethod
    def from_lists(
        cls,
        spec: VariantSpec,
        series: Mapping[str, tuple[Sequence[int], Sequence[float]]],
        seed: int | None = 0,
    ) -> VariantHistory:
        """Build a history from plain lists (tests and hand-made examples)."""
        return cls(
            spec,
            series_arrays(series),
            seed,
        )


#: Suffixes of the keys that :func:`seed_median` adds: the smallest and largest value over seeds.
LO, HI = "@lo", "@hi"


def seed_median(histories: Sequence[VariantHistory]) -> VariantHistory:
    """One history holding, per key, the median over the seeds' runs, and the range as bands.

    For every key, the median is taken at the steps that every run holding the key logged (a key
    logged once per run, such as ``final/*``, which a diverged run logs at an earlier step, is
    aligned by position instead, at the latest step); ``<key>@lo`` and ``<key>@hi`` hold the
    smallest and largest value over the seeds at those steps (the bands of the figures). A
    non-finite value in any seed makes the median non-finite there (the figures then mark the
    variant as diverged).

    Args:
        histories: the runs of one variant, one per seed (at least one).

    Returns:
        The median history (``seed=None``); a single run is returned unchanged.
    """
    if len(histories) == 1:
        return histories[0]
    keys = list(dict.fromkeys(k for h in histories for k in h.series))
    series: dict[str, Series] = {}
    for key in keys:
        parts = [h.series[key] for h in histories if key in h.series]
        if all(steps.size == 1 for steps, _ in parts):
            steps = np.asarray([max(int(s[0]) for s, _ in parts)], dtype=np.int64)
            stacked = np.stack([v for _, v in parts])
        else:
            steps = parts[0][0]
            for other, _ in parts[1:]:
                steps = np.intersect1d(steps, other)
            stacked = np.stack([v[np.isin(s, steps)] for s, v in parts])
        with np.errstate(invalid="ignore"):
            series[key] = (steps, np.median(stacked, axis=0))
            series[key + LO] = (steps, stacked.min(axis=0))
            series[key + HI] = (steps, stacked.max(axis=0))
    return VariantHistory(histories[0].spec, series, None)


@dataclass
class RunData:
    """A reproduce run: its plan, manifest and the history of every training run found on disk.

    Attributes:
        path: the run folder.
        plan: the experiment plan.
        manifest: the parsed ``run.json``.
        histories: ``run id -> history`` (see :meth:`VariantSpec.run_id`) for every run
            (variant and seed) whose training finished, in plan order.
        missing: ids of planned runs without a complete history (an interrupted run): no CSV
            file, or one that is in :attr:`incomplete`.
        incomplete: ``run id -> why`` for every run whose training did not finish (no CSV
            file, a CSV cut short, or no ``final/*`` metrics in a run whose ``run.json`` status
            is not finished). These are never in :attr:`histories`.
    """

    path: Path
    plan: ExperimentPlan
    manifest: dict[str, Any]
    histories: dict[str, VariantHistory]
    missing: list[str] = field(default_factory=list)
    incomplete: dict[str, str] = field(default_factory=dict)

    def seed_runs(self, spec: VariantSpec) -> list[VariantHistory]:
        """The runs of a variant, one per seed found, in seed order."""
        runs = [h for h in self.histories.values() if h.spec == spec]
        return sorted(runs, key=lambda h: -1 if h.seed is None else h.seed)

    def find_variant(self, spec: VariantSpec) -> VariantHistory | None:
        """The median over seeds of a variant (:func:`seed_median`), ``None`` if not trained."""
        runs = self.seed_runs(spec)
        return seed_median(runs) if runs else None

    def find(
        self,
        arch: str,
        kind: str,
        lr: float,
        init_scale: float = 1.0,
        batch_size: int | None = None,
    ) -> VariantHistory | None:
        """The median over seeds of a variant (see :meth:`find_variant`)."""
        return self.find_variant(VariantSpec(arch, kind, lr, init_scale, batch_size))

    @property
    def seeds(self) -> list[int]:
        """The seeds that have at least one run in this folder."""
        return sorted({h.seed for h in self.histories.values() if h.seed is not None})

    @classmethod
    def from_histories(
        cls, plan: ExperimentPlan, histories: Iterable[VariantHistory], path: Path | None = None
    ) -> RunData:
        """A run built in memory (tests, or histories gathered another way)."""
        return cls(
            path=path or Path("."),
            plan=plan,
            manifest={"plan": plan.to_dict()},
            histories={
                h.spec.run_id(plan.seed if h.seed is None else h.seed): h for h in histories
            },
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
        # format 2 lists every run (variant and seed); format 1 one run per variant
        entries = list(manifest["runs"] if "runs" in manifest else manifest["variants"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise RunFormatError(
            f"{str(manifest_path)!r} is not a valid run description: {err}"
        ) from err
    status = str(manifest.get("status", "finished"))
    if process_gone(manifest) is not None:
        status = "interrupted (process gone)"
    finished = status in COMPLETE_STATUSES
    listed = manifest.get("completed", manifest.get("completed_runs", []))
    completed = {str(v) for v in listed} if isinstance(listed, list) else set()
    histories: dict[str, VariantHistory] = {}
    incomplete: dict[str, str] = {}
    for entry in entries:
        spec = VariantSpec.from_dict(entry)
        seed = int(entry.get("seed", plan.seed))
        run_id = spec.run_id(seed)
        csv_path = path / str(entry.get("csv", f"csv/{spec.id}/metrics.csv"))
        if not csv_path.is_file():
            incomplete[run_id] = f"no {csv_path.relative_to(path)}"
            continue
        try:
            series = read_metrics_csv(csv_path)
        except TruncatedLogError as err:
            incomplete[run_id] = str(err)
            continue
        entry_status = entry.get("status")
        done = (
            finished
            or run_id in completed
            or spec.id in completed
            or entry_status in COMPLETE_STATUSES
            # the reproduce runner logs final/* once a variant's training has ended
            or (entry_status is None and "final/steps" in series)
        )
        if not done:
            incomplete[run_id] = f"run.json status {status!r} and its training did not finish"
            continue
        histories[run_id] = VariantHistory(spec, series, seed)
    return RunData(
        path=path,
        plan=plan,
        manifest=manifest,
        histories=histories,
        missing=list(incomplete),
        incomplete=incomplete,
    )
