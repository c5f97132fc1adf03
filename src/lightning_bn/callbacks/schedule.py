r"""The self-calibrating measurement schedule of the diagnostic callbacks (``every_n_steps="auto"``).

A diagnostic callback with ``every_n_steps="auto"`` measures at the first training step it sees
(:math:`s_0`, step 0 of a fresh run) and times that measurement, :math:`c` seconds (the time spent
inside its own hooks at :math:`s_0`: ``on_train_batch_start``, plus ``on_train_batch_end`` for the
callbacks that measure after the optimiser step). It then times the next
:data:`CALIBRATION_STEPS` training steps, which it does not measure, from its
``on_train_batch_start`` to its ``on_train_batch_end`` (forward, backward, optimiser step and the
other callbacks' hooks in between; the data loading and Lightning's logging outside it are left
out, so the step time :math:`t` is a slight under-estimate and the share below an over-estimate),
and takes their median :math:`t` (the first step after :math:`s_0` may still carry warm-up; the
median discards one outlier). The interval is then the smallest rung :math:`n` of :func:`ladder`
(10, 20, 50, 100, 200, 500, 1000, 2000, 5000, ...) with

.. math::
    \text{share}(n) = \frac{c}{n\,t} \le \text{budget},

fixed for the rest of the run, and ``share(n)`` is logged as ``<prefix>/overhead``. The first
measurement is the most expensive one (cold caches, lazy initialisation, on CUDA the first kernels
of the probe's graph), so :math:`c` errs high and the interval errs long, never short. On CUDA the
device is synchronised at the edges of the timed regions only, and only during calibration.

Rank zero decides and broadcasts (``trainer.strategy.broadcast``), so every rank measures at the
same steps. The chosen interval goes to the loggers (a metric and a hyperparameter) and into the
callback's ``state_dict``, so a resumed run keeps it.

Plain Python; the clock is injectable (a test passes a fake one).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["CALIBRATION_STEPS", "LAST_RUNG", "Calibration", "choose_interval", "ladder"]

#: Training steps timed after the first measurement (their median is the step time).
CALIBRATION_STEPS = 3
#: The first rung: an interval below it would rarely be worth a calibration.
_FIRST_RUNG = 10
#: The last rung (10⁹ steps: a measurement that cannot be afforded at all).
LAST_RUNG = 10**9


def ladder() -> Iterator[int]:
    """The intervals ``"auto"`` chooses from: 10, 20, 50, 100, 200, 500, 1000, ... (1-2-5 × 10^k).

    Example:
        >>> import itertools
        >>> list(itertools.islice(ladder(), 9))
        [10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
    """
    decade = _FIRST_RUNG
    while True:
        for factor in (1, 2, 5):
            yield factor * decade
        decade *= 10


def choose_interval(cost: float, step_time: float, budget: float) -> int:
    r"""The smallest rung :math:`n` of :func:`ladder` with :math:`c / (n\,t) \le \text{budget}`.

    Args:
        cost: seconds of one measurement, :math:`c \ge 0`.
        step_time: seconds of one training step, :math:`t`; when no finite positive share can
            be formed (a clock too coarse to see a step, with ``cost > 0``), the result is the
            last rung, :data:`LAST_RUNG` (in practice: never again).
        budget: the largest share of training time, in ``(0, 1]``.

    Returns:
        The interval, a rung of :func:`ladder`.

    Example:
        >>> choose_interval(cost=12.0, step_time=1.0, budget=0.03)  # 12 / 0.03 = 400 steps
        500
        >>> choose_interval(cost=0.2, step_time=1.0, budget=0.03)
        10
    """
    if cost <= 0:
        return _FIRST_RUNG
    needed = cost / (budget * step_time) if step_time > 0 else math.inf
    for n in ladder():
        if n >= needed or n >= LAST_RUNG:
            return n
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class Calibration:
    """Book-keeping of one calibration: the first measurement's cost, then the step times.

    Attributes:
        start_step: the measured step :math:`s_0`.
        cost: seconds spent in the callback's hooks at :math:`s_0`.
        step_times: seconds of the timed training steps after it.
        clock: the clock (``time.perf_counter`` unless a test injects one).
        sync: called right before each clock reading (``torch.cuda.synchronize`` on CUDA).
    """

    start_step: int
    clock: Callable[[], float] = time.perf_counter
    sync: Callable[[], None] | None = None
    cost: float = 0.0
    step_times: list[float] = field(default_factory=list)
    _t0: float | None = None

    def tick(self) -> float:
        """The clock, after the device has finished its queued work."""
        if self.sync is not None:
            self.sync()
        return self.clock()

    def start(self) -> None:
        """Open a timed region."""
        self._t0 = self.tick()

    def stop(self) -> float | None:
        """Close the timed region opened by :meth:`start`; its seconds (``None`` if none open)."""
        if self._t0 is None:
            return None
        elapsed = self.tick() - self._t0
        self._t0 = None
        return elapsed

    @property
    def done(self) -> bool:
        """Whether enough training steps are timed to decide."""
        return len(self.step_times) >= CALIBRATION_STEPS

    def step_time(self) -> float:
        """The median of the timed training steps."""
        return statistics.median(self.step_times)
