"""Synchronised layers on a CUDA device, one process: exactly the unsynchronised layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_bn import BatchNorm, L1Norm, LinfNorm
from lightning_bn.layers.sync import convert_sync_norm, revert_sync_norm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_converted_model_on_cuda_equals_the_original() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 6), BatchNorm(6), L1Norm(6), LinfNorm(6), nn.BatchNorm1d(6)
    ).to("cuda", torch.float64)
    ref = copy.deepcopy(net)
    convert_sync_norm(net)
    x = torch.randn(16, 4, device="cuda", dtype=torch.float64)
    y, y_ref = net(x), ref(x)
    assert torch.equal(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad)
    revert_sync_norm(net)
    assert [type(m) for m in net] == [type(m) for m in ref]
