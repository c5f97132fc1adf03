"""Real DDP on CPU (2 ranks, gloo): every diagnostic equals the single-process one on the union."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from lightning_bn import ICSCallback, LipschitzCallback, SmoothnessCallback
from tests.support.models import Classifier, mlp

ROOT = Path(__file__).resolve().parents[2]


def _run(mode: str, out: Path, *extra: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.ddp_run", mode, str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp")
    return _run("single", tmp / "single.json"), _run("ddp", tmp / "ddp.json")


@pytest.mark.slow
def test_ddp_equals_single_process_on_the_union(runs: tuple[dict, dict]) -> None:
    single, ddp = runs
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert single["history"].keys() == ddp["history"].keys()
    families = set()
    for step, values in single["history"].items():
        assert values.keys() == ddp["history"][step].keys(), step
        for key, value in values.items():
            families.add(key.split("/")[0])
            assert ddp["history"][step][key] == pytest.approx(value, rel=1e-5, abs=1e-10), (
                step,
                key,
            )
    assert families == {"ics", "lipschitz", "smoothness"}
    assert "lipschitz/net.1/act_grad_norm" in single["history"]["0"]
    assert "smoothness/hessian_top_eig" in single["history"]["2"]
    for name, weight in single["weights"].items():  # and training itself was the same
        expected = torch.tensor(weight, dtype=torch.float64)
        torch.testing.assert_close(
            torch.tensor(ddp["weights"][name], dtype=torch.float64), expected
        )


@pytest.mark.slow
def test_hessian_ddp_equals_single_process_on_the_union(tmp_path: Path) -> None:
    single = _run("single", tmp_path / "single.json", "--hessian")
    ddp = _run("ddp", tmp_path / "ddp.json", "--hessian")
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert single["history"].keys() == ddp["history"].keys() == {"0", "1", "2", "3"}
    for step, values in single["history"].items():
        assert values.keys() == ddp["history"][step].keys(), step
        for key, value in values.items():
            assert ddp["history"][step][key] == pytest.approx(value, rel=1e-5, abs=1e-10), (
                step,
                key,
            )
    later = single["history"]["1"]
    for key in ("eig_2", "trace", "net.0/eig_max", "net.5/trace", "precond_eig_max", "density/hi"):
        assert f"hessian/{key}" in later, key


@pytest.mark.slow
def test_rank_local_failure_does_not_deadlock(tmp_path: Path) -> None:
    # rank 1 fails every probe while global_step == 2: probes see the measured step's
    # global_step (ICS too, although it measures after the optimiser step), so the ICS,
    # Lipschitz and Smoothness measurements of step 2 fail there. Both ranks skip them.
    result = _run("ddp", tmp_path / "fail.json", "--fail-rank", "1", "--fail-step", "2")
    families = {s: {k.split("/")[0] for k in v} for s, v in result["history"].items()}
    families = {s: f for s, f in families.items() if f}
    assert families == {
        "0": {"ics", "lipschitz", "smoothness"},
        "1": {"ics", "lipschitz"},
        "3": {"ics", "lipschitz"},
    }


@pytest.mark.slow
def test_failure_at_one_grid_point_skips_the_measurement_on_both_ranks(tmp_path: Path) -> None:
    # every rank reduces the step-size grid point by point (an all-reduce per point): rank 1
    # fails at its 5th evaluation of step 2 (the 4th grid point) while rank 0 waits in that
    # point's collective; both ranks skip the measurement and training goes on
    result = _run(
        "ddp", tmp_path / "grid.json", "--fail-rank", "1", "--fail-step", "2", "--fail-call", "5"
    )
    smoothness = {
        s for s, v in result["history"].items() if any(k.startswith("smoothness/") for k in v)
    }
    lipschitz = {s for s, v in result["history"].items() if "lipschitz/loss" in v}
    assert smoothness == {"0"} and lipschitz == {"0", "1", "2", "3"}


@pytest.mark.parametrize("cls", [ICSCallback, LipschitzCallback, SmoothnessCallback])
def test_sharded_strategy_refused(cls: type) -> None:
    # FSDP needs a GPU here, so a bare instance of the real strategy class stands in for it
    trainer = SimpleNamespace(strategy=object.__new__(FSDPStrategy), accumulate_grad_batches=1)
    with pytest.raises(
        NotImplementedError, match="does not support the sharded strategy FSDPStrategy"
    ):
        cls()._check_trainer(trainer, Classifier(mlp()))
