"""The diagnostic callbacks' side of the shared budget: joining the Trainer's ledger, timing and
booking measurements, planning from rank zero's numbers, logging what is spent.

The schedule itself (plain Python) is :mod:`lightning_bn.callbacks.schedule`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_bn.callbacks.schedule import DEFAULT_BUDGET, NEVER, Entry, Ledger, ledger_for
from lightning_bn.errors import DiagnosticWarning
from lightning_bn.logging.extras import logger_extras
from lightning_bn.logging.keys import DeclaresKeys, LoggedKey, LoggedKeys

__all__ = ["BudgetKeys", "SharedBudget", "device_sync", "horizon"]

_BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end")
_SLEEPERS = ("DiagnosticCallback.on_train_batch_start", "AfterTrainBatch.on_train_batch_end",
             "DiagnosticCallback.after_train_batch")  # fmt: skip


class BudgetKeys(DeclaresKeys):
    """What the shared budget logs besides each callback's ``<prefix>/spent``."""

    logged_keys = LoggedKeys(prefix="budget/", keys=(LoggedKey("budget/spent", "last"),))


def device_sync(module: nn.Module) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` of the module's device when it is a CUDA one, else ``None``."""
    param = next(module.parameters(), None)
    if param is None or param.device.type != "cuda":
        return None
    device = param.device
    return lambda: torch.cuda.synchronize(device)


def horizon(trainer: pl.Trainer) -> int | None:
    """The run's length in optimiser steps, ``None`` if unknown."""
    try:
        steps = float(trainer.estimated_stepping_batches)
    except Exception:  # no length: an iterable dataset, no max_steps
        return None
    return int(steps) if 0 < steps < float("inf") else None


class SharedBudget:
    """Mixin of :class:`~lightning_bn.callbacks.base.DiagnosticCallback`: its account in the
    Trainer's :class:`~lightning_bn.callbacks.schedule.Ledger`.

    Its hooks sleep between measurements (``None``, which Lightning skips; see "Hooks" in
    :mod:`~lightning_bn.callbacks.schedule`): the per-step hooks the diagnostics do not use
    always (a subclass may define them), the batch hooks of all but the first diagnostic
    callback until one is due, unless a subclass overrides them or they are replaced on the
    instance.
    """

    on_before_backward: Any = None
    on_after_backward: Any = None
    on_before_optimizer_step: Any = None
    on_before_zero_grad: Any = None

    budget: float | None
    schedule: int | Literal["auto"]
    every_n_steps: int | None
    overhead: float | None
    clock: Callable[[], float]
    state_key: str
    _ledger: Ledger | None
    _ledger_state: dict[str, Any] | None
    _seen_plan: int
    _cost: float
    _sync: Callable[[], None] | None
    _leader: bool = True
    _sleepy: bool = False
    measure_after_step: bool

    @property
    def key_prefix(self) -> str:  # the base class's
        raise NotImplementedError

    @property
    def ledger(self) -> Ledger:
        """The ledger this callback books into (its Trainer's, from ``setup`` on)."""
        if self._ledger is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: add it to a Trainer and fit")
        return self._ledger

    @property
    def _entry(self) -> Entry:
        return self.ledger.entries[self.state_key]

    def _join_ledger(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Book into the Trainer's ledger; all its diagnostics must agree on one budget."""
        given = {
            (type(cb).__name__, cb.budget)
            for cb in getattr(trainer, "callbacks", [])
            if isinstance(cb, SharedBudget) and cb.budget is not None
        }
        if len({b for _, b in given}) > 1:
            listed = ", ".join(f"{b} ({n})" for n, b in sorted(given))
            raise ValueError(
                "The diagnostic callbacks of one Trainer share one `budget`, but got " + listed
            )
        self._ledger = ledger = ledger_for(trainer)
        ledger.budget = next(iter(given))[1] if given else DEFAULT_BUDGET
        fixed = None if self.schedule == "auto" else self.schedule
        ledger.register(self.state_key, fixed, self.measurement_steps())
        self._seen_plan = ledger.plans
        if self._ledger_state is not None:  # loaded before this fit's setup
            ledger.load_state_dict(self._ledger_state)
            self._ledger_state = None
        self._sync = device_sync(pl_module)

    def measurement_steps(self) -> float:  # the base class's
        raise NotImplementedError

    def _can_sleep(self) -> bool:
        """Whether the batch hooks may be ``None`` between measurements: not if a subclass
        overrides a function of ``_SLEEPERS`` or a hook was replaced on the instance."""
        cls = type(self)
        return all(
            getattr(cls, owned.split(".")[1]).__qualname__ == owned for owned in _SLEEPERS
        ) and all(self.__dict__.get(hook) is None for hook in _BATCH_HOOKS)

    def _wake(self, hook: str) -> None:
        if hook in self.__dict__ and self.__dict__[hook] is None:  # only what `_sleep` set
            del self.__dict__[hook]

    def _start_training(self, trainer: pl.Trainer) -> None:
        """At ``on_train_start``: a new fit in the ledger; every hook awake; who leads."""
        self.ledger.start_fit(horizon(trainer))
        self.ledger.wake = 0
        for hook in _BATCH_HOOKS:
            self._wake(hook)
        self._sleepy = self._can_sleep()
        callbacks = getattr(trainer, "callbacks", [])
        first = next((cb for cb in callbacks if isinstance(cb, SharedBudget)), self)
        self._leader = first is self
        if self._sleepy and not self.measure_after_step:
            self.__dict__["on_train_batch_end"] = None  # nothing to do after a step

    def _sleep(self, trainer: pl.Trainer) -> None:
        """At the end of ``on_train_batch_start``: the leader wakes the others if one is due or
        a plan was made; any other goes to sleep until its next due step."""
        ledger, step = self.ledger, trainer.global_step
        if self._leader:
            if step >= ledger.wake:
                ledger.wake = NEVER
                for cb in getattr(trainer, "callbacks", []):
                    if cb is not self and isinstance(cb, SharedBudget):
                        cb._wake("on_train_batch_start")
            return
        if self.schedule != "auto":
            due = (step // self.schedule + 1) * self.schedule
        else:
            planned = self._entry.next_step
            due = NEVER if planned is None else max(planned, step + 1)
        ledger.wake = min(ledger.wake, due)
        if self._sleepy:
            self.__dict__["on_train_batch_start"] = None

    def _wake_after_step(self, awake: bool) -> None:
        """``on_train_batch_end`` is awake only while a measurement after the step is open."""
        if not self._sleepy:
            return
        if awake:
            self._wake("on_train_batch_end")
        else:
            self.__dict__["on_train_batch_end"] = None

    def _start_step(self, trainer: pl.Trainer, now: float) -> None:
        """At every ``on_train_batch_start`` (``now`` on the clock): book the step (the first
        callback of a step), plan after calibration, log a new plan. Kept short: it runs at
        every step."""
        ledger = self.ledger
        ledger.tick(trainer.global_step, now)
        if not ledger.planned and ledger.step_time is not None:  # the fit's first plan
            self._replan(trainer)
        if ledger.plans != self._seen_plan and self.schedule == "auto":  # a new interval
            self._log_schedule(trainer)

    def _end_fit(self, trainer: pl.Trainer) -> None:
        """At the end of training (``"auto"``): log the spent shares once more (the hooks' since
        the last plan), and say so if the budget never paid for a measurement of this callback."""
        if self._ledger is None or self.schedule != "auto":  # a fixed schedule logs no shares
            return
        self._log_schedule(trainer)
        entry = self._entry
        if entry.last_step is None:
            rank_zero_warn(
                f"{type(self).__name__} never measured in this fit: the diagnostics' shared"
                f" budget ({self.ledger.budget:g} of training time) did not cover its first"
                f" measurement (about {entry.prior:.0f} training steps) within"
                f" {trainer.global_step} steps. Raise `budget=` (e.g. budget=0.1) or set"
                " `every_n_steps=` to measure at fixed steps.",
                category=DiagnosticWarning,
            )

    def _tick(self) -> float:
        """The clock, after the device has finished its queued work (measurements only)."""
        if self._sync is not None:
            self._sync()
        return self.clock()

    def _book(self, trainer: pl.Trainer, step: int, ok: bool) -> None:
        """Book the measurement that just ended (its seconds in ``_cost``), plan again, log."""
        ledger = self.ledger
        ledger.book(self.state_key, step, self._cost + self._tick(), ok)
        self._cost = 0.0
        auto = any(e.interval is None for e in ledger.entries.values())
        if auto and ledger.step_time is not None:
            self._replan(trainer)
        if self.schedule == "auto":  # a fixed schedule logs only its measurements
            self._log_schedule(trainer)

    def _replan(self, trainer: pl.Trainer) -> None:
        """Plan every callback's next measurement from rank zero's ledger (all ranks alike)."""
        ledger = self.ledger
        # every rank calls broadcast at the same hook of the same step (the schedule is shared)
        ledger.adopt(trainer.strategy.broadcast(ledger.snapshot(), src=0))
        ledger.plan(trainer.global_step)
        ledger.wake = -1  # every sleeping callback sees the new plan at the next leader's hook

    def _log_schedule(self, trainer: pl.Trainer) -> None:
        """Log what the budget pays for (after a plan): spent shares, the planned interval."""
        ledger, entry, prefix = self.ledger, self._entry, self.key_prefix
        self._seen_plan = ledger.plans
        if ledger.train_seconds <= 0:  # the first step: no training time to divide by yet
            return
        metrics = {
            "budget/spent": ledger.spent_fraction(),
            f"{prefix}/spent": ledger.spent_fraction(self.state_key),
        }
        step_time = ledger.step_time
        if entry.interval is None and entry.next_step is not None and step_time:
            self.every_n_steps = max(1, entry.next_step - (entry.last_step or 0))
            self.overhead = entry.estimate(step_time) / (self.every_n_steps * step_time)
            metrics[f"{prefix}/every_n_steps"] = float(self.every_n_steps)
            metrics[f"{prefix}/overhead"] = self.overhead
        # straight to the loggers, not into panel_history (no panel draws the schedule)
        for extras in logger_extras():
            extras.on_log(trainer, list(metrics))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
