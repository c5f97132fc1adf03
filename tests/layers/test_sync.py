"""Synchronised layers on 2 gloo processes equal the unsynchronised layer on the concatenated batch."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_bn.layers import BatchNorm, L1Norm, L2Norm, LinfNorm, LpNorm
from lightning_bn.layers.sync import (
    PortableSyncBatchNorm,
    SyncBatchNorm,
    SyncL1Norm,
    SyncL2Norm,
    SyncLinfNorm,
    SyncLpNorm,
    convert_sync_norm,
    revert_sync_norm,
    unsynchronised_norms,
)
from tests.support.sync_layers_run import CASES, make_data, make_layer, run_layer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("sync_layers")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.sync_layers_run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_the_global_batch(
    ranks: list[dict[str, Any]], case: str
) -> None:
    sizes = CASES[case][2]
    reference = run_layer(make_layer(case), make_data(case), slice(0, sum(sizes)))
    parts = [r[case] for r in ranks]
    expected_type = {"torch_bn1d": "PortableSyncBatchNorm", "torch_bn2d": "PortableSyncBatchNorm"}
    assert parts[0]["type"] == expected_type.get(case, parts[0]["type"])
    for key in ("y", "grad_x", "hvp"):  # each rank holds its slice
        assert [p[key].shape[0] for p in parts] == list(sizes)
        got = torch.cat([p[key] for p in parts])
        torch.testing.assert_close(got, reference[key], rtol=1e-10, atol=1e-12, msg=key)
    for key in ("grad_weight", "grad_bias"):  # each rank holds its share of the sum
        if key in reference:
            got = parts[0][key] + parts[1][key]
            torch.testing.assert_close(got, reference[key], rtol=1e-10, atol=1e-12, msg=key)
    buffers = [k for k in reference if k.startswith("buffer_")]
    assert buffers
    for key in [*buffers, "y_eval"]:  # running statistics of one process on the global batch
        for part in parts:
            torch.testing.assert_close(part[key], reference[key], rtol=1e-10, atol=1e-12, msg=key)


def test_per_rank_statistics_differ(ranks: list[dict[str, Any]]) -> None:
    """The comparison above can fail: each rank's own statistics give other outputs."""
    case = "batchnorm"
    data = make_data(case)
    local = run_layer(make_layer(case), data, slice(0, 7))
    assert not torch.allclose(local["y"], ranks[0][case]["y"], atol=1e-3)


@pytest.mark.parametrize(
    ("layer", "sync_type"),
    [
        (BatchNorm(3), SyncBatchNorm),
        (L1Norm(3), SyncL1Norm),
        (L2Norm(3), SyncL2Norm),
        (LinfNorm(3), SyncLinfNorm),
        (LpNorm(3, 1, centered_divisor=False), SyncLpNorm),
        (nn.BatchNorm1d(3), PortableSyncBatchNorm),
        (nn.SyncBatchNorm(3), PortableSyncBatchNorm),
    ],
)
def test_without_process_group_the_layers_are_unsynchronised(
    layer: nn.Module, sync_type: type
) -> None:
    original_type = type(layer)
    reference = make_copy(layer)
    x = torch.randn(6, 3, dtype=torch.float64) * 3 + 1
    x_ref = x.clone().requires_grad_(True)
    x_sync = x.clone().requires_grad_(True)
    converted, skipped = convert_sync_norm(layer)
    assert converted is layer and not skipped and type(layer) is sync_type
    # still the layer it was, for torch's tools (update_bn) and the callbacks
    expected_base = (
        nn.modules.batchnorm._BatchNorm if sync_type is PortableSyncBatchNorm else original_type
    )
    assert isinstance(layer, expected_base)
    y_ref, y_sync = reference.double()(x_ref), layer.double()(x_sync)
    assert torch.equal(y_ref, y_sync)
    y_ref.square().sum().backward()
    y_sync.square().sum().backward()
    assert x_ref.grad is not None and x_sync.grad is not None
    assert torch.equal(x_ref.grad, x_sync.grad)
    assert reference.state_dict().keys() == layer.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(value, layer.state_dict()[key]), key
    assert revert_sync_norm(layer) is layer and type(layer) is original_type
    assert not hasattr(layer, "_lbn_unsync_class")


def make_copy(layer: nn.Module) -> nn.Module:
    return copy.deepcopy(layer)


def test_conversion_keeps_module_objects_and_names_skipped_subclasses() -> None:
    class MyNorm(BatchNorm):
        pass

    model = nn.Sequential(nn.Linear(3, 3), BatchNorm(3), nn.BatchNorm1d(3), MyNorm(3), L1Norm(3))
    before = list(model.modules())
    params = list(model.parameters())
    assert unsynchronised_norms(model) == ["1", "2", "4"]
    _, skipped = convert_sync_norm(model)
    assert skipped == ["3"]
    assert list(model.modules()) == before and list(model.parameters()) == params
    assert [type(m).__name__ for m in model] == [
        "Linear",
        "SyncBatchNorm",
        "PortableSyncBatchNorm",
        "MyNorm",
        "SyncL1Norm",
    ]
    assert unsynchronised_norms(model) == []
    revert_sync_norm(model)
    assert [type(m) for m in model] == [nn.Linear, BatchNorm, nn.BatchNorm1d, MyNorm, L1Norm]
