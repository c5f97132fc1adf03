"""The shared budget: the ledger's schedule, on a fake clock and against brute-force scans."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_bn import ICSCallback, LipschitzCallback, SmoothnessCallback
from lightning_bn.callbacks.base import DiagnosticCallback
from lightning_bn.callbacks.schedule import MIN_INTERVAL, NEVER, Ledger, allowance
from lightning_bn.errors import DiagnosticWarning
from lightning_bn.probe import StepRecord
from tests.support.models import Classifier, MemoryLogger, loader, mlp, trainer

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tick(pl.Callback):
    """Each training step takes ``seconds[i]`` on the fake clock (the last value repeats)."""

    def __init__(self, clock: FakeClock, seconds: list[float]) -> None:
        self.clock, self.seconds, self.calls = clock, seconds, 0

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.clock.now += self.seconds[min(self.calls, len(self.seconds) - 1)]
        self.calls += 1


class Costly(DiagnosticCallback):
    """A diagnostic whose measurement takes ``cost`` seconds on the fake clock (its clock), and
    ``prior`` training steps a priori."""

    key_base = "costly"

    def __init__(self, clock: FakeClock, cost: float, prior: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock, self.cost, self.prior = clock, cost, prior

    def measurement_steps(self) -> float:
        return self.prior

    def _compute(self, trainer: pl.Trainer, record: StepRecord) -> dict[str, float]:
        self.clock.now += self.cost
        return {"costly/value": float(record.step)}


class CostlyAfter(Costly):
    measure_after_step = True


def _fit(
    callback: DiagnosticCallback | list[DiagnosticCallback],
    clock: FakeClock,
    steps: int,
    seconds: list[float],
    **kwargs: Any,
) -> Any:
    logger = MemoryLogger()
    callbacks = callback if isinstance(callback, list) else [callback]
    t = trainer(
        [*callbacks, Tick(clock, seconds)], steps, logger=logger, log_every_n_steps=1, **kwargs
    )
    t.fit(Classifier(mlp(dropout=0.0).double()), loader(n=64, batch_size=4))  # 16 batches/epoch
    return logger


def _scan(h: Any, low: int, need: float, limit: int = 200_000) -> int:
    return next((s for s in range(low, limit) if h(s) >= need), NEVER)


def _excess(t: float, budget: float, horizon: int | None, rate: float, now: int) -> Any:
    """h(s) = A(s) - r (s - now), written out here."""
    return lambda s: allowance(s, t, budget, horizon) - rate * (s - now)


def test_first_step_against_a_scan() -> None:
    """The planned step is the first one whose allowance covers the need (brute-force scan)."""
    rng = random.Random(0)
    for _ in range(300):
        horizon = rng.choice([None, 50, 1000, 20_000])
        budget, t = rng.choice([0.01, 0.05, 0.2]), rng.uniform(0.1, 2.0)
        rate = rng.choice([0.0, 0.0, rng.uniform(0, 0.3 * budget * t)])
        now = rng.randrange(0, 300)
        low, need = now + rng.randrange(0, 20), rng.uniform(0, 40 * t)
        ledger = Ledger(budget=budget, horizon=horizon)
        h = _excess(t, budget, horizon, rate, now)

        got = ledger._first_step(low, now, need, t, rate)
        expected = _scan(h, low, need)
        if expected == NEVER:  # beyond the scan: the answer must still be the first crossing
            assert got > 200_000 - 1 and (got == NEVER or h(got) >= need > h(got - 1))
        else:
            assert got == expected, (horizon, budget, t, rate, now, low, need)


def test_allowance_front_loads_the_same_total() -> None:
    # A(s) = b t sqrt(s T): at T the uniform total b t T, and half of it by T / 4
    assert allowance(2000, 0.5, 0.04, 2000) == pytest.approx(0.04 * 0.5 * 2000)
    assert allowance(500, 0.5, 0.04, 2000) == pytest.approx(0.5 * allowance(2000, 0.5, 0.04, 2000))
    assert allowance(3000, 0.5, 0.04, 2000) == pytest.approx(0.04 * 0.5 * 3000)
    assert allowance(0, 0.5, 0.04, 2000) == 0.0


def _expected_steps(cost: float, budget: float, horizon: int, first_plan: int = 4) -> list[int]:
    """One ``"auto"`` callback, 1 s steps, its a-priori cost one step (1 s) = its real cost:
    nothing before the first plan; after k measurements the next is the first step
    s >= last + MIN_INTERVAL with budget * sqrt(s * T) >= (k + 1) * cost (closed form)."""
    steps: list[int] = []
    while True:
        k = len(steps)
        s = math.ceil(((k + 1) * cost / budget) ** 2 / horizon - 1e-9)
        low = steps[-1] + MIN_INTERVAL if steps else first_plan
        s = max(s, low)
        if s >= horizon:
            return steps
        steps.append(s)


@pytest.mark.parametrize("cls", [Costly, CostlyAfter])
def test_one_callback_follows_the_front_loaded_rule(cls: type[Costly]) -> None:
    clock = FakeClock()
    callback = cls(clock, 1.0, budget=0.05)
    callback.clock = clock
    logger = _fit(callback, clock, 400, [1.0])
    expected = _expected_steps(1.0, 0.05, 400)
    assert callback.measured_steps == expected
    gaps = [b - a for a, b in itertools.pairwise(expected)]
    assert gaps[0] == MIN_INTERVAL and gaps == sorted(gaps) and gaps[-1] > 2 * MIN_INTERVAL
    # the ledger: 1 s per measurement, 1 s per training step (the measurements taken out)
    ledger = callback.ledger
    assert ledger.entries[callback.state_key].spent == pytest.approx(len(expected))
    assert ledger.step_time == pytest.approx(1.0)
    # logged at every plan: the first at step 1 + 3 timed steps (nothing spent: no measurement
    # before it), then after the first measurement (1 s over 4 training seconds)
    spent = [(s, m["budget/spent"]) for s, m in logger.calls if "budget/spent" in m]
    assert spent[0] == (4, 0.0) and spent[1][1] == pytest.approx(1.0 / 4)
    # early above the budget (front-loaded), never above the allowance plus one measurement
    assert all(f <= (allowance(s, 1.0, 0.05, 400) + 1.0) / s for s, f in spent)
    assert 0.04 <= ledger.spent_fraction() <= 0.05
    assert all(
        m["costly/spent"] == m["budget/spent"] for _, m in logger.calls if "costly/spent" in m
    )


def test_a_larger_budget_measures_more() -> None:
    counts, spent = {}, {}
    for budget in (0.01, 0.05, 0.2):
        clock = FakeClock()
        callbacks = [Costly(clock, 2.0, budget=budget, name="a"), Costly(clock, 0.5, name="b")]
        for cb in callbacks:
            cb.clock = clock
        _fit(callbacks, clock, 600, [1.0])
        counts[budget] = [len(cb.measured_steps) for cb in callbacks]
        spent[budget] = callbacks[0].ledger.spent_fraction()
        a, b = (callbacks[0].ledger.entries[cb.state_key].spent for cb in callbacks)
        if budget == 0.05:  # they take turns: each spent about half, the cheap one more often
            assert abs(a - b) <= 2.0 and counts[budget][1] > 2 * counts[budget][0]
        if budget == 0.2:  # the cheap one is held by MIN_INTERVAL: the other spends the rest
            assert callbacks[1].measured_steps == list(range(4, 600, MIN_INTERVAL))
            assert a > 2 * b
    assert counts[0.01] < counts[0.05] < counts[0.2]
    assert [sum(c) for c in counts.values()] == sorted(sum(c) for c in counts.values())
    assert spent[0.01] < spent[0.05] <= 0.05 * 1.05 and spent[0.2] <= 0.2 * 1.05


def test_fixed_interval_kept_and_left_to_it() -> None:
    clock = FakeClock()
    alone = Costly(clock, 1.0, budget=0.1, name="auto")
    alone.clock = clock
    _fit(alone, clock, 300, [1.0])
    clock = FakeClock()
    fixed = Costly(clock, 1.0, every_n_steps=25, name="fixed")
    shared = Costly(clock, 1.0, budget=0.1, name="auto")
    for cb in (fixed, shared):
        cb.clock = clock
    _fit([fixed, shared], clock, 300, [1.0])
    assert fixed.measured_steps == list(range(0, 300, 25))
    assert fixed.every_n_steps == 25 and fixed.overhead is None
    # the fixed callback's 12 s come off the 0.1 × 300 s: the other measures less
    assert len(shared.measured_steps) < len(alone.measured_steps)
    assert shared.ledger.spent_fraction() <= 0.1 * 1.05


def test_a_failed_measurement_never_sets_the_cost() -> None:
    clock = FakeClock()
    callback = Costly(clock, 5.0, budget=0.05)
    callback._compute = _fail_first(callback, at_once=False)  # type: ignore[method-assign]
    callback.clock = clock
    with pytest.warns(DiagnosticWarning, match="fused kernel"):
        _fit(callback, clock, 200, [1.0])
    entry = callback.ledger.entries[callback.state_key]
    assert (entry.failures, entry.first) == (1, 5.0)  # the first success, not the failure
    assert entry.spent == pytest.approx(5.0 * entry.attempts)
    # the first attempt at the first plan (its a-priori 1 s fits: 0.05 sqrt(4 × 200) >= 1); it
    # fails after 5 s, the estimate stays 1 s, so the next is due when the allowance covers
    # 5 + 1 s: 0.05 sqrt(200 s) >= 6, s = 72
    assert entry.attempts == 1 + len(callback.measured_steps)
    assert callback.measured_steps[0] == 72
    # a cheap failure (raising at once) does not make the next plan optimistic either
    clock = FakeClock()
    quick = Costly(clock, 5.0, budget=0.05)
    quick.clock = clock
    quick._compute = _fail_first(quick, at_once=True)  # type: ignore[method-assign]
    with pytest.warns(DiagnosticWarning):
        _fit(quick, clock, 200, [1.0])
    entry = quick.ledger.entries[quick.state_key]
    assert (
        entry.failures == 1
        and entry.first == 5.0
        and entry.spent == pytest.approx(5.0 * (entry.attempts - 1))
    )


def _fail_first(callback: Costly, at_once: bool) -> Any:
    """The callback's first measurement raises: at once, or after taking its time."""
    original = Costly._compute
    calls = []

    def compute(trainer: pl.Trainer, record: StepRecord) -> dict[str, float]:
        calls.append(record.step)
        if len(calls) == 1:
            if not at_once:
                callback.clock.now += callback.cost  # type: ignore[attr-defined]
            raise RuntimeError("fused kernel has no double backward")
        return original(callback, trainer, record)

    return compute


class SlowHook(Costly):
    """Its ``on_train_batch_start`` takes ``hook`` seconds besides any measurement."""

    def __init__(self, clock: FakeClock, hook: float, **kwargs: Any) -> None:
        super().__init__(clock, 1.0, **kwargs)
        self.hook, self.calls = hook, 0

    def _start_step(self, trainer: pl.Trainer, now: float) -> None:
        super()._start_step(trainer, now)  # the leader read the clock: the step began
        self.clock.now += self.hook  # type: ignore[attr-defined]
        self.calls += 1


def test_the_first_measurement_waits_for_its_a_priori_cost() -> None:
    clock = FakeClock()
    cheap = Costly(clock, 1.0, prior=1.0, budget=0.05, name="cheap")
    costly = Costly(clock, 3.0, prior=3.0, name="costly")
    _fit([cheap, costly], clock, 400, [1.0])
    # planned at step 4 (1 s steps, nothing measured): the one registered first goes first,
    # the other's need includes its reserved estimate; brute-force scans of the allowance
    h = _excess(1.0, 0.05, 400, 0.0, 4)
    assert cheap.measured_steps[0] == _scan(h, 4, 1.0) == 4
    assert costly.measured_steps[0] == _scan(h, 4, 1.0 + 3.0) == 16
    # never before the first plan, whatever the budget
    clock = FakeClock()
    free = Costly(clock, 0.0, prior=0.0, budget=1.0)
    _fit(free, clock, 30, [1.0])
    assert free.measured_steps == [4, 14, 24]


def test_a_small_budget_is_not_overrun() -> None:
    clock = FakeClock()
    # 1% of 600 s is 6 s: two 2 s measurements fit, a 30-step one never does
    cheap = Costly(clock, 2.0, prior=2.0, budget=0.01, name="cheap")
    dear = Costly(clock, 30.0, prior=30.0, name="dear")
    with pytest.warns(DiagnosticWarning, match=r"Costly never measured.*about 30 training steps"):
        _fit([cheap, dear], clock, 600, [1.0])
    ledger = cheap.ledger
    # the dear one, never due within the run, does not hold the cheap one back: 0.01 sqrt(600 s)
    # >= 2 and >= 4
    assert dear.measured_steps == [] and cheap.measured_steps == [67, 267]
    assert ledger.spent_fraction() <= 0.01


def test_hook_time_is_booked_at_every_step() -> None:
    counts = {}
    for seconds in (0.0, 0.01, 0.025):
        clock = FakeClock()
        a = SlowHook(clock, seconds, budget=0.05, name="a")
        b = SlowHook(clock, seconds, name="b")
        _fit([a, b], clock, 200, [1.0])
        ledger = a.ledger
        ea, eb = (ledger.entries[cb.state_key] for cb in (a, b))
        # the first diagnostic times every step; the other's hook sleeps between its turns
        assert a.calls == 200 and 2 * len(b.measured_steps) <= b.calls < 100
        assert ea.hooks == pytest.approx(200 * seconds)
        assert eb.hooks == pytest.approx(b.calls * seconds)
        measured = len(a.measured_steps) + len(b.measured_steps)
        assert ledger.spent == pytest.approx(measured + (200 + b.calls) * seconds)
        # the training time has the hooks taken out: 199 gaps of 1 s
        assert (ledger.steps, ledger.train_seconds) == (199, pytest.approx(199.0))
        assert ledger.spent_fraction() <= 0.05 * 1.05
        counts[seconds] = measured
    # the hooks' spending per step is projected ahead: less is left for measurements
    assert counts[0.0] > counts[0.01] > counts[0.025]


class Watching(Costly):
    """A diagnostic that also uses a per-step hook the base class leaves undispatched."""

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = getattr(self, "seen", 0) + 1


def test_unused_per_step_hooks_are_not_dispatched() -> None:
    hooks = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
    assert all(getattr(DiagnosticCallback, h) is None for h in (*hooks, "on_before_zero_grad"))
    clock = FakeClock()
    watching = Watching(clock, 0.0, every_n_steps=5)
    _fit(watching, clock, 7, [1.0])
    assert watching.seen == 7  # a subclass defines them as usual


def test_a_hook_replaced_on_the_instance_stays_awake() -> None:
    steps = {}
    for wrap in (False, True):
        clock = FakeClock()
        lead = Costly(clock, 0.5, budget=0.05, name="lead")
        timed = Costly(clock, 0.5, name="timed")
        seen: list[int] = []

        def wrapper(
            trainer: pl.Trainer,
            *args: Any,
            _seen: list[int] = seen,
            _hook: Any = timed.on_train_batch_start,
        ) -> None:  # a timer, as a benchmark's
            _seen.append(trainer.global_step)
            _hook(trainer, *args)

        if wrap:
            timed.on_train_batch_start = wrapper  # type: ignore[method-assign]
        _fit([lead, timed], clock, 200, [1.0])
        steps[wrap] = (lead.measured_steps, timed.measured_steps)
        if wrap:
            assert seen == list(range(200)) and timed.on_train_batch_start is wrapper
    assert steps[True] == steps[False] and steps[True][1]  # the same schedule, awake or asleep


def test_budgets_must_agree() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match=r"share one `budget`, but got 0.01 .*, 0.2 "):
        _fit(
            [Costly(clock, 0, budget=0.01, name="a"), Costly(clock, 0, budget=0.2, name="b")],
            clock,
            2,
            [1.0],
        )


def test_resume_goes_on_spending_the_same_budget() -> None:
    clock = FakeClock()
    first = Costly(clock, 1.0, budget=0.05)
    first.clock = clock
    _fit(first, clock, 200, [1.0])
    state = first.state_dict()
    assert state["ledger"]["entries"][first.state_key]["spent"] == len(first.measured_steps)
    # a run of 400 steps from the same state: what the first 200 steps spent is still booked
    resumed = Costly(clock, 1.0)
    resumed.clock = clock
    resumed.load_state_dict(state)
    resumed.measured_steps = []
    t = trainer([resumed, Tick(clock, [1.0])], 400, logger=MemoryLogger())
    t.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = 200
    t.fit(Classifier(mlp(dropout=0.0).double()), loader(n=64, batch_size=4))
    ledger = resumed.ledger
    assert ledger.entries[resumed.state_key].spent == pytest.approx(
        len(first.measured_steps) + len(resumed.measured_steps)
    )
    assert ledger.train_seconds > 200


def test_resume_from_a_checkpoint(tmp_path: Path) -> None:
    clock = FakeClock()
    # a measurement takes no time on this clock: every MIN_INTERVAL, from the first plan on (its
    # a-priori 1 + 13 / 3 steps fit the whole budget by then: sqrt(4 × 16) >= 5.3)
    callback = LipschitzCallback(budget=1.0)
    callback.clock = clock
    t = trainer([callback, Tick(clock, [1.0])], 16, default_root_dir=tmp_path)
    t.fit(Classifier(mlp(dropout=0.0).double()), loader(n=64, batch_size=4))
    assert callback.measured_steps == [4, 14]
    t.save_checkpoint(tmp_path / "a.ckpt")
    resumed = LipschitzCallback(budget=1.0)
    resumed.clock = clock
    t2 = trainer([resumed, Tick(clock, [1.0])], 35, default_root_dir=tmp_path)
    t2.fit(
        Classifier(mlp(dropout=0.0).double()),
        loader(n=64, batch_size=4),
        ckpt_path=tmp_path / "a.ckpt",
    )
    entry = resumed.ledger.entries[resumed.state_key]
    assert entry.attempts == 2 + len(resumed.measured_steps) - 2
    assert resumed.measured_steps == [4, 14, 24, 34]


@pytest.mark.parametrize("cls", [ICSCallback, LipschitzCallback, SmoothnessCallback])
def test_defaults_are_auto_and_logged_in_the_config(cls: type[DiagnosticCallback]) -> None:
    callback = cls()
    assert (callback.schedule, callback.every_n_steps, callback.budget) == ("auto", None, None)
    assert callback._settings()["every_n_steps"] == "auto"
    clock = FakeClock()
    callback.clock = clock
    logger = MemoryLogger()
    t = trainer([callback, Tick(clock, [1.0])], 5, logger=logger)
    with pytest.warns(DiagnosticWarning, match="never measured in this fit.*Raise `budget="):
        t.fit(Classifier(mlp(dropout=0.0).double()), loader(n=64, batch_size=4))
    assert callback.ledger.budget == 0.04
    assert callback.measured_steps == []  # 5 steps of 4% do not pay for one measurement
    # planned at step 4: the first step whose allowance covers its a-priori cost (1 s steps)
    prior = callback.measurement_steps()
    expected = _scan(_excess(1.0, 0.04, 5, 0.0, 4), 4, prior)
    prefix = callback.key_prefix
    assert logger.history[4][f"{prefix}/every_n_steps"] == expected
    assert logger.history[4][f"{prefix}/overhead"] == pytest.approx(prior / expected)
    assert logger.history[4][f"{prefix}/spent"] == logger.history[4]["budget/spent"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": "often"}, "'auto' or a positive integer, but got 'often'"),
        ({"every_n_steps": 0}, "'auto' or a positive integer, but got 0"),
        ({"budget": 0.0}, r"`budget` to be in \(0, 1\], but got 0.0"),
        ({"budget": 1.5}, "`budget` to be a finite number in"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LipschitzCallback(**kwargs)


@pytest.mark.slow
def test_ddp_ranks_share_rank_zeros_interval(tmp_path: Path) -> None:
    # the sources of this checkout first (not whichever copy of the package is installed)
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "auto.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.ddp_run", "ddp", str(out), "--auto"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # rank 1's own ledger would not measure again; rank 0 decides step 14 for both
    assert [r["every_n_steps"] for r in ranks] == [10, 10]
    assert [r["measured_steps"] for r in ranks] == [[4, 14], [4, 14]]
    assert ranks[0]["overhead"] == ranks[1]["overhead"]
    assert ranks[0]["spent"] == ranks[1]["spent"]  # rank zero's ledger, broadcast
    assert torch.isfinite(torch.tensor(ranks[0]["overhead"]))


@pytest.mark.parametrize(
    ("kwargs", "products"),
    [
        ({}, 19),  # no basis: ten Lanczos steps, two products each but the last
        ({"max_iters": 7}, 7),  # capped
        ({"lanczos_basis": 5}, 5),  # a basis's worth
        ({"lanczos_basis": None, "max_iters": 12}, 12),
        ({"hessian": False}, -1),
    ],
)
def test_smoothness_a_priori_cost_counts_its_passes(kwargs: dict[str, Any], products: int) -> None:
    """The cost the schedule assumes before timing a measurement, in training steps: the gradient
    at W^t, one per step size (13 by default), two per Hessian-vector product (the eigenvalue's
    and one for gᵀHg)."""
    assert SmoothnessCallback(**kwargs).measurement_steps() == 1 + 13 + 2 * (products + 1)
