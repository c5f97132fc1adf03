"""Lanczos with a bounded basis (explicit restarts) against the exact dominant eigenvalue."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_bn.diagnostics.eigen import top_hessian_eigenvalue
from lightning_bn.diagnostics.hvp import HessianVectorProduct
from lightning_bn.diagnostics.landscape import compute_smoothness
from lightning_bn.diagnostics.paramvec import dict_clone
from lightning_bn.probe import StepRecord
from tests.support.models import bn_hessian_case


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
    case = bn_hessian_case()
    probe, params, batch = case.probe, case.params, case.batch
    eigs = torch.linalg.eigvalsh(torch.autograd.functional.hessian(case.flat_loss, case.flat0))
    dominant = float(eigs[eigs.abs().argmax()])
    result = compute_smoothness(
        probe, params, StepRecord(batch), [0.1], max_iters=1000, tol=1e-9, basis_size=8
    )
    assert result.metrics["hessian_top_eig"] == pytest.approx(dominant, rel=1e-3)


def _explicit_hessian_problem() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    values = torch.cat([torch.tensor([5.0, -4.6]), torch.linspace(-2.0, 2.0, 38)]).double()
    return q @ torch.diag(values) @ q.T, {"w": torch.zeros(40, dtype=torch.float64)}


def test_five_vector_basis_finds_the_exact_dominant_eigenvalue_of_an_explicit_hessian() -> None:
    # the callback's default basis (5 vectors): restarts from both ends' Ritz vectors, so the
    # negative end (-4.6, close behind) cannot take over; exact to the tolerance asked
    a, like = _explicit_hessian_problem()
    op = HessianVectorProduct(lambda p: 0.5 * p["w"] @ a @ p["w"], like)
    res = top_hessian_eigenvalue(op, None, max_iters=400, tol=1e-12, basis_size=5, warn=False)
    assert res.converged and res.eigenvalue == pytest.approx(5.0, rel=1e-8)
    assert torch.linalg.vector_norm(a @ res.eigenvector["w"] - 5.0 * res.eigenvector["w"]) < 1e-3


def test_reused_warm_start_holds_the_products_and_changes_no_value() -> None:
    # reuse_init: the warm start's memory is Lanczos's working vector, every product is written
    # there (one parameter-sized vector besides the basis), and the values are those without it
    a, like = _explicit_hessian_problem()
    op = HessianVectorProduct(lambda p: 0.5 * p["w"] @ a @ p["w"], like)
    cold = top_hessian_eigenvalue(op, None, max_iters=6, tol=0.0, basis_size=5, warn=False)
    kept = cold.eigenvector  # views of the solver's working vector, as the callback keeps them
    base = kept["w"]._base
    assert base is not None
    plain = top_hessian_eigenvalue(op, dict_clone(kept), max_iters=12, basis_size=5, warn=False)
    seen: list[int] = []
    matvec = op.matvec

    def spy(vector: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        result = matvec(vector, out)
        seen.append(result.data_ptr())
        return result

    op.matvec = spy  # type: ignore[method-assign]
    reused = top_hessian_eigenvalue(
        op, kept, max_iters=12, basis_size=5, reuse_init=True, warn=False
    )
    assert reused.eigenvalue == plain.eigenvalue and reused.iterations == plain.iterations
    assert torch.equal(reused.eigenvector["w"], plain.eigenvector["w"])
    assert seen and set(seen) == {base.data_ptr()}
    assert reused.eigenvector["w"].data_ptr() == base.data_ptr()


def test_basis_is_allocated_once_across_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_bn.diagnostics import krylov

    a, like = _explicit_hessian_problem()
    blocks: set[int] = set()
    original = krylov.Basis.append

    def append(self: krylov.Basis, *args: Any, **kwargs: Any) -> torch.Tensor:
        row = original(self, *args, **kwargs)
        assert sum(b.shape[0] for b in self._blocks) <= 5
        blocks.update(b.data_ptr() for b in self._blocks)
        return row

    monkeypatch.setattr(krylov.Basis, "append", append)
    res = top_hessian_eigenvalue(
        lambda v: {"w": a @ v["w"]},
        None,
        max_iters=30,
        tol=0.0,
        like=like,
        basis_size=5,
        warn=False,
    )
    # several cycles of five products, all in one block of five rows
    assert res.converged and res.iterations > 10 and len(blocks) == 1
