"""The real diagnostic callbacks with a real (offline) WandbLogger, read back from run-<id>.wandb."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_bn import ICSCallback, LipschitzCallback, NoiseInjectionCallback, SmoothnessCallback
from lightning_bn.logging.wandb import STEP_METRIC
from tests.logging.test_wandb_panels import _isolate_wandb
from tests.support.models import Classifier, MemoryLogger, loader, mlp, trainer
from tests.support.wandb_offline import OfflineRun, find_run_file, wait_for_finished_run

STEPS = 6


@dataclass
class Fitted:
    run: OfflineRun
    memory: MemoryLogger
    csv_rows: list[dict[str, str]]
    run_file: Path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fitted]:
    root = tmp_path_factory.mktemp("wandb_callbacks")
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, root)
        if wandb.run is not None:
            wandb.finish()
        memory = MemoryLogger()
        csv_logger = CSVLogger(root / "csv", name="run")
        callbacks = [
            ICSCallback(every_n_steps=2),
            LipschitzCallback(every_n_steps=2),
            SmoothnessCallback(every_n_steps=3, max_iters=5),
            NoiseInjectionCallback(log_every_n_steps=2),
        ]
        loggers = [
            WandbLogger(save_dir=root / "save", offline=True, project="lbn"),
            csv_logger,
            memory,
        ]
        pl.seed_everything(0, verbose=False)
        t = trainer(callbacks, STEPS, logger=loggers, log_every_n_steps=1)
        t.fit(Classifier(mlp().double()), loader())
        wandb.finish()
        run = wait_for_finished_run(root / "save")
        with open(Path(csv_logger.log_dir) / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        yield Fitted(run=run, memory=memory, csv_rows=rows, run_file=find_run_file(root / "save"))


def _diagnostic_keys(fitted: Fitted) -> set[str]:
    prefixes = ("ics/", "lipschitz/", "smoothness/", "noise/")
    return {k for vals in fitted.memory.history.values() for k in vals if k.startswith(prefixes)}


def test_every_key_reaches_wandb_history_at_its_step(fitted: Fitted) -> None:
    keys = _diagnostic_keys(fitted)
    assert any(k.startswith("ics/net.4/") for k in keys)
    assert "lipschitz/net.1/thm41_ratio" in keys and "smoothness/hessian_top_eig" in keys
    assert any(k.startswith("noise/net.1/") for k in keys)
    for key in keys:
        expected = sorted((s, v[key]) for s, v in fitted.memory.history.items() if key in v)
        got = sorted(fitted.run.values(key))
        assert got == expected, key  # JSON keeps a float64 exactly


def test_csv_logger_gets_every_key_too(fitted: Fitted) -> None:
    for key in _diagnostic_keys(fitted):
        expected = {s for s, v in fitted.memory.history.items() if key in v}
        assert {int(r["step"]) for r in fitted.csv_rows if r.get(key)} == expected, key


def test_schedule(fitted: Fitted) -> None:
    ics_steps = sorted(s for s, v in fitted.memory.history.items() if "ics/net.0/l2" in v)
    smooth_steps = sorted(s for s, v in fitted.memory.history.items() if "smoothness/beta_eff" in v)
    assert ics_steps == [0, 2, 4] and smooth_steps == [0, 3]


def test_summaries_and_config(fitted: Fitted) -> None:
    def summary_of(key: str) -> set[str]:
        records = [m for m in fitted.run.metrics if m.name == key.replace(".", "\\.")]
        assert records, key
        assert records[-1].step_metric == STEP_METRIC
        return records[-1].summary

    assert summary_of("ics/net.4/l2") == {"max"}
    assert summary_of("ics/net.4/cos") == {"min"}
    assert summary_of("smoothness/beta_eff") == {"max"}
    assert summary_of("lipschitz/net.1/thm41_ratio") == {"max"}
    values = [v for _, v in fitted.run.values("ics/net.8/l2")]
    assert fitted.run.summary["ics/net.8/l2"] == {"max": max(values)}
    config = fitted.run.config
    assert config["ICSCallback"]["every_n_steps"] == 2
    assert config["SmoothnessCallback"]["power_iters"] == 5
    assert config["LipschitzCallback"]["relative_to_lr"] is True


def test_paper_panels(fitted: Fitted) -> None:
    visualize = fitted.run.config["_wandb"]["visualize"]
    for key in (
        "panels/loss_range",
        "panels/grad_predictiveness",
        "panels/beta_smoothness",
        "panels/ics_l2",
        "panels/ics_cos",
        "panels/thm41_ratio",
    ):
        assert visualize[key]["panel_config"]["panelDefId"] == "wandb/lineseries/v0", key
        rows = [r for r in fitted.run.history if f"{key}_table" in r]
        assert len(rows) == 1, key


def test_no_logger_warning_names_callback(tmp_path: Any) -> None:
    with pytest.warns(UserWarning, match="LipschitzCallback: the trainer has no logger"):
        trainer([LipschitzCallback()], 1).fit(Classifier(mlp().double()), loader())
