"""theorem41_shares in one process equals theorem41_bound (the 2-rank case: tests/callbacks)."""

from __future__ import annotations

import pytest
import torch

from lightning_bn.diagnostics.bounds import theorem41_bound
from lightning_bn.diagnostics.global_bounds import theorem41_shares


@pytest.mark.parametrize(("shape", "channel_dim", "eps"), [((9, 3), 1, 1e-5), ((4, 3, 5), -1, 0.0)])
def test_one_process_equals_the_local_bound(
    shape: tuple[int, ...], channel_dim: int, eps: float
) -> None:
    gen = torch.Generator().manual_seed(0)
    y, gy, gz = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    weight = torch.rand(shape[channel_dim], generator=gen, dtype=torch.float64) + 0.5
    lhs, rhs = theorem41_shares(
        y, gy, gz, weight, eps, all_reduce_sum=lambda t: t, world_size=1, channel_dim=channel_dim
    )
    ref = theorem41_bound(y, gy, gz, weight, eps, channel_dim=channel_dim)
    torch.testing.assert_close(lhs, ref.lhs, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rhs, ref.rhs, rtol=1e-12, atol=1e-14)
