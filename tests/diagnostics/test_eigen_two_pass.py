"""``top_hessian_eigenvalue(basis_size=0)``: Lanczos without a stored basis (the three-term
recurrence run twice), against the exact eigenvalues of explicit symmetric matrices, the stored
basis's answer, and what it allocates (torch's profiler)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_bn.diagnostics.eigen import (
    ConvergenceWarning,
    EigResult,
    top_hessian_eigenvalue,
)
from lightning_bn.diagnostics.hvp import HessianVectorProduct
from tests.support.profiling import peak_allocated

DTYPE = torch.float64


def _matrix(eigs: Tensor, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=DTYPE))
    return q @ torch.diag(eigs) @ q.T


def _op(a: Tensor) -> HessianVectorProduct:
    return HessianVectorProduct(
        lambda p: 0.5 * p["w"] @ a @ p["w"], {"w": a.new_zeros(a.shape[0])}, method="reverse"
    )


def _run(a: Tensor, basis: int | None, **kwargs: object) -> EigResult:
    options: dict = {"max_iters": 400, "tol": 1e-9, "warn": False, **kwargs}
    return top_hessian_eigenvalue(_op(a), None, basis_size=basis, **options)


def _dominant(a: Tensor) -> float:
    eigs = torch.linalg.eigvalsh(a)
    return float(eigs[eigs.abs().argmax()])


@pytest.mark.parametrize(
    "eigs",
    [
        torch.cat([torch.tensor([9.0, 8.5]), torch.linspace(5.0, -12.0, 58)]),  # negative wins
        torch.cat([torch.tensor([12.0]), torch.linspace(5.0, -11.5, 59)]),  # positive, close
        -torch.cat([torch.tensor([7.0, 6.8]), torch.linspace(0.1, 5.0, 38)]),  # negative definite
    ],
)
def test_the_largest_magnitude_eigenvalue_with_its_sign(eigs: Tensor) -> None:
    a = _matrix(eigs.double(), seed=len(eigs))
    res, full = _run(a, 0), _run(a, None)
    exact = _dominant(a)
    assert res.converged and res.eigenvalue == pytest.approx(exact, rel=1e-8)
    # the same Ritz value and stopping rule as the stored basis: the same products in pass 1
    assert res.eigenvalue == pytest.approx(full.eigenvalue, rel=1e-9)
    assert res.iterations == 2 * full.iterations - 1
    v = res.eigenvector["w"]
    assert float(torch.linalg.vector_norm(v)) == pytest.approx(1.0, abs=1e-12)
    assert float(torch.linalg.vector_norm(a @ v - exact * v)) <= 1e-3 * abs(exact)
    assert torch.allclose(v, full.eigenvector["w"], atol=1e-4)  # the same sign: q1ᵀv >= 0


def test_a_warm_start_reuses_its_memory_and_takes_fewer_products() -> None:
    a = _matrix(torch.cat([torch.tensor([6.0, -5.5]), torch.linspace(-4.0, 4.0, 48)]).double())
    cold = _run(a, 0, tol=1e-6)
    storage = cold.eigenvector["w"]._base
    assert storage is not None  # views of one flat tensor: a warm start's memory can be reused
    ptr = storage.data_ptr()
    warm = top_hessian_eigenvalue(
        _op(a), cold.eigenvector, basis_size=0, reuse_init=True, max_iters=400, tol=1e-6
    )
    assert warm.converged and warm.iterations < cold.iterations
    assert warm.eigenvalue == pytest.approx(_dominant(a), rel=1e-6)
    assert warm.eigenvector["w"].data_ptr() == ptr  # the Ritz vector is in the start's memory
    assert torch.equal(cold.eigenvector["w"], warm.eigenvector["w"])  # which init now holds


def test_a_capped_run_says_so_and_spends_at_most_max_iters() -> None:
    a = _matrix(torch.cat([torch.tensor([3.0, 2.999]), torch.linspace(-2.0, 2.0, 78)]).double())
    with pytest.warns(ConvergenceWarning):
        res = top_hessian_eigenvalue(_op(a), None, basis_size=0, max_iters=9, tol=1e-12)
    assert not res.converged and res.iterations == 9  # pass 1: 5 products, pass 2: 4
    assert float(torch.linalg.vector_norm(res.eigenvector["w"])) == pytest.approx(1.0)
    assert 2.0 < res.eigenvalue <= 3.0 + 1e-12  # a Ritz value: inside the spectrum


def test_a_non_finite_product_gives_nan_and_a_unit_vector() -> None:
    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"w": torch.full_like(v["w"], float("nan"))}

    res = top_hessian_eigenvalue(hvp, {"w": torch.ones(5, dtype=DTYPE)}, basis_size=0, warn=False)
    assert res.eigenvalue != res.eigenvalue and not res.converged and res.iterations == 1
    assert float(torch.linalg.vector_norm(res.eigenvector["w"])) == pytest.approx(1.0)


def test_memory_does_not_grow_with_the_products() -> None:
    n = 400_000
    d = torch.linspace(-1.0, 2.0, n)
    d[:2] = torch.tensor([6.0, -5.9])
    op = HessianVectorProduct(
        lambda p: 0.5 * (d * p["w"] * p["w"]).sum(), {"w": torch.zeros(n)}, method="reverse"
    )
    found: list[EigResult] = []

    def copies(iters: int) -> float:
        start = top_hessian_eigenvalue(op, None, basis_size=0, max_iters=3, warn=False)

        def run() -> None:
            found.append(
                top_hessian_eigenvalue(
                    op, start.eigenvector, basis_size=0, reuse_init=True, max_iters=iters,
                    tol=0.0, warn=False,
                )
            )  # fmt: skip

        return peak_allocated(run) / (4 * n)

    short, long = copies(21), copies(121)
    assert found[0].iterations == 21 and found[1].iterations == 121  # tol=0: all of them
    v = torch.ones(n)
    product = peak_allocated(lambda: op.matvec(v)) / (4 * n)  # the product and its partials
    # two Lanczos vectors besides the product; the start, then the Ritz vector, is init's memory
    assert 2 + product - 0.05 <= long <= 2 + product + 0.1
    assert abs(long - short) <= 0.05  # six times the products, no more memory


def test_no_basis_on_a_batchnorm_mlp_hessian_and_the_callback_option() -> None:
    from lightning_bn.callbacks import SmoothnessCallback
    from lightning_bn.diagnostics.landscape import compute_smoothness
    from lightning_bn.probe import StepRecord
    from tests.support.models import bn_hessian_case

    case = bn_hessian_case()
    eigs = torch.linalg.eigvalsh(torch.autograd.functional.hessian(case.flat_loss, case.flat0))
    dominant = float(eigs[eigs.abs().argmax()])
    result = compute_smoothness(
        case.probe, case.params, StepRecord(case.batch), [0.1], max_iters=1000, tol=1e-9,
        basis_size=0,
    )  # fmt: skip
    assert result.metrics["hessian_converged"] == 1.0
    assert result.metrics["hessian_top_eig"] == pytest.approx(dominant, rel=1e-3)
    assert SmoothnessCallback(lanczos_basis=0).lanczos_basis == 0
    with pytest.raises(ValueError, match="lanczos_basis"):
        SmoothnessCallback(lanczos_basis=1)
