"""The self-calibrating schedule (``every_n_steps="auto"``) on a fake clock."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_bn import ICSCallback, LipschitzCallback, SmoothnessCallback
from lightning_bn.callbacks.base import DiagnosticCallback
from lightning_bn.callbacks.schedule import CALIBRATION_STEPS, LAST_RUNG, choose_interval, ladder
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
    """A diagnostic whose measurement takes ``cost`` seconds on the fake clock."""

    key_base = "costly"

    def __init__(self, clock: FakeClock, cost: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock, self.cost = clock, cost

    def _compute(self, trainer: pl.Trainer, record: StepRecord) -> dict[str, float]:
        self.clock.now += self.cost
        return {"costly/value": float(record.step)}


class CostlyAfter(Costly):
    measure_after_step = True


def _fit(callback: DiagnosticCallback, clock: FakeClock, steps: int, seconds: list[float]) -> Any:
    logger = MemoryLogger()
    t = trainer([callback, Tick(clock, seconds)], steps, logger=logger, log_every_n_steps=1)
    t.fit(Classifier(mlp(dropout=0.0).double()), loader(n=64, batch_size=4))  # 16 batches/epoch
    return logger


def test_ladder_and_choice() -> None:
    assert list(itertools.islice(ladder(), 12)) == [
        10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
    ]  # fmt: skip
    # the smallest n with cost / (n t) <= budget: n >= cost / (budget t)
    assert choose_interval(0.0, 1.0, 0.03) == 10
    assert choose_interval(0.3, 1.0, 0.03) == 10  # exactly on the rung
    assert choose_interval(0.31, 1.0, 0.03) == 20
    assert choose_interval(12.6, 1.0, 0.03) == 500  # 420 steps needed
    assert choose_interval(35.6, 2.0, 0.03) == 1000  # 593
    assert choose_interval(35.6, 2.0, 0.1) == 200  # 178
    assert choose_interval(1.0, 0.0, 0.03) == LAST_RUNG == 10**9  # a step too short to see
    assert choose_interval(1e300, 1e-300, 0.03) == LAST_RUNG
    assert choose_interval(0.0, 0.0, 0.03) == 10


@pytest.mark.parametrize("cls", [Costly, CostlyAfter])
@pytest.mark.parametrize(
    ("cost", "seconds", "expected"),
    [
        (0.2, [1.0], 10),  # 0.2 / (10 × 1) = 2% <= 3%
        (1.0, [1.0], 50),  # needs 33.3 steps
        # warm-up: the first timed step is slow, the median of the three ignores it
        (6.0, [1.0, 50.0, 2.0, 2.0], 100),  # 6 / (0.03 × 2) = 100
    ],
)
def test_interval_from_fake_clock(
    cls: type[Costly], cost: float, seconds: list[float], expected: int
) -> None:
    clock = FakeClock()
    callback = cls(clock, cost)
    callback.clock = clock
    assert callback.every_n_steps is None
    logger = _fit(callback, clock, 2 * expected + 5, seconds)
    assert callback.every_n_steps == expected
    assert callback.measured_steps == [0, expected, 2 * expected]
    timed = [seconds[min(i, len(seconds) - 1)] for i in range(1, 1 + CALIBRATION_STEPS)]
    step_time = sorted(timed)[len(timed) // 2]
    assert callback.overhead == pytest.approx(cost / (expected * step_time))
    # logged once, at the step where the calibration ended (after 1 + 3 optimiser steps)
    decided = {k: v for step, m in logger.calls for k, v in m.items() if k.startswith("costly/e")}
    assert decided == {"costly/every_n_steps": expected}
    (step,) = [s for s, m in logger.calls if "costly/overhead" in m]
    assert step == 1 + CALIBRATION_STEPS
    assert callback.state_dict()["every_n_steps"] == expected


def test_int_schedule_unchanged() -> None:
    clock = FakeClock()
    callback = Costly(clock, cost=1000.0, every_n_steps=3)
    callback.clock = clock
    logger = _fit(callback, clock, 10, [1.0])
    assert callback.measured_steps == [0, 3, 6, 9]
    assert callback.every_n_steps == 3 and callback.overhead is None
    assert not any("costly/overhead" in m for _, m in logger.calls)


def test_resume_keeps_the_interval() -> None:
    clock = FakeClock()
    first = Costly(clock, cost=1.0)
    first.clock = clock
    _fit(first, clock, 8, [1.0])
    assert first.every_n_steps == 50
    state = first.state_dict()
    # a resumed run whose clock would now choose 10: the saved interval wins, no new calibration
    resumed = Costly(clock, cost=0.0)
    resumed.clock = clock
    resumed.load_state_dict(state)
    assert (resumed.every_n_steps, resumed.overhead) == (50, first.overhead)
    resumed.measured_steps = []
    _fit(resumed, clock, 101, [1.0])
    assert resumed.measured_steps == [0, 50, 100]
    # an int given to the constructor wins over a saved interval
    fixed = Costly(clock, cost=0.0, every_n_steps=7)
    fixed.load_state_dict(state)
    assert fixed.every_n_steps == 7


def test_resume_from_a_checkpoint(tmp_path: Path) -> None:
    clock = FakeClock()
    callback = LipschitzCallback()
    callback.clock = clock  # a measurement takes no time on this clock: 10 steps
    t = trainer([callback, Tick(clock, [1.0])], 6, default_root_dir=tmp_path)
    t.fit(Classifier(mlp(dropout=0.0).double()), loader(n=64, batch_size=4))
    assert callback.every_n_steps == 10
    t.save_checkpoint(tmp_path / "a.ckpt")
    resumed = LipschitzCallback()
    t2 = trainer([resumed, Tick(clock, [1.0])], 25, default_root_dir=tmp_path)
    t2.fit(
        Classifier(mlp(dropout=0.0).double()),
        loader(n=64, batch_size=4),
        ckpt_path=tmp_path / "a.ckpt",
    )
    assert resumed.every_n_steps == 10
    assert resumed.measured_steps == [0, 10, 20]


@pytest.mark.parametrize("cls", [ICSCallback, LipschitzCallback, SmoothnessCallback])
def test_defaults_are_auto_and_logged_in_the_config(cls: type[DiagnosticCallback]) -> None:
    callback = cls()
    assert (callback.schedule, callback.every_n_steps, callback.budget) == ("auto", None, 0.03)
    assert callback._settings()["every_n_steps"] == "auto"
    clock = FakeClock()
    callback.clock = clock
    params: dict[str, Any] = {}

    class Hparams(MemoryLogger):
        def log_hyperparams(self, p: Any, *args: Any, **kwargs: Any) -> None:
            params.update(p)

    logger = Hparams()
    t = trainer([callback, Tick(clock, [1.0])], 5, logger=logger)
    t.fit(Classifier(mlp(dropout=0.0).double()), loader(n=64, batch_size=4))
    prefix = callback.key_prefix
    assert params[f"{prefix}/every_n_steps"] == 10  # no measured cost on this clock
    assert logger.history[4][f"{prefix}/every_n_steps"] == 10
    assert logger.history[4][f"{prefix}/overhead"] == 0.0


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
    # rank 1's own clock would pick 500; rank 0 decides 10 for both
    assert [r["every_n_steps"] for r in ranks] == [10, 10]
    assert [r["measured_steps"] for r in ranks] == [[0, 10], [0, 10]]
    assert ranks[0]["overhead"] == ranks[1]["overhead"]
    assert torch.isfinite(torch.tensor(ranks[0]["overhead"]))
