"""Train the runs of an :class:`~lightning_bn.reproduce.plan.ExperimentPlan`: every variant once
per seed, ``jobs`` runs at a time.

Each run is one Lightning ``Trainer.fit`` with the package's callbacks (
:class:`~lightning_bn.ICSCallback`, :class:`~lightning_bn.LipschitzCallback` and
:class:`~lightning_bn.SmoothnessCallback` on the variants the findings compare, see
:meth:`~lightning_bn.reproduce.plan.ExperimentPlan.diagnosed`;
:class:`~lightning_bn.NoiseInjectionCallback` for noisy BatchNorm), a
:class:`~lightning.pytorch.loggers.CSVLogger` and, unless W&B is off, a
:class:`~lightning.pytorch.loggers.WandbLogger` (a W&B run per training run, offline unless an API
key is configured). After training, the run is validated once more (evaluation mode: no noise,
BatchNorm running statistics) and ``final/*`` metrics are logged at the last step, so that the
CSV files alone hold everything the figures and the summary are drawn from.

With ``jobs > 1`` the runs go to a pool of ``jobs`` worker processes (``spawn``), each with one
torch thread: the models are small, so two single-threaded runs on two cores finish in about
half the time of one run using both cores. A run depends only on its variant and seed, so the
results do not depend on ``jobs``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import multiprocessing.util
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_bn._outputs import folder_state, foreign_files
from lightning_bn.callbacks._hooks import AfterTrainBatch
from lightning_bn.reproduce.experiments import get_experiment
from lightning_bn.reproduce.history import MANIFEST
from lightning_bn.reproduce.interrupt import (
    RunInterrupted,
    block_signals,
    interrupt_guard,
    worker_signals,
)
from lightning_bn.reproduce.plan import ExperimentPlan, VariantSpec, default_jobs
from lightning_bn.reproduce.progress import LINE_EVERY, ProgressDisplay
from lightning_bn.reproduce.single_run import (
    FINAL_WINDOW,
    TrainLossRecorder,
    VariantResult,
    _threads,
    build_datamodule,
    build_model,
    format_result,
    run_variant,
)
from lightning_bn.reproduce.wandb_setup import DEFAULT_PROJECT, WANDB_CHOICES, resolve_wandb_mode

__all__ = [
    "DEFAULT_PROJECT",
    "FINAL_WINDOW",
    "MANIFEST",
    "WANDB_CHOICES",
    "RunInterrupted",
    "TrainLossRecorder",
    "VariantResult",
    "build_datamodule",
    "build_model",
    "default_jobs",
    "format_result",
    "resolve_wandb_mode",
    "run_variant",
    "train_plan",
]

Echo = Callable[[str], None]


def write_manifest(out_dir: Path, plan: ExperimentPlan, status: str, extra: dict[str, Any]) -> None:
    """Write ``run.json``: the plan, and every run (variant and seed) with its CSV file.

    The file is replaced in one step (a temporary file renamed over it), so that a reader, or a
    process killed while writing, never sees half a file.
    """
    from lightning_bn._version import __version__

    data = {
        "format": 2,
        "lightning_bn": __version__,
        "status": status,
        "plan": plan.to_dict(),
        "runs": [
            spec.to_dict()
            | {
                "id": spec.run_id(seed),
                "variant": spec.id,
                "seed": seed,
                "csv": f"csv/{spec.run_id(seed)}/metrics.csv",
            }
            for spec, seed in plan.runs()
        ],
        **extra,
    }
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{MANIFEST}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the run from other users
        os.replace(tmp, out_dir / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def default_out_dir(experiment: str, root: Path | None = None) -> Path:
    """``./lightning-bn-runs/<experiment>-<YYYYmmdd-HHMMSS>`` (a suffix if it exists already)."""
    base = (root or Path("lightning-bn-runs")) / f"{experiment}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _run_job(
    plan: ExperimentPlan,
    spec: VariantSpec,
    seed: int,
    out_dir: Path,
    wandb_mode: str,
    group: str,
    project: str,
) -> VariantResult:
    """One run in a worker process (one torch thread, no progress bar)."""
    with _threads(plan):
        return run_variant(
            plan,
            spec,
            out_dir,
            wandb_mode=wandb_mode,
            group=group,
            project=project,
            progress=False,
            seed=seed,
        )


class _ProgressTick(AfterTrainBatch):
    """Tell the progress display how far the run in progress is (``--jobs 1``; reporting only)."""

    def __init__(self, display: ProgressDisplay) -> None:
        self.display = display

    @override
    def after_train_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any
    ) -> None:
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 0
        self.display.tick(trainer.global_step / steps if steps else None)


#: Seconds a worker gets to exit after SIGTERM before it is killed.
WORKER_GRACE = 3.0


def _stop_workers(pool: concurrent.futures.ProcessPoolExecutor, grace: float) -> None:
    """Stop the pool's worker processes: SIGTERM, ``grace`` seconds, then SIGKILL; no orphans."""
    # ProcessPoolExecutor has no public way to stop running calls: its processes are reached
    # through `_processes` (pid -> multiprocessing.Process), stable since Python 3.2.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AttributeError, AssertionError):
            process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AttributeError, AssertionError):
            if process.is_alive():
                process.kill()
                process.join(5.0)
    pool.shutdown(wait=True, cancel_futures=True)


def _kill_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """SIGKILL every worker (a forced exit: no waiting), and free the pool's semaphores."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            process.kill()
    # os._exit skips multiprocessing's exit handlers: run the ones that unlink the queues'
    # semaphores (priority >= 0; they do not wait), or its resource tracker warns about leaks.
    with contextlib.suppress(Exception):
        multiprocessing.util._run_finalizers(0)  # type: ignore[attr-defined]


def train_plan(
    plan: ExperimentPlan,
    out_dir: Path,
    *,
    wandb_mode: str = "offline",
    project: str = DEFAULT_PROJECT,
    progress: bool = True,
    echo: Echo = print,
    jobs: int = 1,
    verbose: bool = False,
    progress_every: float = LINE_EVERY,
) -> list[VariantResult]:
    """Train every run of ``plan`` into ``out_dir``, printing a line per finished run and the
    overall progress (runs done / total, time left).

    ``run.json`` is written first (status ``"running"``), again after every finished run (its id
    added to ``"completed"``) and at the end (``"finished"``, with the wall time and the runs'
    summed CPU time), so that a run cut short can still be plotted.

    SIGINT (Ctrl-C) or SIGTERM stop the training within seconds: the worker processes are
    stopped, ``run.json`` gets ``"status": "interrupted"`` (and ``"signal"``) with the runs that
    finished under ``"completed"``, and :class:`RunInterrupted` is raised. A second signal ends
    the process at once (see :mod:`lightning_bn.reproduce.interrupt`). Any other error records
    ``"status": "failed"`` and propagates.

    Args:
        plan: the plan.
        out_dir: the run folder.
        wandb_mode: ``"online"``, ``"offline"`` or ``"off"``.
        project: the W&B project.
        progress: show the overall progress (a bar redrawn in place on a terminal, else a line
            every ``progress_every`` seconds).
        echo: where the line per finished run goes.
        jobs: runs at a time (worker processes when > 1).
        verbose: show Lightning's progress bar of every run (``jobs == 1`` only); the overall
            progress is then printed as lines, not a bar.
        progress_every: seconds between two progress lines when not drawing a bar.

    Returns:
        The results, in plan order.

    Raises:
        RunInterrupted: SIGINT or SIGTERM received.
        ValueError: ``out_dir`` is a file, or a folder holding files (a run, the user's files).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Expected argument `jobs` to be a positive integer, but got {jobs!r}")
    state = folder_state(out_dir, markers=(MANIFEST,))
    if state not in ("new", "empty"):
        what = {"file": "is a file", "ours": f"already holds a run ({MANIFEST})"}.get(
            state, f"holds files lightning-bn did not write ({foreign_files(out_dir)})"
        )
        raise ValueError(f"out_dir {str(out_dir)!r} {what}: pass a new or empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now()
    meta: dict[str, Any] = {
        "created": started.isoformat(timespec="seconds"),
        "wandb": wandb_mode,
        "jobs": jobs,
        # who writes the run: a later plot or reproduce tells a killed run from a running one
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "completed": [],
    }
    write_manifest(out_dir, plan, "running", meta)
    runs = plan.runs()
    results: dict[int, VariantResult] = {}
    start = time.perf_counter()
    width = len(str(len(runs)))
    display = ProgressDisplay(
        len(runs),
        echo=echo,
        enabled=progress,
        tty=False if verbose else None,
        every=progress_every,
    )

    def completed() -> list[str]:
        return [runs[i][0].run_id(runs[i][1]) for i in sorted(results)]

    def report(i: int, result: VariantResult, save: bool = True) -> None:
        results[i] = result
        if save:
            record("running")
        display.run_done(
            f"[{len(results):>{width}}/{len(runs)}] {format_result(result, plan.task)}"
        )

    def record(status: str, **extra: Any) -> None:
        meta["completed"] = guard.completed = completed()
        meta.update(extra)
        write_manifest(out_dir, plan, status, meta)

    with interrupt_guard() as guard:
        guard.out_dir, guard.total, guard.completed = out_dir, len(runs), []
        pool: concurrent.futures.ProcessPoolExecutor | None = None
        futures: dict[concurrent.futures.Future[VariantResult], int] = {}

        def force() -> None:  # a second signal: kill the workers, record, no waiting
            if pool is not None:
                _kill_workers(pool)
            record("interrupted", signal=RunInterrupted(guard.signum or signal.SIGINT).signal_name)

        remove_force = guard.on_force(force)
        try:
            display.tick()
            if jobs == 1:
                _train_in_process(
                    plan, runs, out_dir, wandb_mode, project, verbose, display, report
                )
            else:
                context = multiprocessing.get_context("spawn")
                # the workers start with SIGINT/SIGTERM blocked, until worker_signals runs
                with block_signals():
                    pool = concurrent.futures.ProcessPoolExecutor(
                        jobs,
                        mp_context=context,
                        initializer=worker_signals,
                        initargs=(os.getpid(),),
                    )
                    futures = {
                        pool.submit(
                            _run_job, plan, spec, seed, out_dir, wandb_mode, out_dir.name, project
                        ): i
                        for i, (spec, seed) in enumerate(runs)
                    }
                pending = set(futures)
                while pending:
                    done, pending = concurrent.futures.wait(
                        pending, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    for future in sorted(done, key=futures.__getitem__):
                        report(futures[future], future.result())
                    display.tick()
                pool.shutdown(wait=True)
        except RunInterrupted as stop:
            # runs that finished while the signal came in still count
            for future, i in futures.items():
                if i not in results and future.done() and not future.cancelled():
                    with contextlib.suppress(Exception):
                        report(i, future.result(), save=False)
            display.close()
            if pool is not None:
                _stop_workers(pool, WORKER_GRACE)
            record("interrupted", signal=stop.signal_name)
            raise RunInterrupted(stop.signum, out_dir, completed(), len(runs)) from None
        except BaseException:
            display.close()
            if pool is not None:
                _stop_workers(pool, WORKER_GRACE)
            record("failed")
            raise
        finally:
            remove_force()
        display.close()
        meta["train_seconds"] = round(time.perf_counter() - start, 1)
        meta["train_cpu_seconds"] = round(sum(r.cpu_time for r in results.values()), 1)
        record("finished")
    return [results[i] for i in sorted(results)]


def _train_in_process(
    plan: ExperimentPlan,
    runs: list[tuple[VariantSpec, int]],
    out_dir: Path,
    wandb_mode: str,
    project: str,
    verbose: bool,
    display: ProgressDisplay,
    report: Callable[[int, VariantResult], Any],
) -> None:
    data_cache: dict[tuple[str, int, int], pl.LightningDataModule] = {}
    with _threads(plan):
        for i, (spec, seed) in enumerate(runs):
            key = (spec.arch, seed, plan.batch_of(spec))
            if get_experiment(plan.experiment).reuse_data:  # read data files once per seed/batch
                data_cache.setdefault(
                    key, build_datamodule(plan, spec.arch, seed, plan.batch_of(spec))
                )
            result = run_variant(
                plan,
                spec,
                out_dir,
                wandb_mode=wandb_mode,
                group=out_dir.name,
                project=project,
                progress=verbose,
                datamodule=data_cache.get(key),
                seed=seed,
                # Lightning's bar (verbose) owns the line during a run: tick between runs only
                callbacks=[] if verbose else [_ProgressTick(display)],
            )
            report(i, result)
            display.tick()
