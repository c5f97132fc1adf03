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
import logging
import math
import multiprocessing
import multiprocessing.util
import netrc
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from torch import nn
from typing_extensions import override

from lightning_bn.callbacks import (
    ICSCallback,
    LipschitzCallback,
    NoiseInjectionCallback,
    SmoothnessCallback,
)
from lightning_bn.experiments import ClassificationModule, RegressionModule
from lightning_bn.reproduce.experiments import get_experiment
from lightning_bn.reproduce.history import MANIFEST
from lightning_bn.reproduce.interrupt import (
    RunInterrupted,
    block_signals,
    interrupt_guard,
    worker_signals,
)
from lightning_bn.reproduce.plan import ExperimentPlan, VariantSpec, default_jobs, format_lr
from lightning_bn.reproduce.progress import LINE_EVERY, ProgressDisplay
from lightning_bn.wandb_panels import finish_active_run

__all__ = [
    "MANIFEST",
    "WANDB_CHOICES",
    "RunInterrupted",
    "VariantResult",
    "build_datamodule",
    "build_model",
    "default_jobs",
    "resolve_wandb_mode",
    "run_variant",
    "train_plan",
]

#: Values of ``--wandb``.
WANDB_CHOICES: tuple[str, ...] = ("auto", "online", "offline", "off")
#: W&B project of the runs (``--wandb-project`` changes it).
DEFAULT_PROJECT = "lightning-bn"
#: Share of the last training steps averaged into ``final/train_loss``.
FINAL_WINDOW = 0.1

Echo = Callable[[str], None]


# --- W&B mode -------------------------------------------------------------------------------------
def _api_key_configured() -> bool:
    """True when W&B has credentials without asking: ``WANDB_API_KEY``, an identity token or netrc.

    Mirrors where ``wandb`` itself looks (the environment, then the netrc entry of the W&B host,
    ``WANDB_BASE_URL`` or ``api.wandb.ai``), without importing ``wandb`` or prompting.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = os.environ.get("NETRC")
    candidates = [Path(path).expanduser()] if path else [Path("~/.netrc").expanduser()]
    if not path:
        candidates.append(Path("~/_netrc").expanduser())
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            creds = netrc.netrc(str(candidate)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if creds and creds[2]:
            return True
    return False


def resolve_wandb_mode(choice: str = "auto") -> str:
    """Decide how W&B runs: ``"online"``, ``"offline"`` or ``"off"`` (no W&B logger).

    ``"auto"`` follows ``WANDB_MODE`` when it is set (``offline``/``dryrun``, ``disabled``,
    ``online``) and otherwise goes online only when an API key is configured (see
    :func:`_api_key_configured`): a user who never logged in gets offline runs and no prompt.

    Args:
        choice: one of :data:`WANDB_CHOICES`.

    Raises:
        ValueError: an unknown choice.
    """
    if choice not in WANDB_CHOICES:
        raise ValueError(
            f"Expected `wandb` to be one of {', '.join(WANDB_CHOICES)}, but got {choice!r}"
        )
    if choice != "auto":
        return choice
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "off"
    return "online" if _api_key_configured() else "offline"


@contextlib.contextmanager
def _restore_env(*names: str) -> Iterator[None]:
    # WandbLogger(offline=True) sets WANDB_MODE=dryrun for the whole process; undo it afterwards.
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- models and data --------------------------------------------------------------------------------
def build_model(plan: ExperimentPlan, spec: VariantSpec) -> nn.Module:
    """The network of a variant, from its experiment (same initialisation for every norm kind,
    given the seed; see :mod:`lightning_bn.reproduce.experiments`)."""
    return get_experiment(plan.experiment).build_model(plan, spec)


def build_datamodule(
    plan: ExperimentPlan, arch: str, seed: int | None = None, batch_size: int | None = None
) -> pl.LightningDataModule:
    """The data of an architecture, from its experiment.

    Args:
        plan: the plan.
        arch: the architecture.
        seed: seed of the split, the order and a generated problem (default ``plan.seed``).
        batch_size: samples per batch (default ``plan.batch_size``).

    Raises:
        FileNotFoundError: data files missing.
        ValueError: an architecture the experiment does not have, or missing data settings.
    """
    seed = plan.seed if seed is None else seed
    batch = plan.batch_size if batch_size is None else batch_size
    if arch not in get_experiment(plan.experiment).archs:
        raise ValueError(f"Unknown architecture {arch!r} of {plan.experiment}")
    return get_experiment(plan.experiment).build_datamodule(plan, arch, seed, batch)


def _build_module(plan: ExperimentPlan, spec: VariantSpec) -> pl.LightningModule:
    model = build_model(plan, spec)
    if plan.task == "regression":
        return RegressionModule(model, lr=spec.lr)
    return ClassificationModule(model, lr=spec.lr)


def _callbacks(plan: ExperimentPlan, spec: VariantSpec, seed: int) -> list[Callback]:
    every = plan.measure_every
    callbacks: list[Callback] = []
    if plan.diagnosed(spec):
        callbacks += [
            ICSCallback(every_n_steps=every),
            LipschitzCallback(every_n_steps=every, step_sizes=plan.step_sizes),
            SmoothnessCallback(
                every_n_steps=every,
                step_sizes=plan.step_sizes,
                max_iters=plan.power_iters,
                seed=seed,
            ),
        ]
    if spec.noise:
        callbacks.append(NoiseInjectionCallback(seed=seed, log_every_n_steps=plan.log_every))
    return callbacks


def _progress_bar(plan: ExperimentPlan, progress: bool) -> list[Callback]:
    # Redrawing the bar at every step of a millisecond-step model costs more than the step.
    return [TQDMProgressBar(refresh_rate=max(1, plan.steps // 100))] if progress else []


class TrainLossRecorder(Callback):
    """Keep the training loss of every step, and stop a run whose loss is no longer finite.

    A diverged run (NaN or infinite loss) cannot recover; stopping it saves the budget, and the
    diagnostics would only measure NaN. ``diverged_at`` is the (0-based) step whose loss was the
    first non-finite one.
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.diverged_at: int | None = None

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        value = float(loss.detach())
        self.losses.append(value)
        if not math.isfinite(value) and self.diverged_at is None:
            # the optimiser has stepped already: the loss belongs to step global_step - 1
            self.diverged_at = max(0, trainer.global_step - 1)
            trainer.should_stop = True

    def summary(self) -> dict[str, float]:
        """``final/train_loss`` (mean of the last 10% of the steps), ``final/mean_train_loss``
        (mean over all steps: the area under the training curve) and the divergence flags."""
        losses = self.losses
        out: dict[str, float] = {"final/diverged": float(self.diverged_at is not None)}
        if self.diverged_at is not None:
            out["final/diverged_step"] = float(self.diverged_at)
        if losses:
            tail = losses[-max(1, int(len(losses) * FINAL_WINDOW)) :]
            out["final/train_loss"] = _mean(tail)
            out["final/mean_train_loss"] = _mean(losses)
        return out


def _mean(values: list[float]) -> float:
    if not all(math.isfinite(v) for v in values):
        return math.inf
    return sum(values) / len(values)


@dataclass(frozen=True)
class VariantResult:
    """What one finished variant reports (also logged as ``final/*`` metrics)."""

    spec: VariantSpec
    final: dict[str, float]

    seed: int = 0

    @property
    def wall_time(self) -> float:
        """Seconds the run took (training, diagnostics and the final validation)."""
        return self.final.get("final/wall_time_s", math.nan)

    @property
    def cpu_time(self) -> float:
        """CPU seconds of the run's process over the same span."""
        return self.final.get("final/cpu_time_s", math.nan)


def _quiet() -> contextlib.ExitStack:
    """Silence Lightning's info lines and the warnings that do not concern the user here."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    for pattern in (
        ".*does not have many workers.*",
        ".*smaller than the logging interval.*",
        ".*LeafSpec.*",
        ".*GPU available but not used.*",
        ".*Experiment logs directory.*exists and is not empty.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        log = logging.getLogger(name)
        level = log.level
        log.setLevel(logging.WARNING)
        stack.callback(log.setLevel, level)
    return stack


def _wandb_logger(
    plan: ExperimentPlan,
    spec: VariantSpec,
    seed: int,
    out_dir: Path,
    mode: str,
    group: str,
    project: str,
) -> WandbLogger:
    finish_active_run()  # WandbLogger would reuse a run left open
    config = {
        "variant": spec.to_dict()
        | {"id": spec.id, "norm": spec.norm, "noise": spec.noise, "seed": seed},
        "plan": plan.to_dict(),
    }
    logger = WandbLogger(
        name=spec.run_id(seed),
        save_dir=str(out_dir),
        project=project,
        group=group,
        job_type=plan.experiment,
        offline=mode == "offline",
        config=config,
        # wandb.init accepts the settings as a mapping: no wandb import here
        settings={"silent": True, "console": "off", "disable_git": True},
    )
    # WandbLogger always passes `anonymous` (None when unset), which wandb >= 0.2x answers with a
    # deprecation warning on every process; leaving it out changes nothing else.
    init_kwargs = getattr(logger, "_wandb_init", None)
    if isinstance(init_kwargs, dict) and init_kwargs.get("anonymous") is None:
        init_kwargs.pop("anonymous", None)
    return logger


def run_variant(
    plan: ExperimentPlan,
    spec: VariantSpec,
    out_dir: Path,
    *,
    wandb_mode: str = "offline",
    group: str = "lightning-bn",
    project: str = DEFAULT_PROJECT,
    progress: bool = True,
    datamodule: pl.LightningDataModule | None = None,
    seed: int | None = None,
    callbacks: list[Callback] | None = None,
) -> VariantResult:
    """Train one variant with one seed, with its diagnostics, and log its metrics to CSV (and W&B).

    Args:
        plan: the experiment plan.
        spec: the variant.
        out_dir: the run folder (CSV files go to ``out_dir/csv/<run id>/metrics.csv``, W&B
            files to ``out_dir/wandb``).
        wandb_mode: ``"online"``, ``"offline"`` or ``"off"``.
        group: W&B group of the run (one per reproduce run).
        project: W&B project.
        progress: show Lightning's progress bar.
        datamodule: the data (built from the plan when ``None``).
        seed: the seed of the run (default ``plan.seed``): initialisation, data split and order,
            noise and the diagnostics' random vectors.
        callbacks: more callbacks for the Trainer (reporting only, such as the progress display).

    Returns:
        The ``final/*`` metrics of the run.
    """
    seed = plan.seed if seed is None else seed
    pl.seed_everything(seed, verbose=False)
    module = _build_module(plan, spec)
    data = (
        datamodule
        if datamodule is not None
        else build_datamodule(plan, spec.arch, seed, plan.batch_of(spec))
    )
    recorder = TrainLossRecorder()
    csv_logger = CSVLogger(str(out_dir / "csv"), name=spec.run_id(seed), version="")
    loggers: list[Logger] = [csv_logger]
    wandb_logger: WandbLogger | None = None
    start, cpu_start = time.perf_counter(), time.process_time()
    with _quiet(), _restore_env("WANDB_MODE"):
        try:
            if wandb_mode != "off":
                wandb_logger = _wandb_logger(plan, spec, seed, out_dir, wandb_mode, group, project)
                loggers.append(wandb_logger)
            csv_logger.log_hyperparams(
                spec.to_dict() | {"id": spec.id, "seed": seed, "experiment": plan.experiment}
            )
            trainer = pl.Trainer(
                max_steps=plan.steps,
                accelerator=plan.accelerator,
                devices=1,
                logger=loggers,
                callbacks=[
                    *_callbacks(plan, spec, seed),
                    recorder,
                    *(callbacks or []),
                    *_progress_bar(plan, progress),
                ],
                log_every_n_steps=plan.log_every,
                num_sanity_val_steps=0,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress,
            )
            trainer.fit(module, datamodule=data)
            val = trainer.validate(module, datamodule=data, verbose=False)
            final = recorder.summary()
            metrics = val[0] if val else {}
            for key in ("loss", "acc"):
                if f"val/{key}" in metrics:
                    final[f"final/val_{key}"] = float(metrics[f"val/{key}"])
            final["final/steps"] = float(trainer.global_step)
            val_data = getattr(data, "val_dataset", None)
            if val_data is not None:  # the bootstrap resamples the validation accuracy
                final["final/val_samples"] = float(len(val_data))
            final["final/wall_time_s"] = time.perf_counter() - start
            final["final/cpu_time_s"] = time.process_time() - cpu_start
            for logger in loggers:
                logger.log_metrics(dict(final), step=trainer.global_step)
                logger.save()
            if wandb_logger is not None:
                wandb_logger.experiment.summary.update(final)
        finally:
            if wandb_logger is not None:
                finish_active_run()
    return VariantResult(spec, final, seed)


def format_result(result: VariantResult, task: str) -> str:
    """One line about a finished variant: final accuracy or loss, and the time it took."""
    spec, final = result.spec, result.final
    extra = spec.id.removeprefix(f"{spec.arch}_{spec.kind}_lr{format_lr(spec.lr)}")
    parts = [
        f"{spec.arch:<4} {spec.kind:<16} lr {format_lr(spec.lr):<5}{extra:<11} seed {result.seed}"
    ]
    if task == "classification":
        parts.append(f"val acc {final.get('final/val_acc', math.nan):.3f}")
    parts.append(f"val loss {final.get('final/val_loss', math.nan):.4g}")
    parts.append(f"train loss {final.get('final/train_loss', math.nan):.4g}")
    if final.get("final/diverged"):
        parts.append(f"DIVERGED at step {int(final.get('final/diverged_step', -1))}")
    parts.append(f"{result.wall_time:.1f} s ({result.cpu_time:.1f} s CPU)")
    return "  ".join(parts)


@contextlib.contextmanager
def _threads(plan: ExperimentPlan) -> Iterator[None]:
    # Tiny models on a few cores run fastest with one intra-op thread (no oversubscription).
    if plan.threads is None or plan.accelerator != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_manifest(out_dir: Path, plan: ExperimentPlan, status: str, extra: dict[str, Any]) -> None:
    """Write ``run.json``: the plan, and every run (variant and seed) with its CSV file.

    The file is replaced in one step (a temporary file renamed over it), so that a reader, or a
    process killed while writing, never sees half a file.
    """
    from lightning_bn import __version__

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


class _ProgressTick(Callback):
    """Tell the progress display how far the run in progress is (``--jobs 1``; reporting only)."""

    def __init__(self, display: ProgressDisplay) -> None:
        self.display = display

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
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
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Expected argument `jobs` to be a positive integer, but got {jobs!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now()
    meta: dict[str, Any] = {
        "created": started.isoformat(timespec="seconds"),
        "wandb": wandb_mode,
        "jobs": jobs,
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
                        jobs, mp_context=context, initializer=worker_signals
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
