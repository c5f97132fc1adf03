"""The experiment registry: what the plan, the runner and the command read from it, and
`lightning-bn reproduce` on the default experiment (MNIST-1D) end to end on a tiny budget."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from lightning_bn.cli import main
from lightning_bn.reproduce import build_plan, load_run
from lightning_bn.reproduce.experiments import (
    DEFAULT_EXPERIMENT,
    REGISTRY,
    check_data_dir,
    experiments_help,
    get_experiment,
)
from lightning_bn.reproduce.plan import ARCHS, EXPERIMENTS, VariantSpec
from lightning_bn.reproduce.runner import build_datamodule, build_model


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_plan_reads_the_registry() -> None:
    assert DEFAULT_EXPERIMENT == "mnist1d" == EXPERIMENTS[0]
    assert set(EXPERIMENTS) == set(REGISTRY) == {"mnist1d", "digits", "dln", "vgg-cifar10"}
    assert {name: e.archs for name, e in REGISTRY.items()} == ARCHS
    plan = build_plan()
    assert plan.experiment == "mnist1d" and plan.archs == ("mlp", "cnn")
    assert plan.lrs == (0.1, 1.0) and plan.n_samples == 20_000 and plan.seeds == 3
    quick = build_plan(quick=True)
    assert quick.archs == ("mlp",) and quick.steps < plan.steps and quick.seeds == 2
    assert any("1-D CNN" in note for note in quick.notes)
    for name in REGISTRY:
        assert name in experiments_help()
    with pytest.raises(ValueError, match="one of mnist1d, digits"):
        get_experiment("mnist2d")


@pytest.mark.parametrize(
    ("experiment", "arch"),
    [("mnist1d", "mlp"), ("mnist1d", "cnn"), ("digits", "mlp"), ("digits", "cnn"), ("dln", "dln")],
)
def test_each_experiment_builds_a_model_for_its_data(experiment: str, arch: str) -> None:
    plan = build_plan(experiment, tiny=True, archs=(arch,))
    model = build_model(plan, VariantSpec(arch, "batchnorm", plan.base_lr))
    data = build_datamodule(plan, arch, seed=0)
    data.setup("fit")
    x, _ = next(iter(data.train_dataloader()))
    out = model(x)
    assert out.shape[0] == x.shape[0] and torch.isfinite(out).all()


def test_data_dir_handling_comes_from_the_experiment(tmp_path: Path) -> None:
    assert check_data_dir("mnist1d", None) is None
    with pytest.raises(ValueError, match="applies to vgg-cifar10 only"):
        check_data_dir("mnist1d", str(tmp_path))
    with pytest.raises(ValueError, match="vgg-cifar10 needs --data-dir"):
        check_data_dir("vgg-cifar10", None)


def test_cli_refuses_mnist1d_without_the_package(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mnist1d" else real(name, *a)
    )
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--quick"])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "needs mnist1d: pip install mnist1d" in err[0]


def test_reproduce_default_is_mnist1d_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    args = ["reproduce", "--quick", "--tiny", "--no-progress", "--steps", "12"]
    args += ["--variants", "standard,batchnorm", "--wandb", "off", "--jobs", "1", "--out", str(out)]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    run = load_run(out)
    assert run.plan.experiment == "mnist1d" and run.plan.archs == ("mlp",)
    assert list((tmp_path / "cache" / "lightning-bn" / "mnist1d").glob("*.npz"))
    data = json.loads((out / "findings.json").read_text())
    rows = {f["id"]: f for f in data["findings"]}
    for name in ("loss_variation", "gradient_predictiveness", "beta_smoothness"):
        row = rows[f"{name}/mlp"]
        assert row["decided_by"].startswith("early phase")
        assert {"phase", "whole_run", "matched_loss", "fit_steps"} <= set(row)
        assert row["median"] == row["phase"]["median"]
    summary = (out / "summary.md").read_text()
    assert "On the mlp, " in summary and "early phase (decides)" in summary
    assert (out / "figures" / "fig4_mlp.png").is_file()
