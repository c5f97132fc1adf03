"""Lanczos with a bounded basis (explicit restarts) against the exact dominant eigenvalue."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bn.diagnostics.eigen import top_hessian_eigenvalue
from lightning_bn.diagnostics.landscape import compute_smoothness
from lightning_bn.probe import Probe, StepRecord
from tests.support.models import Classifier


def test_restarted_lanczos_matches_the_exact_dominant_eigenvalue() -> None:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    values = torch.linspace(-3.0, 4.0, 60, dtype=torch.float64)
    a = q @ torch.diag(values) @ q.T

    def hvp(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"w": a @ v["w"]}

    like = {"w": torch.zeros(60, dtype=torch.float64)}
    full = top_hessian_eigenvalue(hvp, None, max_iters=60, tol=1e-12, like=like, warn=False)
    small = top_hessian_eigenvalue(
        hvp, None, max_iters=2000, tol=1e-12, like=like, basis_size=4, warn=False
    )
    assert full.eigenvalue == pytest.approx(4.0, rel=1e-9)
    assert small.eigenvalue == pytest.approx(4.0, rel=1e-6)
    assert small.iterations > full.iterations  # the restarts cost products, not accuracy
    with pytest.raises(ValueError, match="basis_size"):
        top_hessian_eigenvalue(hvp, None, like=like, basis_size=1)


def test_bounded_basis_on_a_batchnorm_mlp_hessian() -> None:
    torch.manual_seed(0)
    module = Classifier(
        nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    ).train()
    probe = Probe(module)
    gen = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(16, 8, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (16,), generator=gen),
    )
    params = probe.parameters()
    names = list(params)
    shapes = [params[n].shape for n in names]

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return probe.loss(out, batch)

    flat0 = torch.cat([params[n].reshape(-1) for n in names])
    eigs = torch.linalg.eigvalsh(torch.autograd.functional.hessian(flat_loss, flat0))
    dominant = float(eigs[eigs.abs().argmax()])
    result = compute_smoothness(
        probe, params, StepRecord(batch), [0.1], max_iters=1000, tol=1e-9, basis_size=8
    )
    assert result.metrics["hessian_top_eig"] == pytest.approx(dominant, rel=1e-3)
