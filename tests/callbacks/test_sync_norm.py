"""SyncNorm: 2 gloo ranks train and measure exactly like one process on the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from lightning_bn import BatchNorm, L1Norm, LipschitzCallback, NoiseInjectionCallback, SyncNorm
from lightning_bn.callbacks.sync_check import warn_unsynchronised_norms
from tests.support.models import Classifier, loader

ROOT = Path(__file__).resolve().parents[2]


def _run(mode: str, out: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.ddp_sync_run", mode, str(out)],
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
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sync_norm")
    modes = ("single", "ddp", "ddp-nosync", "ddp-uneven")
    return {mode: _run(mode, tmp / f"{mode}.json") for mode in modes}


def _max_state_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(
        float(
            (torch.tensor(a[k], dtype=torch.float64) - torch.tensor(b[k], dtype=torch.float64))
            .abs()
            .max()
        )
        for k in a
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "ddp-uneven"])  # batches of 8 + 8 and of 7 + 9
def test_sync_norm_ddp_equals_one_process_on_the_global_batch(
    runs: dict[str, Any], mode: str
) -> None:
    single, ddp = runs["single"], runs[mode]
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert ddp["types_in_training"][1::3] == [
        "SyncBatchNorm",
        "SyncL1Norm",
        "SyncL2Norm",
        "SyncLinfNorm",
        "PortableSyncBatchNorm",
    ]
    assert ddp["types_after"] == single["types_after"]  # reverted at the end of fit
    # weights and running statistics (every key of the state dict)
    assert single["state"].keys() == ddp["state"].keys()
    assert any("running_divisor" in k for k in single["state"])
    for key, value in single["state"].items():
        torch.testing.assert_close(
            torch.tensor(ddp["state"][key], dtype=torch.float64),
            torch.tensor(value, dtype=torch.float64),
            rtol=1e-9,
            atol=1e-9,
            msg=key,
        )
    # every diagnostic key, Theorem 4.1 with the global statistics included
    assert single["history"].keys() == ddp["history"].keys()
    families = set()
    for step, values in single["history"].items():
        assert values.keys() == ddp["history"][step].keys(), step
        for key, value in values.items():
            families.add(key.split("/")[0])
            assert ddp["history"][step][key] == pytest.approx(value, rel=1e-6, abs=1e-12), (
                step,
                key,
            )
    assert families == {"ics", "lipschitz", "smoothness", "noise"}
    assert {"lipschitz/net.1/thm41_ratio", "lipschitz/net.13/thm41_ratio"} <= set(
        single["history"]["0"]
    )
    assert "smoothness/hessian_top_eig" in single["history"]["2"]


@pytest.mark.slow
def test_without_the_plugin_the_runs_differ(runs: dict[str, Any]) -> None:
    assert runs["ddp-nosync"]["types_in_training"] == runs["single"]["types_after"]
    assert _max_state_diff(runs["single"]["state"], runs["ddp-nosync"]["state"]) > 1e-4
    assert _max_state_diff(runs["single"]["state"], runs["ddp"]["state"]) < 1e-9


@pytest.mark.slow
def test_a_probe_failing_on_one_rank_is_skipped_on_every_rank(tmp_path: Path) -> None:
    """Rank 1's loss_fn raises before its forward pass at step 1 while rank 0 enters the
    synchronised layers' collectives: every rank agrees on the failure before that collective
    and skips the measurement (it used to crash both with a gloo collective mismatch)."""
    out = tmp_path / "fail.json"
    run = _run("ddp-fail", out)
    history = run["history"]
    families = ("ics", "lipschitz", "smoothness")
    for step in ("0", "2"):
        for family in families:
            assert any(k.startswith(family + "/") for k in history[step]), (step, family)
    assert not any(k.startswith(families) for k in history.get("1", {}))
    for rank in (0, 1):
        skipped = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert len(skipped) == 3, skipped  # one per callback, at step 1 only
        assert all("at step 1:" in message for message in skipped)
        if rank == 1:
            assert all("injected failure on rank 1" in message for message in skipped)
        else:
            assert all("failed on 1 other rank" in message for message in skipped)
    # the training itself was untouched: the weights are finite and the run went to the end
    assert all(torch.isfinite(torch.tensor(v)).all() for v in run["state"].values())


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 6),
        BatchNorm(6),
        nn.Linear(6, 6),
        nn.BatchNorm1d(6),
        L1Norm(6),
        nn.Linear(6, 3),
    )


def test_sync_batchnorm_true_warns_naming_the_layers() -> None:
    trainer = SimpleNamespace(strategy=SimpleNamespace(_layer_sync=TorchSyncBatchNorm()))
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm\), 4 \(L1Norm\).*SyncNorm\(\)"):
        assert warn_unsynchronised_norms(trainer, _net())  # type: ignore[arg-type]
    for layer_sync in (None, SyncNorm()):
        trainer = SimpleNamespace(strategy=SimpleNamespace(_layer_sync=layer_sync))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not warn_unsynchronised_norms(trainer, _net())  # type: ignore[arg-type]


def _fit(**trainer_kwargs: Any) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    module = Classifier(_net().double(), lr=0.1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    try:
        trainer.fit(module, loader(n=48, batch_size=16, dtype=torch.float64))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_real_trainer_sync_batchnorm_warns_and_world_size_one_is_unsynchronised() -> None:
    # the warning comes at setup; then torch's SyncBatchNorm refuses the CPU (SyncNorm does not)
    with (
        pytest.warns(UserWarning, match=r"per-process: net.1 \(BatchNorm\), net.4 \(L1Norm\)"),
        pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"),
    ):
        _fit(strategy="ddp", sync_batchnorm=True, callbacks=[LipschitzCallback(every_n_steps=1)])
    plain = _fit(strategy="ddp")
    synced = _fit(strategy="ddp", plugins=[SyncNorm()])  # one process: nothing to synchronise
    assert plain.keys() == synced.keys()
    for key in plain:
        assert torch.equal(plain[key], synced[key]), key


def test_sync_norm_checks_its_argument() -> None:
    with pytest.raises(TypeError, match="Expected argument `use_torch_kernel` to be a bool"):
        SyncNorm(use_torch_kernel="yes")  # type: ignore[arg-type]


def test_sync_norm_apply_and_revert_in_place_and_warns_on_unknown_subclasses() -> None:
    class MyNorm(BatchNorm):
        pass

    net = nn.Sequential(nn.Linear(3, 3), L1Norm(3), MyNorm(3), nn.BatchNorm2d(3))
    plugin = SyncNorm()
    with pytest.warns(
        UserWarning, match=r"leaves these batch-statistics layers unsynchronised.*: 2"
    ):
        assert plugin.apply(net) is net
    assert [type(m).__name__ for m in net] == [
        "Linear",
        "SyncL1Norm",
        "MyNorm",
        "PortableSyncBatchNorm",
    ]
    assert plugin.revert(net) is net
    assert [type(m) for m in net] == [nn.Linear, L1Norm, MyNorm, nn.BatchNorm2d]


def test_global_batch_noise_checks_its_argument() -> None:
    with pytest.raises(TypeError, match="Expected argument `global_batch_noise` to be a bool"):
        NoiseInjectionCallback(global_batch_noise=1)  # type: ignore[arg-type]
