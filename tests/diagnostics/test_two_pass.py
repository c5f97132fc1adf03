"""Lanczos without a stored basis (``basis_size=0``: the three-term recurrence run twice per
eigenvalue) against the exact eigenvalues of explicit symmetric matrices, and what it allocates,
counted allocation by allocation (torch's profiler)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightning_bn.diagnostics.hvp import HessianVectorProduct
from lightning_bn.diagnostics.krylov import AddMatvec
from lightning_bn.diagnostics.paramvec import FlatLayout
from lightning_bn.diagnostics.restart import two_pass_top
from lightning_bn.diagnostics.spectrum import TopEigResult, top_eigenvalues
from tests.support.profiling import peak_allocated

DTYPE = torch.float64


def _layout(n: int, dtype: torch.dtype = DTYPE) -> FlatLayout:
    return HessianVectorProduct(lambda p: p["w"].sum(), {"w": torch.ones(n, dtype=dtype)}).layout


def _matrix(eigs: Tensor, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=DTYPE))
    return q @ torch.diag(eigs) @ q.T


def _top(a: Tensor, k: int, tol: float, max_iters: int = 2000) -> TopEigResult:
    return top_eigenvalues(
        lambda v: a @ v, _layout(a.shape[0]), k, max_iters=max_iters, tol=tol, basis_size=0,
        generator=torch.Generator().manual_seed(1), warn=False,
    )  # fmt: skip


def _check(a: Tensor, res: TopEigResult, k: int, rel: float) -> None:
    exact = torch.linalg.eigvalsh(a).flip(0)[:k]
    assert res.converged and res.run is None
    assert torch.allclose(torch.tensor(res.eigenvalues, dtype=DTYPE), exact, rtol=rel, atol=0)
    vectors = torch.stack(res.eigenvectors)
    assert torch.allclose(vectors @ vectors.T, torch.eye(k, dtype=DTYPE), atol=1e-10)
    for value, vector in zip(res.eigenvalues, res.eigenvectors, strict=True):
        assert float(torch.linalg.vector_norm(a @ vector - value * vector)) <= 1e-5 * abs(value)


def test_top_3_of_a_clustered_spectrum_with_a_larger_negative_end() -> None:
    # a close top pair and a third 7% below, a negative end larger in magnitude than the top
    eigs = torch.cat([torch.tensor([10.0, 9.99, 9.3]), torch.linspace(5.0, -14.0, 57)]).double()
    a = _matrix(eigs)
    _check(a, _top(a, 3, 1e-9), 3, 1e-8)


def test_top_eigenvalues_of_a_negative_definite_matrix() -> None:
    eigs = -torch.cat([torch.tensor([0.5, 0.6, 0.8]), torch.linspace(1.0, 20.0, 37)]).double()
    a = _matrix(eigs, seed=4)
    _check(a, _top(a, 3, 1e-10), 3, 1e-8)


def test_a_repeated_top_eigenvalue_is_found_twice() -> None:
    # Krylov methods see one copy per run; deflation by the first finds the second
    eigs = torch.cat([torch.tensor([4.0, 4.0, 3.0]), torch.linspace(-2.0, 2.0, 27)]).double()
    a = _matrix(eigs, seed=2)
    _check(a, _top(a, 3, 1e-10), 3, 1e-8)


def test_agrees_with_the_restarted_and_the_unrestarted_solver() -> None:
    eigs = torch.cat([torch.tensor([10.0, 9.7, 9.0]), torch.linspace(5.0, -12.0, 37)]).double()
    a = _matrix(eigs, seed=5)
    two = _top(a, 3, 1e-6)
    for basis in (8, None):
        other = top_eigenvalues(
            lambda v: a @ v, _layout(40), 3, max_iters=400, tol=1e-6, basis_size=basis,
            generator=torch.Generator().manual_seed(1), warn=False,
        )  # fmt: skip
        for x, y in zip(two.eigenvalues, other.eigenvalues, strict=True):
            assert abs(x - y) <= 1e-5 * abs(y)


def test_fewer_dimensions_than_k_stops_at_them() -> None:
    a = _matrix(torch.tensor([3.0, 1.0, -2.0], dtype=DTYPE), seed=3)
    res = _top(a, 5, 1e-9)
    assert res.converged
    assert torch.allclose(
        torch.tensor(res.eigenvalues, dtype=DTYPE), torch.linalg.eigvalsh(a).flip(0)
    )


@pytest.mark.parametrize("n_locked", [0, 2])
def test_pass_1_stops_once_the_krylov_space_fills_the_space(n_locked: int) -> None:
    # tol=0 never stops by the residual: on n dimensions (less the locked ones) the run stops
    # after that many steps with the exact eigenvalue, even where rounding keeps beta above the
    # breakdown threshold (a spread spectrum without reorthogonalisation)
    eigs = torch.tensor([17.5, 2.3, 0.9, 0.48, 0.08, 6.0, -3.0], dtype=DTYPE)
    a = _matrix(eigs, seed=9)
    vectors = torch.linalg.eigh(a).eigenvectors.flip(1)
    locked = [vectors[:, j].contiguous() for j in range(n_locked)]  # 17.5, then 6.0
    calls: list[int] = []

    def matvec(v: Tensor) -> Tensor:
        calls.append(1)
        return a @ v

    pair = two_pass_top(matvec, torch.ones(7, dtype=DTYPE), max_steps=50, tol=0.0, locked=locked)
    dim = 7 - n_locked
    assert pair.converged and pair.residual == 0.0 and len(calls) == pair.steps == 2 * dim - 1
    expected = float(torch.sort(eigs, descending=True).values[n_locked])
    assert pair.value == pytest.approx(expected, rel=1e-12)
    assert pair.vector is not None
    residual = a @ pair.vector - pair.value * pair.vector
    assert float(torch.linalg.vector_norm(residual)) <= 1e-9 * abs(expected)


def test_two_passes_take_2m_minus_1_products_and_say_when_capped() -> None:
    eigs = torch.cat([torch.tensor([10.0, 9.7]), torch.linspace(5.0, -12.0, 38)]).double()
    a = _matrix(eigs, seed=6)
    calls: list[int] = []

    def matvec(v: Tensor) -> Tensor:
        calls.append(1)
        return a @ v

    q = torch.ones(40, dtype=DTYPE)
    pair = two_pass_top(matvec, q, max_steps=200, tol=1e-8)
    assert pair.converged and pair.steps == len(calls) and pair.steps % 2 == 1
    assert abs(pair.value - 10.0) <= 1e-8 * 10
    capped = two_pass_top(matvec, torch.ones(40, dtype=DTYPE), max_steps=3, tol=1e-12)
    assert not capped.converged and capped.steps == 5 and capped.vector is not None
    assert float(torch.linalg.vector_norm(capped.vector)) == pytest.approx(1.0, abs=1e-12)


def test_memory_does_not_grow_with_the_products() -> None:
    n = 400_000
    d = torch.linspace(-1.0, 2.0, n)
    d[:3] = torch.tensor([6.0, 4.0, 3.0])  # three separated top eigenvalues, then a bulk
    layout = _layout(n, torch.float32)
    found: list[TopEigResult] = []

    def copies(iters: int, tol: float) -> float:
        def run() -> None:
            found.append(
                top_eigenvalues(
                    lambda v: d * v, layout, 3, max_iters=iters, tol=tol, basis_size=0, warn=False
                )
            )

        return peak_allocated(run) / (4 * n)

    short, long = copies(20, 0.0), copies(120, 0.0)
    # tol=0: every product spent on the first eigenvalue (2m - 1 of them)
    assert found[0].iterations == 20 - 1 and found[1].iterations == 120 - 1
    # the start kept through pass 1 (the Ritz vector's sum in pass 2), two Lanczos vectors,
    # the product, and the start's draw
    assert long <= 4 + 1.2
    assert abs(long - short) <= 0.2  # six times the products, no more memory
    three = copies(300, 1e-5)
    res = found[-1]
    assert res.converged and res.eigenvalues == pytest.approx([6.0, 4.0, 3.0], rel=1e-4)
    assert three <= 4 + 2 + 1.2  # and the two eigenvectors found before the third


def test_basis_size_is_none_zero_or_at_least_four() -> None:
    from lightning_bn.callbacks import HessianCallback

    a = _matrix(torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=DTYPE))
    for bad in (1, 3):
        with pytest.raises(ValueError, match=r"`basis_size` to be 0 or an integer >= 4"):
            _top_with(a, bad)
        with pytest.raises(ValueError, match=r"`lanczos_basis` to be 0 or an integer >= 4"):
            HessianCallback(lanczos_basis=bad)
    with pytest.raises(ValueError, match="lanczos_basis"):
        HessianCallback(lanczos_basis=-1)
    for good in (0, 4, None):
        assert _top_with(a, good).eigenvalues[0] == pytest.approx(3.0, rel=1e-6)
        HessianCallback(lanczos_basis=good)


def _top_with(a: Tensor, basis: int | None) -> TopEigResult:
    return top_eigenvalues(
        lambda v: a @ v, _layout(a.shape[0]), 1, max_iters=50, tol=1e-9, basis_size=basis,
        generator=torch.Generator().manual_seed(1), warn=False,
    )  # fmt: skip


def _adding(matvec: Callable[[Tensor], Tensor]) -> AddMatvec:
    """``matvec`` that adds its product into a given vector (as the kept graph does)."""
    return AddMatvec(lambda v, into: matvec(v) if into is None else into.add_(matvec(v)))


@pytest.mark.parametrize(
    ("eigs", "seed"),
    [
        (torch.cat([torch.tensor([10.0, 9.99, 9.3]), torch.linspace(5.0, -14.0, 57)]), 0),
        (torch.cat([torch.tensor([4.0, 4.0, 3.0]), torch.linspace(-2.0, 2.0, 27)]), 2),
        (-torch.cat([torch.tensor([0.5, 0.6, 0.8]), torch.linspace(1.0, 20.0, 37)]), 4),
    ],
)
def test_products_added_into_the_recurrence_find_the_exact_top_3(eigs: Tensor, seed: int) -> None:
    a = _matrix(eigs.double(), seed=seed)
    res = top_eigenvalues(
        _adding(lambda v: a @ v), _layout(a.shape[0]), 3, max_iters=2000, tol=1e-10,
        basis_size=0, generator=torch.Generator().manual_seed(1), warn=False,
    )  # fmt: skip
    _check(a, res, 3, 1e-8)
    plain = _top(a, 3, 1e-10)  # the same recurrence, the product subtracted from: same values
    assert res.eigenvalues == pytest.approx(plain.eigenvalues, rel=1e-10)


def test_fewer_dimensions_than_k_with_products_added_into_the_recurrence() -> None:
    a = _matrix(torch.tensor([3.0, 1.0, -2.0], dtype=DTYPE), seed=3)
    res = top_eigenvalues(
        _adding(lambda v: a @ v), _layout(3), 5, max_iters=2000, tol=1e-9, basis_size=0,
        generator=torch.Generator().manual_seed(1), warn=False,
    )  # fmt: skip
    assert res.converged
    assert torch.allclose(
        torch.tensor(res.eigenvalues, dtype=DTYPE), torch.linalg.eigvalsh(a).flip(0)
    )


def test_a_product_added_into_the_recurrence_holds_one_vector_less() -> None:
    n = 400_000
    d = torch.linspace(-1.0, 2.0, n)
    d[:3] = torch.tensor([6.0, 4.0, 3.0])
    layout = _layout(n, torch.float32)
    found: list[TopEigResult] = []

    def copies(matvec: Callable[[Tensor], Tensor], iters: int, tol: float) -> float:
        def run() -> None:
            found.append(
                top_eigenvalues(
                    matvec, layout, 3, max_iters=iters, tol=tol, basis_size=0, warn=False
                )
            )

        return peak_allocated(run) / (4 * n)

    adding = AddMatvec(lambda v, into: d * v if into is None else into.addcmul_(d, v))
    # the start (then the Ritz vector's sum), the last two Lanczos vectors, the product added
    # into the older of them: three, and the start's draw
    added, plain = copies(adding, 120, 0.0), copies(lambda v: d * v, 120, 0.0)
    assert found[0].iterations == found[1].iterations == 120 - 1
    assert added <= 3 + 1.2 and plain - added >= 0.95
    three = copies(adding, 300, 1e-5)
    assert found[-1].converged
    assert found[-1].eigenvalues == pytest.approx([6.0, 4.0, 3.0], rel=1e-4)
    assert three <= 3 + 2 + 1.2  # and the two eigenvectors found before the third
