"""The Hessian spectrum in bounded memory (``basis_size``, deflation by eigenvectors, SLQ without
reorthogonalisation) against exact eigenvalues: explicit matrices of known spectrum and the exact
Hessians (float64) of the train-mode networks of ``test_spectrum``; and what it allocates,
counted allocation by allocation (torch's profiler)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightning_bn.diagnostics.density import spectral_density
from lightning_bn.diagnostics.eigen import ConvergenceWarning
from lightning_bn.diagnostics.hvp import HessianVectorProduct
from lightning_bn.diagnostics.paramvec import FlatLayout
from lightning_bn.diagnostics.preconditioned import scaled_matvec
from lightning_bn.diagnostics.span import deflated_exact_trace
from lightning_bn.diagnostics.spectrum import (
    TopEigResult,
    _rademacher,
    block_indices,
    block_top_eigenvalues,
    hutchinson_trace,
    top_eigenvalues,
)
from tests.diagnostics.test_spectrum import Case
from tests.support.profiling import peak_allocated

DTYPE = torch.float64


def _layout(n: int, dtype: torch.dtype = DTYPE) -> FlatLayout:
    return HessianVectorProduct(lambda p: p["w"].sum(), {"w": torch.ones(n, dtype=dtype)}).layout


def _known(n: int = 40, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A symmetric matrix Q diag(λ) Qᵀ and its eigenvalues (descending): a close top pair and
    a negative end larger in magnitude than the top."""
    gen = torch.Generator().manual_seed(seed)
    eigs = torch.cat(
        [
            torch.tensor([10.0, 9.7, 9.0], dtype=DTYPE),
            torch.linspace(5.0, -12.0, n - 3, dtype=DTYPE),
        ]
    )
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    return q @ torch.diag(eigs) @ q.T, eigs


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request: pytest.FixtureRequest) -> tuple[Case, Tensor]:
    c = Case(request.param)
    return c, c.hessian()


@pytest.mark.parametrize("basis_size", [4, 5, 8])
def test_top_3_by_deflated_restarts_of_a_known_spectrum(basis_size: int) -> None:
    a, eigs = _known()
    res = top_eigenvalues(
        lambda v: a @ v,
        _layout(40),
        3,
        max_iters=3000,
        tol=1e-9,
        basis_size=basis_size,
        generator=torch.Generator().manual_seed(1),
    )
    assert res.converged and res.run is None
    assert res.eigenvalues == pytest.approx(eigs[:3].tolist(), rel=1e-6)
    vectors = torch.stack(res.eigenvectors)
    assert torch.allclose(vectors @ vectors.T, torch.eye(3, dtype=DTYPE), atol=1e-10)
    for value, vector, residual in zip(
        res.eigenvalues, res.eigenvectors, res.residuals, strict=True
    ):
        true = float(torch.linalg.vector_norm(a @ vector - value * vector))
        assert residual <= 1e-9 * abs(value) and true <= 1e-7 * abs(value)


def test_bounded_top_k_against_the_exact_hessian(case: tuple[Case, Tensor]) -> None:
    c, h = case
    exact = torch.linalg.eigvalsh(h).flip(0)
    kw = {"basis_size": 5, "max_iters": 400}
    res = top_eigenvalues(
        c.op.matvec, c.layout, 4, generator=torch.Generator().manual_seed(1), **kw
    )
    assert res.converged
    assert res.eigenvalues == pytest.approx(exact[:4].tolist(), rel=1e-3)
    # warm-started from its own vectors at the same point: fewer products, same values
    warm = top_eigenvalues(c.op.matvec, c.layout, 4, res.eigenvectors, **kw)
    assert warm.converged and warm.iterations < res.iterations
    assert warm.eigenvalues == pytest.approx(res.eigenvalues, rel=1e-3)


def test_bounded_top_k_capped_says_so(case: tuple[Case, Tensor]) -> None:
    c, _ = case
    with pytest.warns(ConvergenceWarning, match="did not converge within 5"):
        res = top_eigenvalues(c.op.matvec, c.layout, 3, max_iters=5, tol=1e-9, basis_size=4)
    assert not res.converged and res.iterations == 5


def test_top_k_beyond_the_dimension_stops_at_it() -> None:
    a = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=DTYPE))
    res = top_eigenvalues(lambda v: a @ v, _layout(3), 5, max_iters=50, basis_size=4)
    assert res.converged
    assert res.eigenvalues == pytest.approx([3.0, 1.0, -2.0], abs=1e-12)


def test_nan_product_is_not_converged() -> None:
    with pytest.warns(ConvergenceWarning):
        res = top_eigenvalues(lambda v: v * math.nan, _layout(3), 2, basis_size=4)
    assert not res.converged and all(math.isnan(x) for x in res.eigenvalues)


def test_exact_part_of_a_trace_deflated_by_orthonormal_vectors() -> None:
    a, _ = _known(30, seed=2)
    gen = torch.Generator().manual_seed(3)
    y, _ = torch.linalg.qr(torch.randn(30, 4, generator=gen, dtype=DTYPE))
    blocks = {"a": torch.arange(0, 7), "b": torch.arange(7, 30)}
    exact, parts = deflated_exact_trace(lambda v: a @ v, list(y.T), blocks)
    p = y @ y.T
    rest = (torch.eye(30, dtype=DTYPE) - p) @ a @ (torch.eye(30, dtype=DTYPE) - p)
    assert exact == pytest.approx(float(torch.trace(y.T @ a @ y)), rel=1e-12)
    for name, idx in blocks.items():  # tr(E_b A E_bᵀ) minus the part the probes see
        want = float(a[idx][:, idx].trace() - rest[idx][:, idx].trace())
        assert parts[name] == pytest.approx(want, rel=1e-10, abs=1e-12)
    with pytest.raises(ValueError, match="orthonormal"):
        deflated_exact_trace(lambda v: a @ v, [y[:, 0], y[:, 0]], {})


@pytest.mark.parametrize("store", [None, torch.bfloat16])  # bfloat16: the exact projector
def test_trace_deflated_by_top_k_eigenvectors(
    case: tuple[Case, Tensor], store: torch.dtype | None
) -> None:
    c, h = case
    gen = torch.Generator().manual_seed(2)
    top = top_eigenvalues(
        c.op.matvec, c.layout, 3, generator=gen, basis_size=5, max_iters=300, store=store
    )
    assert all(v.dtype == (store or c.layout.dtype) for v in top.eigenvectors)
    blocks = block_indices(c.layout, {"first": c.names[:2], "last": c.names[-2:]})
    kw = {"max_samples": 60, "generator": gen, "blocks": blocks, "warn": False}
    tr = hutchinson_trace(c.op.matvec, c.layout, deflate=top.eigenvectors, **kw)
    assert tr.samples >= 10 and tr.stderr > 0
    assert abs(tr.trace - float(h.trace())) <= 3 * tr.stderr
    for name, idx in blocks.items():
        value, err = tr.blocks[name]
        assert abs(value - float(h[idx][:, idx].trace())) <= 3 * err
    plain = hutchinson_trace(
        c.op.matvec, c.layout, rtol=0.0, max_samples=40, generator=gen, warn=False
    )
    deflated = hutchinson_trace(
        c.op.matvec,
        c.layout,
        rtol=0.0,
        max_samples=40,
        generator=gen,
        warn=False,
        deflate=top.eigenvectors,
    )
    assert deflated.stderr < plain.stderr


def test_density_without_reorthogonalisation_keeps_the_moments() -> None:
    a, _ = _known()
    layout = _layout(40)
    # 60 steps on 40 dimensions: the basis loses orthogonality, ghosts appear
    dens = spectral_density(
        lambda v: a @ v,
        layout,
        starts=1,
        steps=60,
        generator=torch.Generator().manual_seed(5),
        reorthogonalize=False,
    )
    q = _rademacher(40, layout, torch.Generator().manual_seed(5)) / math.sqrt(40)
    for p in range(1, 7):  # Σ τ θ^p = qᵀ A^p q, the quadrature of this start
        want = float(q @ torch.linalg.matrix_power(a, p) @ q)
        assert dens.moment(p)[0] == pytest.approx(want, rel=1e-9, abs=1e-9), p


def test_bounded_blocks_and_preconditioned_against_exact(case: tuple[Case, Tensor]) -> None:
    c, h = case
    groups = {"a": c.names[:2], "b": c.names[2:4], "c": c.names[-2:]}
    blocks = block_indices(c.layout, groups)
    res = block_top_eigenvalues(
        c.op.matvec, c.layout, blocks, generator=torch.Generator().manual_seed(5), basis_size=4
    )
    for name, idx in blocks.items():
        exact = float(torch.linalg.eigvalsh(h[idx][:, idx])[-1])
        assert res[name].converged
        assert res[name].eigenvalues[0] == pytest.approx(exact, rel=1e-3)
    gen = torch.Generator().manual_seed(6)
    inverse = torch.rand(c.layout.numel, generator=gen, dtype=DTYPE) * 100 + 1
    s = inverse.sqrt()
    exact = float(torch.linalg.eigvalsh(s[:, None] * h * s[None, :])[-1])
    pre = top_eigenvalues(scaled_matvec(c.op.matvec, inverse), c.layout, 1, basis_size=5)
    assert pre.converged
    assert pre.eigenvalues[0] == pytest.approx(exact, rel=1e-3)


def _peak_copies(fn: Callable[[], object], n: int) -> float:
    return peak_allocated(fn) / (4 * n)


def test_bounded_solvers_allocate_their_basis_not_their_products() -> None:
    n = 200_000
    d = torch.linspace(-1.0, 2.0, n)
    d[:3] = torch.tensor([6.0, 4.0, 3.0])  # three separated top eigenvalues, then a bulk

    def top(basis: int, iters: int, tol: float) -> float:
        def run() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = top_eigenvalues(
                    lambda v: d * v, _layout(n, torch.float32), 3, max_iters=iters, tol=tol,
                    basis_size=basis,
                )  # fmt: skip
            found.append(res)

        return _peak_copies(run, n)

    found: list[TopEigResult] = []
    three = top(5, 300, 1e-5)
    res = found[-1]
    assert res.converged and res.iterations > 3 * 5  # every eigenvalue took restarts
    assert res.eigenvalues == pytest.approx([6.0, 4.0, 3.0], rel=1e-4)
    # basis + the k eigenvectors + the product and the start's draw (a few copies)
    assert three <= 5 + 3 + 4
    # tol=0: every product spent on the first eigenvalue, restarting in the same memory
    five, eight, longer = top(5, 60, 0.0), top(8, 60, 0.0), top(5, 150, 0.0)
    assert found[-1].iterations == 150
    assert eight - five == pytest.approx(3.0, abs=0.3)  # one copy per basis vector
    assert longer == pytest.approx(five, abs=0.3)  # more products, no more memory

    def density(reorth: bool) -> float:
        return _peak_copies(
            lambda: spectral_density(lambda v: d * v, _layout(n, torch.float32), starts=1,
                                     steps=40, reorthogonalize=reorth),
            n,
        )  # fmt: skip

    assert density(False) <= 6 < 40 < density(True)


def test_float32_eigenvectors_of_millions_of_entries_deflate_a_trace() -> None:
    n = 2_000_000
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=gen)
    d[:4] = torch.tensor([5.0, 4.5, 4.0, 3.9])
    layout = _layout(n, torch.float32)
    top = top_eigenvalues(lambda v: d * v, layout, 3, max_iters=300, basis_size=8, generator=gen)
    assert top.converged and top.eigenvalues == pytest.approx([5.0, 4.5, 4.0], rel=1e-3)
    vectors = torch.stack(top.eigenvectors).double()
    assert torch.allclose(vectors @ vectors.T, torch.eye(3, dtype=DTYPE), atol=1e-5)
    tr = hutchinson_trace(lambda v: d * v, layout, deflate=top.eigenvectors, generator=gen)
    assert abs(tr.trace - float(d.double().sum())) <= 3 * tr.stderr
