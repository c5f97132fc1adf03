"""Shared wiring of the diagnostic callbacks: schedule, checks, probe, safe execution, logging."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_bn._types import LossFn
from lightning_bn._validation import ArgumentTypeError, check_float, check_int
from lightning_bn.callbacks._guards import refuse_compiled_submodules
from lightning_bn.callbacks._hooks import AfterTrainBatch
from lightning_bn.callbacks._state_key import CachedStateKey
from lightning_bn.callbacks.budget import SharedBudget
from lightning_bn.callbacks.sync_check import warn_unsynchronised_norms
from lightning_bn.errors import DiagnosticWarning
from lightning_bn.logging.extras import LoggerExtras, MetricHistory, logger_extras
from lightning_bn.logging.keys import DeclaresKeys
from lightning_bn.probe import Collective, Probe, RNGState, StepRecord, copy_batch
from lightning_bn.probe.batched import VmapChunkSize, check_vmap_chunk_size
from lightning_bn.probe.memory import PeakMemory

__all__ = ["BatchPreparer", "DiagnosticCallback", "DiagnosticWarning"]


@runtime_checkable
class BatchPreparer(Protocol):
    """A callback that must act on a training batch before any diagnostic probe runs on it.

    A diagnostic callback measures at ``on_train_batch_start``, and Lightning calls the
    callbacks' hooks in list order, so a callback that changes what the forward pass computes
    for this batch (:class:`~lightning_bn.callbacks.noise_injection.NoiseInjectionCallback`
    draws the batch's noise) may not have run yet. Before it measures, every
    :class:`DiagnosticCallback` therefore calls ``prepare_batch(trainer)`` on each other
    callback of the trainer that implements this protocol (checked with ``isinstance``; no
    subclassing needed), so the probes see the network that is trained at this step.

    Semantics a ``prepare_batch`` must keep: it is idempotent within one training batch (it
    may be called once per diagnostic callback and again by its own
    ``on_train_batch_start``, and every call after the first does nothing), it uses no global
    RNG state (the probes replay the step's RNG), and it is only called while training.
    """

    def prepare_batch(self, trainer: pl.Trainer) -> None:
        """Get ready for the current training batch (``trainer.global_step`` is its step)."""


@contextlib.contextmanager
def _pinned_step(trainer: pl.Trainer, step: int, epoch: int) -> Iterator[None]:
    """Show ``step`` and ``epoch`` as the trainer's ``global_step`` and ``current_epoch`` (and
    so the module's) inside the block, then restore the counters exactly.

    ICS probes run after the optimiser step, when Lightning's counter already says t + 1; a
    loss that depends on ``self.global_step`` (warm-up terms, annealed penalties) must be
    evaluated at step t. The counters are Lightning's progress trackers behind both properties
    (automatic optimisation: the optimiser-step count of the fit loop's epoch loop).
    """
    fit_loop = trainer.fit_loop
    counter = fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    epochs = fit_loop.epoch_progress.current
    saved = (counter.completed, epochs.completed)
    counter.completed, epochs.completed = step, epoch
    try:
        yield
    finally:
        counter.completed, epochs.completed = saved


def _sharded_strategy_types() -> tuple[type, ...]:
    from lightning.pytorch import strategies

    names = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
    return tuple(getattr(strategies, n) for n in names if hasattr(strategies, n))


class DiagnosticCallback(SharedBudget, CachedStateKey, AfterTrainBatch, DeclaresKeys):
    """Base of the diagnostic callbacks (ICS, Lipschitz, Smoothness).

    Subclasses implement :meth:`_compute` and choose when it runs: ``measure_after_step = False``
    computes at ``on_train_batch_start`` at :math:`W^t` (no copy of the weights is needed),
    ``True`` keeps :math:`W^t` and computes at ``on_train_batch_end`` with :math:`W^{t+1}` at hand.
    The base class owns the schedule (``global_step % every_n_steps == 0``, identical on every rank),
    the checks, the probe (:class:`~lightning_bn.probe.Probe`, which never touches the model), the
    DDP reductions (:class:`~lightning_bn.probe.Collective`), failure handling (a failed measurement
    is a :class:`DiagnosticWarning`, never an exception in the training loop) and logging through
    every Lightning logger of the trainer at the measured step (as ``LearningRateMonitor`` does).
    What a logger offers beyond scalars (W&B summaries, config and charts) comes from the
    registered :class:`~lightning_bn.logging.extras.LoggerExtras`, which the base calls without
    knowing any logger by name. Before measuring it calls ``prepare_batch`` on every other
    callback that is a :class:`BatchPreparer`.

    **Schedule.** All the diagnostic callbacks of a Trainer spend one ``budget`` (a share of
    training time, default :data:`~lightning_bn.callbacks.schedule.DEFAULT_BUDGET` for all of them
    together; a value given to any of them sets it, and two different values are an error),
    booked in one :class:`~lightning_bn.callbacks.schedule.Ledger` of measured costs. With
    ``every_n_steps="auto"`` (the default) a callback measures when the ledger says its turn has
    come, the first time once the budget covers :meth:`measurement_steps` training steps: more
    often early in training, less later (see :mod:`lightning_bn.callbacks.schedule`). Rank zero
    decides and broadcasts; the ledger is kept in :meth:`state_dict`. An ``int`` is a fixed schedule, ``global_step % every_n_steps ==
    0``, whose cost the ``"auto"`` callbacks leave to it. Logged at every plan: ``budget/spent``
    (all the callbacks' seconds ÷ training seconds), ``<prefix>/spent`` (this callback's),
    ``<prefix>/every_n_steps`` (its planned interval) and ``<prefix>/overhead`` (that interval's
    projected share). ``clock`` (default :func:`time.perf_counter`) may be replaced before
    fitting, e.g. by a test.
    """

    measure_after_step: bool = False
    #: First part of every logged key (``ics``, ``lipschitz``, ``smoothness``).
    key_base: ClassVar[str] = "diagnostic"

    def __init__(
        self,
        every_n_steps: int | Literal["auto"] = "auto",
        loss_fn: LossFn | None = None,
        budget: float | None = None,
        name: str | None = None,
        vmap_chunk_size: VmapChunkSize = "auto",
    ) -> None:
        #: How the probe evaluates a grid of points (:mod:`lightning_bn.probe.batched`); a speed
        #: setting, left out of :meth:`_settings` (and so of ``state_key``).
        self.vmap_chunk_size = check_vmap_chunk_size(vmap_chunk_size)
        if not (isinstance(every_n_steps, str) and every_n_steps == "auto"):
            try:
                check_int("every_n_steps", every_n_steps, minimum=1)
            except (TypeError, ValueError) as exc:
                raise type(exc)(
                    f"Expected argument `every_n_steps` to be 'auto' or a positive integer, but got"
                    f" {every_n_steps!r}"
                ) from None
        if name is not None:
            expected = "None or a non-empty string without '/'"
            if not isinstance(name, str):
                raise ArgumentTypeError(
                    f"Expected argument `name` to be {expected}, but got {name!r}"
                )
            if not name or "/" in name:
                raise ValueError(f"Expected argument `name` to be {expected}, but got {name!r}")
        #: Set by the user to tell several callbacks of one class apart: keys ``<base>@<name>/...``.
        self.name = name
        self._derived_prefix: str | None = None
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"Expected argument `loss_fn` to be callable, but got {loss_fn!r}")
        #: The share of training time of all the Trainer's diagnostics (``None``: the default).
        self.budget = (
            None if budget is None else check_float("budget", budget, minimum=0, maximum=1)
        )
        if self.budget == 0:
            raise ValueError(f"Expected argument `budget` to be in (0, 1], but got {budget!r}")
        #: What the constructor was given: ``"auto"`` or a fixed interval.
        self.schedule: int | Literal["auto"] = every_n_steps
        #: The interval in use (``"auto"``: the last planned one; ``None`` before a plan).
        self.every_n_steps: int | None = None if every_n_steps == "auto" else every_n_steps
        #: The projected share of training time of the planned interval (``None`` before a plan).
        self.overhead: float | None = None
        self.clock: Callable[[], float] = time.perf_counter
        self._ledger = None
        self._ledger_state: dict[str, Any] | None = None  # loaded before the ledger was known
        self._seen_plan = -1
        self._cost = 0.0  # seconds of the measurement in progress
        self._sync: Callable[[], None] | None = None
        self.loss_fn = loss_fn
        self.collective = Collective()
        self._probe: Probe | None = None
        self._record: StepRecord | None = None  # the step being measured, between hooks
        self.measured_steps: list[int] = []
        self._empty_grid_warned = False  # said once per fit: every learning rate is 0
        #: Everything this callback logged (what logger extras draw at the end of fit).
        self.panel_history = MetricHistory()

    # --- hooks ---------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._freeze_state_key()
        if stage != "fit":
            return
        self._check_trainer(trainer, pl_module)
        warn_unsynchronised_norms(trainer, pl_module)
        self._check_siblings(trainer, pl_module)
        self._empty_grid_warned = False
        # the probes run under the training step's precision context (autocast for *-mixed)
        self._probe = Probe(
            pl_module,
            self.loss_fn,
            context=lambda: self._probe_context(trainer),
            vmap_chunk_size=self.vmap_chunk_size,
        )
        self._setup(trainer, pl_module)
        self._join_ledger(trainer, pl_module)
        for extras in logger_extras():
            extras.on_setup(trainer, type(self).__name__, self._settings())
        if not trainer.loggers:
            rank_zero_warn(
                f"{type(self).__name__}: the trainer has no logger, so nothing it measures will be"
                " recorded. Pass `logger=...` (CSVLogger, WandbLogger, ...) to the Trainer."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_training(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start_step(trainer, self.clock())  # the clock first: the hook is timed whole
        if self._should_measure(trainer):
            self._start_measurement(trainer, pl_module, batch, batch_idx)
        self._sleep(trainer)
        # this hook's time outside the measurement (a measurement after the step is still open)
        self.ledger.book_hook(self.state_key, self.clock(), self._cost)

    def _start_measurement(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._cost = -self._tick()
        # e.g. NoiseInjectionCallback: draw this step's noise before the probes run
        for other in getattr(trainer, "callbacks", []):
            if other is not self and isinstance(other, BatchPreparer):
                other.prepare_batch(trainer)
        self._record = StepRecord(
            # a private copy: the real step may change its batch in place before ICS measures
            batch=copy_batch(batch),
            batch_idx=batch_idx,
            rng=RNGState.capture(),
            step=trainer.global_step,
            before=self.probe.parameters() if self.measure_after_step else None,
            epoch=trainer.current_epoch,
        )
        if not self.measure_after_step:
            self._book(trainer, self._record.step, self._measure(trainer, pl_module))
            self._record = None
        else:
            self._wake_after_step(True)
            self._cost += self._tick()

    @override
    def after_train_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any
    ) -> None:
        record = self._record
        if record is not None and self.measure_after_step:
            self._cost -= self._tick()
            self._book(trainer, record.step, self._measure(trainer, pl_module))
        self._record = None
        self._wake_after_step(False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_fit(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for extras in logger_extras():
            self._safe_extras(
                extras,
                "could not log its {} panels",
                extras.on_fit_end,
                trainer,
                self.panel_history,
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._thaw_state_key()
        self._wake("on_train_batch_start")  # awake again (see SharedBudget)
        self._wake("on_train_batch_end")
        self._record = None
        self._probe = None
        self._ledger_state = None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._thaw_state_key()  # Lightning does not call `teardown` after an exception

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        """The state key is derived from the settings (and ``name``), so that several callbacks
        of one class can be in one Trainer and each finds its own state on resume."""
        return {k: v for k, v in self._settings().items() if k not in ("loss_fn", "budget")}

    @property
    def key_prefix(self) -> str:
        """First part of the logged keys: ``<base>``, ``<base>@<name>`` with a ``name``, or
        ``<base>@<k>`` when unnamed callbacks of one class in one Trainer would log the same
        keys (``k``: 1, 2, ... in the Trainer's callback order)."""
        if self.name is not None:
            return f"{self.key_base}@{self.name}"
        return self._derived_prefix or self.key_base

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "measured_steps": list(self.measured_steps),
            "panel_history": self.panel_history.state_dict(),
            "every_n_steps": self.every_n_steps,
            "overhead": self.overhead,
            "ledger": self._ledger.state_dict() if self._ledger else self._ledger_state,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured_steps = list(state_dict.get("measured_steps", []))
        if self.schedule == "auto":
            self.every_n_steps, self.overhead = state_dict.get("every_n_steps"), None
        self._ledger_state = state_dict.get("ledger")  # for the next setup, or now if fitting
        if self._ledger is not None and self._ledger_state is not None:
            self._ledger.load_state_dict(self._ledger_state)
        if "panel_history" in state_dict:
            self.panel_history.load_state_dict(state_dict["panel_history"])

    # --- subclass interface -------------------------------------------------------------------
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve layers and check what needs the model (runs in ``setup``)."""

    def _settings(self) -> dict[str, Any]:
        """The constructor arguments, for the loggers' run config (subclasses add theirs)."""
        return {
            "every_n_steps": self.schedule,
            "budget": self.budget,
            "loss_fn": self.loss_fn,
            "name": self.name,
        }

    def _key_scope(self, pl_module: pl.LightningModule) -> set[str]:
        """What the logged keys depend on besides the prefix (e.g. layer names); two callbacks
        of one class whose scopes meet would log the same keys. Default: the whole model."""
        return {"*"}

    def _compute(self, trainer: pl.Trainer, record: StepRecord) -> dict[str, float]:
        """Return the metrics of one measurement of ``record`` (keys already prefixed)."""
        raise NotImplementedError

    # --- helpers -------------------------------------------------------------------------------
    @property
    def probe(self) -> Probe:
        if self._probe is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: add it to a Trainer and fit")
        return self._probe

    def _probe_context(self, trainer: pl.Trainer) -> contextlib.ExitStack:
        """What every probe evaluation runs in: the training step's precision context (autocast
        for *-mixed) and the measured step's ``global_step``/``current_epoch``."""
        stack = contextlib.ExitStack()
        stack.enter_context(trainer.precision_plugin.train_step_context())
        if self._record is not None:
            stack.enter_context(_pinned_step(trainer, self._record.step, self._record.epoch))
        return stack

    @staticmethod
    def _param_lrs(trainer: pl.Trainer, pl_module: nn.Module) -> dict[str, float]:
        """The learning rate of each trainable parameter's optimiser group, by qualified name
        (0 for a trainable parameter no optimiser updates)."""
        if not trainer.optimizers:
            raise RuntimeError("no optimiser: the step sizes are relative to its learning rate")
        by_id: dict[int, float] = {}
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    by_id.setdefault(id(p), float(group["lr"]))
        return {
            n: by_id.get(id(p), 0.0) for n, p in pl_module.named_parameters() if p.requires_grad
        }

    @staticmethod
    def _current_lr(trainer: pl.Trainer) -> float:
        """The learning rate of the first optimiser's first group (step sizes scale with it)."""
        if not trainer.optimizers:
            raise RuntimeError("no optimiser: the step sizes are relative to its learning rate")
        return float(trainer.optimizers[0].param_groups[0]["lr"])

    def _should_measure(self, trainer: pl.Trainer) -> bool:
        if self.schedule != "auto":
            due = trainer.global_step % self.schedule == 0
        else:  # not before the first plan: the first measurement is paid from the budget too
            next_step = self._entry.next_step
            due = next_step is not None and trainer.global_step >= next_step
        return due and trainer.training

    def measurement_steps(self) -> float:
        """The cost of one measurement in training steps, estimated before any is timed: the
        passes it needs (a training step is about one forward and one backward pass; a forward
        alone about a third of one). The budget pays for the first measurement with it (see
        :mod:`lightning_bn.callbacks.schedule`). Default: one step; subclasses count theirs."""
        return 1.0

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
        refuse_compiled_submodules(name, pl_module)
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"{name} measures one optimiser step on one batch and does not support gradient"
                f" accumulation; got `accumulate_grad_batches={trainer.accumulate_grad_batches}`"
            )

    def _check_siblings(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse indistinguishable callbacks of this class; derive key prefixes where needed."""
        same = [cb for cb in getattr(trainer, "callbacks", []) if type(cb) is type(self)]
        keys = [cb.settings_state_key() for cb in same]
        names = [cb.name for cb in same if cb.name is not None]
        cls = type(self).__name__
        if len(set(keys)) < len(keys) or len(set(names)) < len(names):
            what = "`name`" if len(set(names)) < len(names) else "settings"
            raise ValueError(
                f"The Trainer has {len(same)} {cls}s with the same {what}: their checkpointed"
                " states and logged keys would be mixed up; give each a distinct `name=` (e.g."
                f" {cls}(..., name='a') and {cls}(..., name='b')) or drop the duplicate"
            )
        self._derived_prefix = None
        unnamed = [cb for cb in same if cb.name is None]
        if self.name is not None or len(unnamed) < 2:
            return
        scopes = [cb._key_scope(pl_module) for cb in unnamed]
        if any(a & b for i, a in enumerate(scopes) for b in scopes[i + 1 :]):
            index = next(i for i, cb in enumerate(unnamed) if cb is self) + 1
            self._derived_prefix = f"{self.key_base}@{index}"
            rank_zero_warn(
                f"{cls}: {len(unnamed)} unnamed {cls}s would log the same keys; this one logs"
                f" `{self._derived_prefix}/...` (pass `name=` to choose the prefix)"
            )

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        record = self._record
        assert record is not None
        try:
            with record.forked():  # one save and restore of the global RNG for all the probes
                if self.log_peak_memory:
                    with PeakMemory(trainer.strategy.root_device) as memory:
                        metrics = self._compute(trainer, record)
                    metrics.update(self._memory_metrics(memory))
                else:
                    metrics = self._compute(trainer, record)
        except Exception as exc:  # a diagnostic never stops training
            warnings.warn(
                f"{type(self).__name__} skipped the measurement at step {record.step}:"
                f" {type(exc).__name__}: {exc}."
                " The model and optimiser are untouched and training goes on.",
                DiagnosticWarning,
                stacklevel=2,
            )
            return False
        self.measured_steps.append(record.step)
        self._log(trainer, metrics, record.step)
        return True

    #: Log ``<prefix>/peak_mem_mb`` (host, sampled) and on CUDA ``<prefix>/peak_cuda_mem_mb``,
    #: the extra peak memory of each measurement. Off by default: the values vary from run to
    #: run (they are not a property of the model) and a sampling thread runs while measuring.
    log_peak_memory: bool = False

    def _memory_metrics(self, memory: PeakMemory) -> dict[str, float]:
        """``<prefix>/peak_mem_mb`` (host) and, on CUDA, ``<prefix>/peak_cuda_mem_mb``."""
        out = {"peak_mem_mb": memory.host_mb, "peak_cuda_mem_mb": memory.cuda_mb}
        return {f"{self.key_prefix}/{k}": v for k, v in out.items() if not math.isnan(v)}

    def _safe_extras(
        self, extras: LoggerExtras, what: str, hook: Callable[..., None], *args: Any
    ) -> None:
        """Run a logger-extras hook; an error is a warning (extras are a convenience)."""
        try:
            hook(*args)
        except Exception as exc:
            warnings.warn(
                f"{type(self).__name__} {what.format(extras.name)}: {exc}",
                DiagnosticWarning,
                stacklevel=3,
            )

    def _log(self, trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
        if not metrics:
            return
        for extras in logger_extras():
            extras.on_log(trainer, list(metrics))
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)
        self.panel_history.add(step, metrics)
