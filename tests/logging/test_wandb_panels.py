"""W&B set-up (`lightning_bn.logging.wandb`) against a real offline wandb run read back from disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import wandb
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks import PAPER_PANELS, PAPER_SUMMARIES
from lightning_bn.logging.extras import MetricHistory
from lightning_bn.logging.wandb import (
    STEP_METRIC,
    Panel,
    define_metrics,
    log_config,
    log_paper_panels,
    wandb_runs,
)
from tests.support.wandb_offline import (
    FIRST,
    LAST,
    MIDDLE,
    OfflineRun,
    WandbFileError,
    find_run_file,
    iter_chunks,
    iter_records,
    read_run,
    wait_for_finished_run,
)

LAYERS = ("model.0", "model.1")  # qualified module names: the dots matter to W&B
MEASURE_EVERY = 2
MAX_STEPS = 6
# One value per measurement, not monotone, so a max/min summary differs from the last value.
PROFILE = (0.5, 2.0, 1.0)


def _metric_keys() -> list[str]:
    keys = ["lipschitz/loss_min", "lipschitz/loss_max", "smoothness/grad_diff_min"]
    keys += ["smoothness/grad_diff_max", "smoothness/beta_eff"]
    keys += ["smoothness/hessian_top_eig", "smoothness/grad_curvature"]
    for layer in LAYERS:
        keys += [f"ics/{layer}/l2", f"ics/{layer}/cos", f"lipschitz/{layer}/thm41_ratio"]
        keys += [f"lipschitz/{layer}/act_grad_norm"]
    return keys


def _measurement(index: int) -> dict[str, float]:
    """Distinct, exactly representable values for the index-th measurement."""
    p = PROFILE[index]
    values = {
        "lipschitz/loss_min": p,
        "lipschitz/loss_max": p + 1.5,
        "smoothness/grad_diff_min": p / 4,
        "smoothness/grad_diff_max": p / 2,
        "smoothness/beta_eff": 3.0 * p,
        "smoothness/hessian_top_eig": 5.0 * p,
        "smoothness/grad_curvature": 2.5 * p,
    }
    for i, layer in enumerate(LAYERS):
        values[f"ics/{layer}/l2"] = p + i
        values[f"ics/{layer}/cos"] = 1.0 - p / 4 - i / 8
        values[f"lipschitz/{layer}/thm41_ratio"] = p / 8 + i / 16
        values[f"lipschitz/{layer}/act_grad_norm"] = p * 2 + i
    return values


def _schedule(step: int) -> bool:
    return step % MEASURE_EVERY == 0


SETTINGS: dict[str, Any] = {
    "every_n_steps": MEASURE_EVERY,
    "layers": LAYERS,
    "etas": [0.1, 0.5],
    "schedule": _schedule,
    "dtype": torch.float64,
    "threshold": torch.tensor(0.25),
}
EXPECTED_CONFIG = {
    "every_n_steps": MEASURE_EVERY,
    "layers": list(LAYERS),
    "etas": [0.1, 0.5],
    "schedule": "_schedule",
    "dtype": "torch.float64",
    "threshold": 0.25,
}
LARGE = list(range(25_000))  # a config record of ~150 KB: spans several 32 KiB blocks


class _TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
        return DataLoader(data, batch_size=8)


class _FakeDiagnostics(Callback):
    """Logs the diagnostic keys the way the real callbacks do and calls the W&B helpers."""

    def __init__(self) -> None:
        self.history = MetricHistory()
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.defined_at_setup: list[str] = []
        self.defined_again: list[list[str]] = []
        self.runs_at_setup: list[Any] = []
        self.panel_keys: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.runs_at_setup = wandb_runs(trainer)
        self.defined_at_setup = define_metrics(trainer, PAPER_SUMMARIES, keys=_metric_keys())
        log_config(trainer, "FakeDiagnostics", SETTINGS)
        log_config(trainer, "Large", {"values": LARGE})

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        if not _schedule(step):
            return
        metrics = _measurement(len(self.logged))
        # The callbacks may pass each call's keys: already defined, so nothing is added.
        self.defined_again.append(define_metrics(trainer, PAPER_SUMMARIES, keys=metrics))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history.add(step, metrics)
        self.logged.append((step, metrics))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.panel_keys = log_paper_panels(trainer, self.history)


@dataclass
class _Result:
    run: OfflineRun
    run_file: Path
    callback: _FakeDiagnostics


def _isolate_wandb(mp: pytest.MonkeyPatch, root: Path) -> None:
    mp.setenv("WANDB_MODE", "offline")  # WandbLogger(offline=True) sets it again, to "dryrun"
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_CONSOLE", "off")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        path = root / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        mp.setenv(var, str(path))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Result]:
    """One real fit with a WandbLogger (offline) and a CSVLogger, shared by the tests."""
    root = tmp_path_factory.mktemp("wandb_panels")
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, root)
        if wandb.run is not None:  # a run left open elsewhere would be reused by WandbLogger
            wandb.finish()
        callback = _FakeDiagnostics()
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=MAX_STEPS,
            logger=[
                WandbLogger(save_dir=root / "save", offline=True, project="lightning-bn-test"),
                CSVLogger(root / "csv"),
            ],
            callbacks=[callback],
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(_TinyModule())
        wandb.finish()
        run = wait_for_finished_run(root / "save")
        yield _Result(run=run, run_file=find_run_file(root / "save"), callback=callback)


def test_fit_measured_as_planned(fitted: _Result) -> None:
    steps = [step for step, _ in fitted.callback.logged]
    assert steps == list(range(MEASURE_EVERY, MAX_STEPS + 1, MEASURE_EVERY))
    assert len(fitted.callback.runs_at_setup) == 1


def test_every_logged_value_reaches_history_at_its_step(fitted: _Result) -> None:
    for step, metrics in fitted.callback.logged:
        rows = [
            r
            for r in fitted.run.history
            if r.get(STEP_METRIC) == step and metrics.keys() <= r.keys()
        ]
        assert len(rows) == 1, f"step {step}: {len(rows)} rows hold the measurement"
        assert {k: rows[0][k] for k in metrics} == metrics
    for key in _metric_keys():
        logged = [(s, m[key]) for s, m in fitted.callback.logged]
        assert fitted.run.values(key) == logged, key  # nothing missing, doubled or moved


def test_define_metric_records(fitted: _Result) -> None:
    keys = _metric_keys()
    assert sorted(fitted.callback.defined_at_setup) == sorted(keys)
    assert fitted.callback.defined_again == [[]] * len(fitted.callback.logged)
    assert fitted.run.metric(STEP_METRIC) is not None
    expected = {
        "lipschitz/loss_min": {"min"},
        "lipschitz/loss_max": {"max"},
        "smoothness/grad_diff_min": {"min"},
        "smoothness/grad_diff_max": {"max"},
        "smoothness/beta_eff": {"max"},
    }
    for layer in LAYERS:
        expected[f"ics/{layer}/l2"] = {"max"}
        expected[f"ics/{layer}/cos"] = {"min"}
        expected[f"lipschitz/{layer}/thm41_ratio"] = {"max"}
    for key, summary in expected.items():
        escaped = key.replace(".", "\\.")
        records = [m for m in fitted.run.metrics if m.name == escaped]
        assert len(records) == 1, f"{key}: {len(records)} define_metric records"
        assert records[0].summary == summary, key
        assert records[0].step_metric == STEP_METRIC, key
    # No glob definitions of ours: wandb only honours trailing `*`, so keys are expanded.
    assert {m.glob_name for m in fitted.run.metrics if m.glob_name} <= {"*"}  # WandbLogger's


def test_wandb_computed_the_defined_summaries(fitted: _Result) -> None:
    # End to end: wandb itself applied max/min to keys with dots in them.
    values = {key: [m[key] for _, m in fitted.callback.logged] for key in _metric_keys()}
    for layer in LAYERS:
        l2, cos = f"ics/{layer}/l2", f"ics/{layer}/cos"
        assert fitted.run.summary[l2] == {"max": max(values[l2])}
        assert fitted.run.summary[cos] == {"min": min(values[cos])}
        assert max(values[l2]) != values[l2][-1]  # the test can tell max from last
    assert fitted.run.summary["smoothness/beta_eff"] == {"max": max(values["smoothness/beta_eff"])}
    assert fitted.run.summary["lipschitz/loss_min"] == {"min": min(values["lipschitz/loss_min"])}


def test_config_holds_settings(fitted: _Result) -> None:
    assert fitted.run.config["FakeDiagnostics"] == EXPECTED_CONFIG
    assert fitted.run.config["Large"] == {"values": LARGE}


def _chart_table(result: _Result, key: str) -> dict[str, Any]:
    rows = [r for r in result.run.history if f"{key}_table" in r]
    assert len(rows) == 1, key
    table = rows[0][f"{key}_table"]
    assert table["_type"] == "table-file"
    assert rows[0][STEP_METRIC] == MAX_STEPS
    data: dict[str, Any] = json.loads(
        (result.run_file.parent / "files" / table["path"]).read_text()
    )
    return data


def test_panel_charts_logged(fitted: _Result) -> None:
    # the fake callback logs the paper's keys only: the HessianCallback's panels get no chart
    from lightning_bn.callbacks import HessianCallback

    hessian = {p.key for p in HessianCallback.logged_keys.panels}
    drawn = [p for p in PAPER_PANELS if p.key not in hessian]
    assert fitted.callback.panel_keys == [p.key for p in drawn]
    visualize = fitted.run.config["_wandb"]["visualize"]
    logged = fitted.callback.logged
    expected_lines = {
        "panels/loss_range": [
            ("min over η", "lipschitz/loss_min"),
            ("max over η", "lipschitz/loss_max"),
        ],
        "panels/grad_predictiveness": [
            ("min over η", "smoothness/grad_diff_min"),
            ("max over η", "smoothness/grad_diff_max"),
        ],
        "panels/beta_smoothness": [("β_eff", "smoothness/beta_eff")],
        "panels/ics_l2": [(layer, f"ics/{layer}/l2") for layer in LAYERS],
        "panels/ics_cos": [(layer, f"ics/{layer}/cos") for layer in LAYERS],
        "panels/thm41_ratio": [(layer, f"lipschitz/{layer}/thm41_ratio") for layer in LAYERS],
        "panels/act_grad_norm": [(layer, f"lipschitz/{layer}/act_grad_norm") for layer in LAYERS],
        "panels/hessian_top_eig": [("λ_max", "smoothness/hessian_top_eig")],
        "panels/grad_curvature": [("gᵀHg / ‖g‖²", "smoothness/grad_curvature")],
    }
    assert not set(visualize) & {p.key for p in PAPER_PANELS} - {p.key for p in drawn}
    for panel in drawn:
        config = visualize[panel.key]["panel_config"]
        assert config["panelDefId"] == "wandb/lineseries/v0"
        assert config["stringSettings"] == {"title": panel.title, "xname": STEP_METRIC}
        table = _chart_table(fitted, panel.key)
        assert table["columns"] == ["step", "lineKey", "lineVal"]
        assert table["data"] == [
            [step, label, metrics[key]]
            for label, key in expected_lines[panel.key]
            for step, metrics in logged
        ]


def test_reader_agrees_with_wandb_leet(fitted: _Result) -> None:
    """Cross-check the reader against wandb's own (Go) reader, `wandb leet inspect --json`."""
    cli = shutil.which("wandb", path=str(Path(sys.executable).parent)) or shutil.which("wandb")
    if cli is None:
        pytest.skip("no `wandb` command")
    out = subprocess.run(
        [cli, "leet", "inspect", "--json", str(fitted.run_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        pytest.skip(f"`wandb leet inspect` unavailable: {out.stderr.strip()[-300:]}")
    theirs = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    ours = list(iter_records(fitted.run_file))
    assert [(r["num"], r["type"]) for r in theirs] == [
        (r.num, r.WhichOneof("record_type")) for r in ours
    ]
    their_history = [r["history"]["item"] for r in theirs if r["type"] == "history"]
    assert their_history == [_flatten(row) for row in fitted.run.history]
    their_metrics = [r["metric"].get("name", "") for r in theirs if r["type"] == "metric"]
    assert their_metrics == [m.name for m in fitted.run.metrics]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def test_reader_reassembles_records_across_blocks(fitted: _Result) -> None:
    types = [chunk.type for chunk in iter_chunks(fitted.run_file)]
    assert {FIRST, MIDDLE, LAST} <= set(types)
    assert fitted.run_file.stat().st_size > 3 * 32 * 1024


def test_reader_rejects_corruption_and_stops_at_truncation(fitted: _Result, tmp_path: Path) -> None:
    data = fitted.run_file.read_bytes()
    chunk = next(c for c in iter_chunks(fitted.run_file) if len(c.payload) > 8)
    corrupt = bytearray(data)
    corrupt[chunk.offset + 7 + 4] ^= 0xFF
    (tmp_path / "corrupt.wandb").write_bytes(bytes(corrupt))
    with pytest.raises(WandbFileError, match="checksum"):
        read_run(tmp_path / "corrupt.wandb")

    (tmp_path / "bad_header.wandb").write_bytes(b":W&X" + data[4:])
    with pytest.raises(WandbFileError, match="header"):
        read_run(tmp_path / "bad_header.wandb")

    # A file cut in the middle of a multi-block record (a run still being written) reads up
    # to the last complete record.
    first = next(c for c in iter_chunks(fitted.run_file) if c.type == FIRST)
    (tmp_path / "cut.wandb").write_bytes(data[: first.offset + 100])
    cut = read_run(tmp_path / "cut.wandb")
    assert 0 < sum(cut.record_types.values()) < sum(fitted.run.record_types.values())
    assert "exit" not in cut.record_types


# --- no W&B logger, argument checks, helpers (no wandb run started) -------------------


def _trainer(tmp_path: Path, logger: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=logger,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("use_csv", [True, False])
def test_without_wandb_logger_nothing_happens(tmp_path: Path, use_csv: bool) -> None:
    trainer = _trainer(tmp_path, CSVLogger(tmp_path) if use_csv else False)
    history = MetricHistory()
    history.add(1, {"ics/model.0/l2": 1.0})
    assert wandb_runs(trainer) == []
    assert define_metrics(trainer, PAPER_SUMMARIES, keys=["ics/model.0/l2"]) == []
    log_config(trainer, "X", {"a": 1})
    assert log_paper_panels(trainer, history) == []
    assert wandb.run is None


def test_argument_checks(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, False)
    with pytest.raises(ValueError, match=r"`ics/\*/l2`.*'maxx'"):
        define_metrics(trainer, {"ics/*/l2": "maxx"}, keys=[])
    with pytest.raises(TypeError, match="summary"):
        define_metrics(trainer, {"ics/*/l2": 1}, keys=[])  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="keys"):
        define_metrics(trainer, {"ics/*/l2": "max"})
    assert define_metrics(trainer, {"smoothness/beta_eff": "max,last"}) == []  # no run: no-op
    with pytest.raises(ValueError, match="name"):
        log_config(trainer, "", {})
    with pytest.raises(TypeError, match="settings"):
        log_config(trainer, "X", [1, 2])  # type: ignore[arg-type]


def test_panel_history() -> None:
    history = MetricHistory()
    history.add(4, {"a": torch.tensor(2.0), "b": 1})
    history.add(2, {"a": 1.0})
    history.add(4, {"a": 3.0})  # a repeated step replaces, it does not add a point
    assert history.keys() == ["a", "b"]
    assert history.series("a") == ([2, 4], [1.0, 3.0])
    assert history.series("missing") == ([], [])
    assert "a" in history and len(history) == 2

    restored = MetricHistory()
    restored.load_state_dict(json.loads(json.dumps(history.state_dict())))
    assert restored.series("a") == history.series("a") and restored.keys() == history.keys()

    with pytest.raises(TypeError, match="step"):
        history.add(1.5, {"a": 1.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`a`"):
        history.add(1, {"a": torch.ones(2)})


def test_panel_resolves_dotted_layer_names() -> None:
    panel = Panel("panels/x", "x", (("ics/{layer}/l2", "L {layer}"), ("extra", "extra")))
    keys = ["ics/features.3/l2", "ics/features.3/cos", "extra", "ics/model.0/l2", "x/ics/a/l2"]
    assert panel.resolve(keys) == [
        ("ics/features.3/l2", "L features.3"),
        ("ics/model.0/l2", "L model.0"),
        ("extra", "extra"),
    ]
