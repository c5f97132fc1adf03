"""Shared wiring of the diagnostic callbacks: schedule, checks, probe, safe execution, logging."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_bn.callbacks.sync_check import warn_unsynchronised_norms
from lightning_bn.probe import Collective, Probe, RNGState
from lightning_bn.wandb_panels import (
    PAPER_SUMMARIES,
    PanelHistory,
    define_metrics,
    log_config,
    log_paper_panels,
)

__all__ = ["DiagnosticCallback", "DiagnosticWarning"]

LossFn = Callable[[nn.Module, Any], Tensor]


class DiagnosticWarning(UserWarning):
    """A diagnostic measurement was skipped; training went on untouched."""


def _sharded_strategy_types() -> tuple[type, ...]:
    from lightning.pytorch import strategies

    names = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
    return tuple(getattr(strategies, n) for n in names if hasattr(strategies, n))


class DiagnosticCallback(Callback):
    """Base of the diagnostic callbacks (ICS, Lipschitz, Smoothness).

    Subclasses implement :meth:`_compute` and choose when it runs: ``measure_after_step = False``
    computes at ``on_train_batch_start`` at :math:`W^t` (no copy of the weights is needed),
    ``True`` keeps :math:`W^t` and computes at ``on_train_batch_end`` with :math:`W^{t+1}` at hand.
    The base class owns the schedule (``global_step % every_n_steps == 0``, identical on every rank),
    the checks, the probe (:class:`~lightning_bn.probe.Probe`, which never touches the model), the
    DDP reductions (:class:`~lightning_bn.probe.Collective`), failure handling (a failed measurement
    is a :class:`DiagnosticWarning`, never an exception in the training loop) and logging through
    every Lightning logger of the trainer at the measured step.
    """

    measure_after_step: bool = False

    def __init__(self, every_n_steps: int = 100, loss_fn: LossFn | None = None) -> None:
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"Expected argument `every_n_steps` to be a positive integer, but got {every_n_steps!r}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"Expected argument `loss_fn` to be callable, but got {loss_fn!r}")
        self.every_n_steps = every_n_steps
        self.loss_fn = loss_fn
        self.collective = Collective()
        self._probe: Probe | None = None
        self._pending: dict[str, Any] | None = None
        self.measured_steps: list[int] = []
        self.panel_history = PanelHistory()

    # --- hooks ---------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_trainer(trainer, pl_module)
        warn_unsynchronised_norms(trainer, pl_module)
        # the probes run under the training step's precision context (autocast for *-mixed)
        self._probe = Probe(
            pl_module, self.loss_fn, context=trainer.precision_plugin.train_step_context
        )
        self._setup(trainer, pl_module)
        log_config(trainer, type(self).__name__, self._settings())
        if not trainer.loggers:
            rank_zero_warn(
                f"{type(self).__name__}: the trainer has no logger, so nothing it measures will be"
                " recorded. Pass `logger=...` (CSVLogger, WandbLogger, ...) to the Trainer."
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._should_measure(trainer):
            return
        # e.g. NoiseInjectionCallback: draw this step's noise before the probes run
        for other in getattr(trainer, "callbacks", []):
            prepare = getattr(other, "prepare_batch", None)
            if other is not self and callable(prepare):
                prepare(trainer)
        self._pending = {
            "step": trainer.global_step,
            "batch": batch,
            "batch_idx": batch_idx,
            "rng": RNGState.capture(),
        }
        if self.measure_after_step:
            self._pending["before"] = self.probe.parameters()
        else:
            self._measure(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._pending is not None and self.measure_after_step:
            self._measure(trainer, pl_module)
        self._pending = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            log_paper_panels(trainer, self.panel_history)
        except Exception as exc:  # panels are a convenience: never fail the run for them
            warnings.warn(
                f"{type(self).__name__} could not log its W&B panels: {exc}",
                DiagnosticWarning,
                stacklevel=2,
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None
        self._probe = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "measured_steps": list(self.measured_steps),
            "panel_history": self.panel_history.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured_steps = list(state_dict.get("measured_steps", []))
        if "panel_history" in state_dict:
            self.panel_history.load_state_dict(state_dict["panel_history"])

    # --- subclass interface -------------------------------------------------------------------
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve layers and check what needs the model (runs in ``setup``)."""

    def _settings(self) -> dict[str, Any]:
        """The constructor arguments, for the W&B run config (subclasses add theirs)."""
        return {"every_n_steps": self.every_n_steps, "loss_fn": self.loss_fn}

    def _compute(self, trainer: pl.Trainer, pending: Mapping[str, Any]) -> dict[str, float]:
        """Return the metrics of one measurement (keys already prefixed)."""
        raise NotImplementedError

    # --- helpers -------------------------------------------------------------------------------
    @property
    def probe(self) -> Probe:
        if self._probe is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: add it to a Trainer and fit")
        return self._probe

    def _should_measure(self, trainer: pl.Trainer) -> bool:
        return trainer.training and trainer.global_step % self.every_n_steps == 0

    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(self).__name__
        if isinstance(trainer.strategy, _sharded_strategy_types()):
            raise NotImplementedError(
                f"{name} does not support the sharded strategy {type(trainer.strategy).__name__}"
                " yet (parameters are split across ranks); use DDP or a single device"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{name} needs automatic optimisation (one optimiser, one step per batch); the"
                " module sets `automatic_optimization = False`"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"{name} measures one optimiser step on one batch and does not support gradient"
                f" accumulation; got `accumulate_grad_batches={trainer.accumulate_grad_batches}`"
            )

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending = self._pending
        assert pending is not None
        try:
            metrics = self._compute(trainer, pending)
        except Exception as exc:  # a diagnostic never stops training
            warnings.warn(
                f"{type(self).__name__} skipped the measurement at step {pending['step']}:"
                f" {type(exc).__name__}: {exc}."
                " The model and optimiser are untouched and training goes on.",
                DiagnosticWarning,
                stacklevel=2,
            )
            return
        self.measured_steps.append(int(pending["step"]))
        self._log(trainer, metrics, int(pending["step"]))

    def _log(self, trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
        if not metrics:
            return
        define_metrics(trainer, PAPER_SUMMARIES, keys=metrics)
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)
        self.panel_history.add(step, metrics)
