"""One training run of a reproduce plan: the model and data of a variant (from its experiment),
its callbacks and loggers, the ``final/*`` metrics, and the line that reports it."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from lightning_bn.callbacks._hooks import AfterTrainBatch
from lightning_bn.experiments import ClassificationModule, RegressionModule
from lightning_bn.logging.wandb import finish_active_run
from lightning_bn.reproduce.experiments import get_experiment
from lightning_bn.reproduce.plan import ExperimentPlan, VariantSpec, format_lr
from lightning_bn.reproduce.wandb_setup import DEFAULT_PROJECT, _restore_env, _wandb_logger

__all__ = [
    "FINAL_WINDOW",
    "TrainLossRecorder",
    "VariantResult",
    "build_datamodule",
    "build_model",
    "format_result",
    "run_variant",
]

#: Share of the last training steps averaged into ``final/train_loss``.
FINAL_WINDOW = 0.1


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
                # the reference models are small: a stored basis costs little memory here and
                # converges in fewer products than the callback's memory-bound default
                lanczos_basis=5,
                seed=seed,
            ),
        ]
    if spec.noise:
        callbacks.append(NoiseInjectionCallback(seed=seed, log_every_n_steps=plan.log_every))
    return callbacks


def _progress_bar(plan: ExperimentPlan, progress: bool) -> list[Callback]:
    # Redrawing the bar at every step of a millisecond-step model costs more than the step.
    return [TQDMProgressBar(refresh_rate=max(1, plan.steps // 100))] if progress else []


class TrainLossRecorder(AfterTrainBatch):
    """Keep the training loss of every step, and stop a run whose loss is no longer finite.

    A diverged run (NaN or infinite loss) cannot recover; stopping it saves the budget, and the
    diagnostics would only measure NaN. ``diverged_at`` is the (0-based) step whose loss was the
    first non-finite one.
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.diverged_at: int | None = None

    @override
    def after_train_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any
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
