r"""One overhead budget for all the diagnostic callbacks of a Trainer, spent from one ledger.

Every :class:`~lightning_bn.callbacks.base.DiagnosticCallback` of a Trainer books into the same
:class:`Ledger` (:func:`ledger_for`): the seconds each measurement took (the time inside the
callback's hooks at the measured step; on CUDA the device is synchronised at the edges of a
measurement), the time of the hooks at the other steps, and the training time between them. The ledger then schedules the next measurement
of every callback with ``every_n_steps="auto"`` from what *all* of them spent.

**Training time.** :math:`W` is the time between consecutive training batches (read at the first
``on_train_batch_start`` of each step), with the diagnostics' own time taken out: forward,
backward, optimiser step, data loading, logging and validation are in it. The step time
:math:`\hat t` used for planning is the mean gap, leaving out the first of each fit (warm-up, and
the first measurements). Planning starts once :data:`CALIBRATION_STEPS` such gaps are timed.

**Allowance.** With a budget :math:`b` (a fraction of training time, default
:data:`DEFAULT_BUDGET`) and a run of :math:`T` steps (``trainer.estimated_stepping_batches``), the
diagnostics may have spent, by step :math:`s`,

.. math::
    A(s) = b\,\hat t\,\sqrt{s\,T} \quad (s < T), \qquad A(s) = b\,\hat t\,s \quad (s \ge T),

seconds in all. At the end of the run :math:`A(T) = b\,\hat t\,T`, the same total as spending
:math:`b` uniformly, but the rate of spending :math:`dA/ds = \tfrac12 b\,\hat t\sqrt{T/s}` is
high early and falls as :math:`1/\sqrt{s}`: intervals grow like :math:`\sqrt{s}`. The paper's
claims (internal covariate shift, the loss landscape's smoothness) are about the early phase,
where the landscape changes fastest, so that is where the measurements go. When the run length is
unknown (an iterable dataset without ``max_steps``) the allowance is uniform, :math:`b\,\hat t\,s`.

**Turns.** Callbacks with a fixed ``every_n_steps`` measure at their own steps; their spending is
taken off the allowance first (what they spent, plus their mean cost per step projected ahead).
The ``"auto"`` callbacks share the rest and take turns by what they have spent: callback :math:`i`
is due at the first step :math:`s' \ge s_i + ` :data:`MIN_INTERVAL` (its last attempt
:math:`s_i`) where

.. math::
    A(s') - F(s') \ge C + \hat c_i + \sum_{j:\,C_j < C_i} \hat c_j ,

:math:`C` the spending of all the callbacks, :math:`F(s')` the fixed callbacks' and the hooks' projected
spending from now to :math:`s'`, :math:`\hat c_j` callback :math:`j`'s cost estimate and
:math:`C_j` its spending on measurements so far: the callbacks that spent less go first (one not due within
the run reserves nothing). In the long run the
``"auto"`` callbacks spend alike, so a cheap diagnostic measures more often than a costly one.

**The first measurement is paid for too.** Before a callback has measured, its cost estimate is
a priori: the passes one measurement needs (forward and backward passes, Hessian-vector products;
each callback's :meth:`~lightning_bn.callbacks.base.DiagnosticCallback.measurement_steps`, in
training steps) times :math:`\hat t`. No ``"auto"`` callback measures before the first plan (the
first :data:`CALIBRATION_STEPS` timed steps), and each measures for the first time at the first
step whose allowance covers that estimate, by the rule above. So a short run or a small budget is
not overrun by a first measurement it cannot afford (a measurement at step 0 would be the most
expensive of all: cold caches, first-call set-up); the price is that the first measurement comes
a few steps into training, and a costly diagnostic (the smoothness one, about 30 training steps)
may not measure at all in a short run with a small budget. A callback that never measured in a
fit says so once at its end (raise ``budget=`` or fix ``every_n_steps``).

**Failures.** Only successful measurements enter a callback's cost estimate :math:`\hat c_i` (the
mean of its successful measurements after the first, cold one; the first alone until there is a
second; the a-priori estimate before any). A failed attempt (a pass that raises on a fused
kernel, say) never sets the schedule: its seconds count as spent, the estimate is unchanged, and
the callback tries again on its next turn.

**Hooks.** Lightning calls every callback's hooks at every training step, measured or not
(about 3-4 µs each per callback on a CPU, before any work in them: 2% of a 2 ms step for three
callbacks, as much as a 1% budget). So between measurements the diagnostics' batch hooks sleep
(:class:`~lightning_bn.callbacks.budget.SharedBudget`): only the first diagnostic callback's
``on_train_batch_start`` runs; it times the step, plans, and wakes the others at the first step
one of them is due (:attr:`Ledger.wake`); the per-step hooks they do not use
(``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``,
``on_before_zero_grad``) are ``None`` on them, so Lightning never calls them. The time of the hooks that run, from the first one's
start to the end of the last one's (their bodies, and Lightning's dispatch of all but the
first), is booked at every step as spent, per callback (the stretch that ends in its hook), and
its mean over the steps without a measurement or a plan is projected ahead like a fixed
callback's spending (the one-off costs of a plan, e.g. the first call of a logger, are spent,
not projected). So ``budget/spent`` is what the diagnostics cost, not only their measurements.
What the ledger cannot time is Lightning's dispatch of the first hook, and the few
microseconds of that hook around its clock readings. A callback placed between two diagnostic
callbacks in the Trainer's list is timed with them when they are awake: keep the diagnostics
together.

Rank zero decides: the ledger's numbers are broadcast from it (``trainer.strategy.broadcast``)
whenever the schedule is planned, so every rank measures at the same steps. The ledger's state
is in every diagnostic callback's ``state_dict``, so a resumed run goes on spending the same
budget.

Plain Python; the clock is injectable (a test passes a fake one).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "CALIBRATION_STEPS",
    "DEFAULT_BUDGET",
    "MIN_INTERVAL",
    "Entry",
    "Ledger",
    "allowance",
    "ledger_for",
]

#: Default share of training time for all the diagnostics together (their measurements and their
#: hooks at every step): the three paper callbacks then cost about 1.04× the training time of a
#: run of a few thousand steps, below 1.05 with room for what the ledger cannot time.
DEFAULT_BUDGET = 0.04
#: Timed training steps (after the first of a fit) before the first plan.
CALIBRATION_STEPS = 3
#: The fewest steps between two measurements of one ``"auto"`` callback.
MIN_INTERVAL = 10
#: A step that is never reached: a callback that cannot be afforded again.
NEVER = 10**12


def allowance(step: float, step_time: float, budget: float, horizon: int | None) -> float:
    r"""Seconds the diagnostics may have spent by ``step``: :math:`b\,\hat t\sqrt{sT}` before the
    horizon :math:`T`, :math:`b\,\hat t\,s` after it or without one.

    Example:
        >>> allowance(100, step_time=1.0, budget=0.05, horizon=10_000)  # 0.05 × √(10⁶)
        50.0
        >>> allowance(10_000, 1.0, 0.05, 10_000), allowance(100, 1.0, 0.05, None)
        (500.0, 5.0)
    """
    if step <= 0:
        return 0.0
    if horizon is not None and step < horizon:
        return budget * step_time * math.sqrt(step * horizon)
    return budget * step_time * step


@dataclass
class Entry:
    """One callback's account in the ledger.

    Attributes:
        interval: its fixed ``every_n_steps``, or ``None`` for ``"auto"``.
        prior: the a-priori cost of one measurement, in training steps (its passes).
        spent: seconds of all its measurement attempts, failed ones included, and of its hooks.
        hooks: the part of ``spent`` in its hooks outside measurements (every step).
        first: seconds of its first successful measurement (``None`` before one).
        later_sum / later_n: sum and count of the successful ones after it.
        attempts / failures: counts.
        last_step: the step of its last attempt (``None`` before one).
        next_step: the step it is due at (``None``: not planned yet, no measurement).
    """

    interval: int | None = None
    prior: float = 1.0
    spent: float = 0.0
    hooks: float = 0.0
    first: float | None = None
    later_sum: float = 0.0
    later_n: int = 0
    attempts: int = 0
    failures: int = 0
    last_step: int | None = None
    next_step: int | None = None

    @property
    def cost(self) -> float:
        """The cost estimate :math:`\\hat c`: mean of the successes after the first, else the first,
        else 0 (no success yet)."""
        if self.later_n:
            return self.later_sum / self.later_n
        return self.first or 0.0

    def estimate(self, step_time: float) -> float:
        """Seconds one measurement is expected to take: :attr:`cost` once one succeeded, else
        :attr:`prior` training steps of ``step_time`` seconds."""
        return self.cost if self.first is not None else self.prior * step_time


@dataclass
class Ledger:
    """What all the diagnostic callbacks of one Trainer spent, and when each measures next.

    Attributes:
        budget: the share of training time for all of them together, in ``(0, 1]``.
        horizon: the run's length in steps, ``None`` if unknown.
        entries: one :class:`Entry` per callback (by its ``state_key``).
        train_seconds: :math:`W`, the training time booked (diagnostics' time taken out).
        steps: training steps booked.
    """

    budget: float = DEFAULT_BUDGET
    horizon: int | None = None
    entries: dict[str, Entry] = field(default_factory=dict)
    train_seconds: float = 0.0
    steps: int = 0
    est_seconds: float = 0.0
    est_steps: int = 0
    #: Plans made (each callback logs its schedule when it sees a new one).
    plans: int = 0
    #: Whether this fit has been planned.
    planned: bool = False
    _last_tick: tuple[int, float] | None = None
    _in_gap: float = 0.0
    _fit_gaps: int = 0
    #: The first step at which a callback whose hook sleeps is due (the leader wakes them).
    wake: int = 0
    #: Hook seconds and count of the steps without a measurement or a plan (the projected rate).
    quiet_hooks: float = 0.0
    quiet_steps: int = 0
    _mark: float = 0.0  # the end of the last booked stretch of hooks in this step
    _measured: float = 0.0  # measurement seconds booked since the mark
    _step_hooks: float = 0.0  # hook seconds booked in this step
    _busy: bool = False  # a measurement or a plan in this step

    # --- booking -----------------------------------------------------------------------------
    def register(self, key: str, interval: int | None, prior: float = 1.0) -> Entry:
        """The entry of the callback ``key`` (created if new; its interval and a-priori cost in
        training steps are set either way)."""
        entry = self.entries.setdefault(key, Entry())
        entry.interval, entry.prior = interval, prior
        return entry

    def start_fit(self, horizon: int | None) -> None:
        """A fit of ``horizon`` steps begins: its first gap (warm-up) is not used for planning."""
        self._last_tick, self._in_gap, self._fit_gaps = None, 0.0, 0
        self.horizon, self.planned = horizon, False

    def tick(self, step: int, now: float) -> None:
        """A training step begins (idempotent within a step): book the gap since the last one."""
        last = self._last_tick
        if last is not None and last[0] == step:
            return
        if last is not None:
            if not self._busy:  # one-off costs (a plan, logging it) are not projected ahead
                self.quiet_hooks += self._step_hooks
                self.quiet_steps += 1
            gap = max(0.0, now - last[1] - self._in_gap)
            self.train_seconds += gap
            self.steps += 1
            self._fit_gaps += 1
            if self._fit_gaps > 1:
                self.est_seconds += gap
                self.est_steps += 1
        self._last_tick, self._in_gap = (step, now), 0.0
        self._mark, self._measured, self._step_hooks, self._busy = now, 0.0, 0.0, False

    def book_hook(self, key: str, now: float, pending: float = 0.0) -> None:
        """The hook of ``key`` ends at ``now``: book the stretch since the last one ended (or the
        step's first hook began) as its spending, less the measurements booked in it and the
        ``pending`` seconds of one still open (booked when it ends)."""
        seconds = max(0.0, now - self._mark - self._measured - pending)
        self._mark, self._measured = now, 0.0
        entry = self.entries[key]
        entry.hooks += seconds
        entry.spent += seconds
        self._in_gap += seconds
        self._step_hooks += seconds

    def book(self, key: str, step: int, seconds: float, ok: bool) -> None:
        """Book one measurement attempt of ``key`` at ``step``; only a success is a cost sample."""
        entry = self.entries[key]
        entry.spent += seconds
        entry.attempts += 1
        entry.last_step = step
        self._in_gap += seconds
        self._measured += seconds
        self._busy = True
        if not ok:
            entry.failures += 1
        elif entry.first is None:
            entry.first = seconds
        else:
            entry.later_sum += seconds
            entry.later_n += 1

    # --- planning ----------------------------------------------------------------------------
    @property
    def step_time(self) -> float | None:
        """:math:`\\hat t` (``None`` until :data:`CALIBRATION_STEPS` steps are timed in a fit)."""
        if self._fit_gaps <= CALIBRATION_STEPS or not self.est_steps:
            return None
        return self.est_seconds / self.est_steps

    @property
    def spent(self) -> float:
        """Seconds spent by all the callbacks."""
        return sum(e.spent for e in self.entries.values())

    def spent_fraction(self, key: str | None = None) -> float:
        """Spent seconds (of ``key``, or of all) ÷ training seconds (``inf`` before any)."""
        spent = self.spent if key is None else self.entries[key].spent
        if self.train_seconds <= 0:
            return math.inf if spent > 0 else 0.0
        return spent / self.train_seconds

    def plan(self, step: int) -> None:
        """Set ``next_step`` of every ``"auto"`` entry from the ledger as it is at ``step``."""
        t = self.step_time
        if t is None:
            return
        self.plans, self.planned, self._busy = self.plans + 1, True, True
        # projected ahead: the fixed callbacks' measurements and the hooks of a quiet step
        rate = sum(e.estimate(t) / e.interval for e in self.entries.values() if e.interval)
        if self.quiet_steps:
            rate += self.quiet_hooks / self.quiet_steps
        auto = [(k, e) for k, e in self.entries.items() if e.interval is None]
        # turns by measurement spending (the hooks are mostly the first callback's, for all)
        order = sorted(range(len(auto)), key=lambda i: (auto[i][1].spent - auto[i][1].hooks, i))
        total, reserved = self.spent, 0.0
        for i in order:
            _, entry = auto[i]
            low = step if entry.last_step is None else entry.last_step + MIN_INTERVAL
            need = total + reserved + entry.estimate(t)
            entry.next_step = self._first_step(max(low, step), step, need, t, rate)
            if entry.next_step < (self.horizon or NEVER):  # one it cannot afford holds no one
                reserved += entry.estimate(t)

    def _first_step(self, low: int, now: int, need: float, t: float, rate: float) -> int:
        r"""The first step :math:`s \ge` ``low`` with :math:`h(s) = A(s) - r\,(s - \text{now})
        \ge` ``need`` (:data:`NEVER` if none). Before the horizon :math:`h` is concave (the steps
        where it reaches ``need`` are one interval: find its peak, then bisect the rising part);
        after it, linear."""

        def h(s: int) -> float:
            return allowance(s, t, self.budget, self.horizon) - rate * (s - now)

        horizon = self.horizon
        if horizon is not None and low < horizon:
            lo, hi = low, horizon - 1
            while hi - lo > 2:  # ternary search for the peak of the concave part
                m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
                lo, hi = (lo, m2) if h(m1) >= h(m2) else (m1, hi)
            peak = max(range(lo, hi + 1), key=h)
            if h(peak) >= need:
                if h(low) >= need:
                    return low
                lo, hi = low, peak
                while hi - lo > 1:  # h(lo) < need <= h(hi)
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if h(mid) >= need else (mid, hi)
                return hi
            low = horizon
        if h(low) >= need:
            return low
        slope = self.budget * t - rate
        if slope <= 0:
            return NEVER
        s = max(low, math.ceil((need - h(0)) / slope))
        while h(s) < need and s < NEVER:  # float rounding: a step or two
            s += 1
        return min(s, NEVER)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "train_seconds": self.train_seconds,
            "steps": self.steps,
            "est_seconds": self.est_seconds,
            "est_steps": self.est_steps,
            "quiet_hooks": self.quiet_hooks,
            "quiet_steps": self.quiet_steps,
            "entries": {k: asdict(e) for k, e in self.entries.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in (
            "train_seconds",
            "steps",
            "est_seconds",
            "est_steps",
            "quiet_hooks",
            "quiet_steps",
        ):
            setattr(self, name, type(getattr(self, name))(state.get(name, 0)))
        for key, saved in state.get("entries", {}).items():
            entry = self.entries.get(key)
            if entry is None:  # a callback not in this Trainer any more
                continue
            interval, prior = entry.interval, entry.prior  # the current settings win
            for name, value in saved.items():
                setattr(entry, name, value)
            entry.interval, entry.prior = interval, prior

    def snapshot(self) -> dict[str, Any]:
        """What rank zero broadcasts: the state plus the horizon and the per-fit step counters."""
        return {**self.state_dict(), "horizon": self.horizon, "fit_gaps": self._fit_gaps}

    def adopt(self, snap: dict[str, Any]) -> None:
        """Take rank zero's numbers (after a broadcast)."""
        self.load_state_dict(snap)
        self.horizon, self._fit_gaps = snap["horizon"], snap["fit_gaps"]


_LEDGERS: weakref.WeakKeyDictionary[Any, Ledger] = weakref.WeakKeyDictionary()


def ledger_for(owner: Any) -> Ledger:
    """The ledger of ``owner`` (a Trainer), created on first use; it goes when the owner does."""
    ledger = _LEDGERS.get(owner)
    if ledger is None:
        ledger = _LEDGERS[owner] = Ledger()
    return ledger
