"""HessianCallback on a model of 2^20 float32 parameters, where its top-k eigenvectors are kept in
bfloat16: a quadratic loss whose Hessian is a known diagonal, so the logged eigenvalues and trace
are compared with exact values."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import HessianCallback
from lightning_bn.diagnostics import hessian as hessian_module
from lightning_bn.diagnostics.paramvec import FlatLayout
from tests.support.models import MemoryLogger, trainer

N = 1 << 20


def _diagonal() -> Tensor:
    """H = diag(d): three separated top eigenvalues over a bulk in [0, 1)."""
    d = torch.rand(N, generator=torch.Generator().manual_seed(0))
    d[[5, 70_000, 900_000]] = torch.tensor([3.0, 2.0, 1.5])
    return d


class Quadratic(pl.LightningModule):
    """L(w) = ½ Σ d_i w_i² (the batch only sets the step count)."""

    def __init__(self, d: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(N, generator=torch.Generator().manual_seed(1)))
        self.register_buffer("d", d)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return 0.5 * (self.d * self.w * self.w).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_rounding_rule_is_float32_from_two_to_the_twenty() -> None:
    def layout(n: int, dtype: torch.dtype) -> FlatLayout:
        return FlatLayout({"w": torch.empty(n, dtype=dtype)})

    assert hessian_module._eigenvector_dtype(layout(N, torch.float32)) == torch.bfloat16
    assert hessian_module._eigenvector_dtype(layout(N - 1, torch.float32)) is None
    assert hessian_module._eigenvector_dtype(layout(N, torch.float64)) is None


def test_top_k_and_trace_of_a_known_diagonal_hessian_with_bfloat16_eigenvectors() -> None:
    d = _diagonal()
    logger = MemoryLogger()
    cb = HessianCallback(
        every_n_steps=1, top_k=3, tol=1e-4, density=False, per_layer=False, preconditioned=False
    )
    data = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=4)
    trainer([cb], steps=1, logger=logger).fit(Quadratic(d), data)
    logged = logger.history[0]
    assert logged["hessian/eig_converged"] == 1.0
    # later eigenvalues are those off the bfloat16 vectors' span: about 1e-6 of λ_1 away
    for i, want in enumerate((3.0, 2.0, 1.5), start=1):
        assert logged[f"hessian/eig_{i}"] == pytest.approx(want, abs=1e-5 * 3.0)
    exact = float(d.double().sum())
    assert logged["hessian/trace_converged"] == 1.0
    err = logged["hessian/trace_stderr"]
    assert abs(logged["hessian/trace"] - exact) <= 3 * err + 1e-6 * exact
