"""The callbacks' base logs to any logger; logger extras and the BatchPreparer protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_bn import ICSCallback, LipschitzCallback, NoiseInjectionCallback, SmoothnessCallback
from lightning_bn.callbacks import BatchPreparer
from lightning_bn.logging.extras import (
    LoggerExtras,
    MetricHistory,
    logger_extras,
    register_logger_extras,
    unregister_logger_extras,
)
from lightning_bn.logging.wandb import WANDB_EXTRAS, WandbExtras
from tests.support.models import Classifier, MemoryLogger, loader, mlp, trainer

ROOT = Path(__file__).resolve().parents[2]

# A CSVLogger-only run in a fresh interpreter: every logged key reaches the CSV at its step with
# the value the callback measured, and nothing imports wandb.
_CSV_ONLY = """
import csv, json, sys
from pathlib import Path
import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.logging.extras import logger_extras
from tests.support.models import Classifier, loader, mlp, trainer

callbacks = [ICSCallback(every_n_steps=2), LipschitzCallback(every_n_steps=2),
             SmoothnessCallback(every_n_steps=3, max_iters=3)]
csv_logger = CSVLogger(sys.argv[1], name="run")
pl.seed_everything(0, verbose=False)
trainer(callbacks, 5, logger=csv_logger, log_every_n_steps=1).fit(
    Classifier(mlp().double()), loader()
)
with open(Path(csv_logger.log_dir) / "metrics.csv") as fh:
    rows = list(csv.DictReader(fh))
csv_points = {(k, int(r["step"])): float(v) for r in rows for k, v in r.items()
              if k not in ("step", "epoch") and v != ""}
measured = {(k, s): v for cb in callbacks for k in cb.panel_history.keys()
            for s, v in zip(*cb.panel_history.series(k))}
print(json.dumps({
    "wandb_imported": "wandb" in sys.modules,
    "extras": [type(e).__name__ for e in logger_extras()],
    "measured": [[k, s, v] for (k, s), v in measured.items()],
    "csv": [[k, s, v] for (k, s), v in csv_points.items()],
}))
"""


def test_csv_logger_alone_gets_every_key_without_wandb(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", _CSV_ONLY, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["wandb_imported"] is False
    # importing one callback module registers the W&B and TensorBoard extras (each acts only
    # with its logger)
    assert out["extras"] == ["TensorBoardExtras", "WandbExtras"]
    measured = {(k, s): v for k, s, v in out["measured"]}
    csv_points = {(k, s): v for k, s, v in out["csv"]}
    keys = {k for k, _ in measured}
    assert {"lipschitz/loss_min", "smoothness/beta_eff", "smoothness/hessian_top_eig"} <= keys
    assert any(k.startswith("ics/") and k.endswith("/l2") for k in keys)
    assert {s for _, s in measured} == {0, 2, 3, 4}
    for point, value in measured.items():
        assert csv_points[point] == pytest.approx(value, rel=1e-12, abs=0.0), point


class RecordingExtras:
    """A LoggerExtras that records each call and what the logger held at that moment."""

    name = "recording"

    def __init__(self, memory: MemoryLogger) -> None:
        self.memory = memory
        self.setups: list[tuple[str, dict[str, Any]]] = []
        self.logs: list[tuple[list[str], int]] = []
        self.ends: list[dict[str, tuple[list[int], list[float]]]] = []

    def on_setup(
        self, trainer: pl.Trainer, callback_name: str, settings: Mapping[str, Any]
    ) -> None:
        self.setups.append((callback_name, dict(settings)))

    def on_log(self, trainer: pl.Trainer, keys: Iterable[str]) -> None:
        self.logs.append((list(keys), len(self.memory.calls)))

    def on_fit_end(self, trainer: pl.Trainer, history: MetricHistory) -> None:
        keys = history.keys()  # a list; the history is not iterable
        self.ends.append({k: history.series(k) for k in keys})


@pytest.fixture
def recording() -> Iterator[RecordingExtras]:
    extras = RecordingExtras(MemoryLogger())
    register_logger_extras(extras)
    try:
        yield extras
    finally:
        unregister_logger_extras(extras)
    assert extras not in logger_extras()


def test_registered_extras_see_setup_each_log_and_fit_end(recording: RecordingExtras) -> None:
    assert isinstance(recording, LoggerExtras)
    assert logger_extras()[-1] is recording and WANDB_EXTRAS in logger_extras()
    register_logger_extras(recording)  # a second registration is a no-op
    assert sum(e is recording for e in logger_extras()) == 1

    cb = LipschitzCallback(every_n_steps=2)
    memory = recording.memory
    pl.seed_everything(0, verbose=False)
    trainer([cb], 4, logger=memory).fit(Classifier(mlp().double()), loader())

    assert [name for name, _ in recording.setups] == ["LipschitzCallback"]
    assert recording.setups[0][1]["every_n_steps"] == 2
    # on_log comes right before the matching log_metrics call, with exactly its keys
    assert len(recording.logs) == 2 == len(cb.measured_steps)
    for keys, calls_before in recording.logs:
        step, logged = memory.calls[calls_before]
        assert sorted(keys) == sorted(logged) and step in cb.measured_steps
    # on_fit_end gets the whole history, equal to what the logger received
    (end,) = recording.ends
    for key, (steps, values) in end.items():
        assert [(s, memory.history[s][key]) for s in steps] == list(zip(steps, values, strict=True))


def test_failing_fit_end_extras_is_a_warning(recording: RecordingExtras) -> None:
    def boom(trainer: pl.Trainer, history: MetricHistory) -> None:
        raise RuntimeError("no charts today")

    recording.on_fit_end = boom  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="could not log its recording panels: no charts today"):
        trainer([LipschitzCallback(every_n_steps=2)], 2, logger=recording.memory).fit(
            Classifier(mlp().double()), loader()
        )


def test_register_rejects_non_extras() -> None:
    with pytest.raises(TypeError, match="`extras` to implement `LoggerExtras`"):
        register_logger_extras(object())  # type: ignore[arg-type]


def test_wandb_extras_are_logger_extras_and_history_alias() -> None:
    assert isinstance(WANDB_EXTRAS, WandbExtras) and isinstance(WANDB_EXTRAS, LoggerExtras)
    with pytest.warns(DeprecationWarning, match=r"PanelHistory.*0\.3\.0.*MetricHistory"):
        from lightning_bn.logging.wandb import PanelHistory  # type: ignore[attr-defined]
    assert PanelHistory is MetricHistory
    assert isinstance(ICSCallback().panel_history, MetricHistory)


class Preparer(Callback):
    """Implements BatchPreparer without subclassing it; records who called it and when."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def prepare_batch(self, trainer: pl.Trainer) -> None:
        self.calls.append(trainer.global_step)


class NotAPreparer(Callback):
    """Has no ``prepare_batch``: must be left alone."""


def test_batch_preparer_protocol() -> None:
    assert isinstance(Preparer(), BatchPreparer)
    assert isinstance(NoiseInjectionCallback(), BatchPreparer)
    assert not isinstance(NotAPreparer(), BatchPreparer)
    assert not isinstance(ICSCallback(), BatchPreparer)


def test_diagnostic_callbacks_prepare_other_callbacks_before_measuring() -> None:
    preparer = Preparer()
    ics = ICSCallback(every_n_steps=2)
    smooth = SmoothnessCallback(every_n_steps=3, max_iters=2)
    # the preparer comes last in the list: only the diagnostic callbacks can have called it
    callbacks = [ics, smooth, NotAPreparer(), preparer]
    trainer(callbacks, 5, logger=MemoryLogger()).fit(Classifier(mlp().double()), loader())
    assert ics.measured_steps == [0, 2, 4] and smooth.measured_steps == [0, 3]
    # once per diagnostic callback that measures at the step, before its measurement
    assert preparer.calls == [0, 0, 2, 3, 4]
