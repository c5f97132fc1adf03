"""Top-k eigenvalues, trace, density, diagonal blocks and preconditioned sharpness against the
exact Hessian (``torch.autograd.functional.hessian`` and ``eigvalsh`` in float64) of train-mode
networks with BatchNorm and dropout (the masks replayed from the step's RNG state)."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_bn.diagnostics.density import spectral_density
from lightning_bn.diagnostics.eigen import ConvergenceWarning, top_hessian_eigenvalue
from lightning_bn.diagnostics.hvp import HessianVectorProduct
from lightning_bn.diagnostics.krylov import AddMatvec
from lightning_bn.diagnostics.paramvec import FlatLayout
from lightning_bn.diagnostics.preconditioned import (
    optimizer_preconditioner,
    scaled_matvec,
    stability_threshold,
)
from lightning_bn.diagnostics.spectrum import (
    block_indices,
    block_top_eigenvalues,
    hutchinson_trace,
    top_eigenvalues,
)
from lightning_bn.probe import Probe, RNGState, StepRecord

DTYPE = torch.float64


def _loss(module: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 3),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Dropout(0.2),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    )


class Case:
    """A train-mode network, a step (batch + RNG state), its Hessian-vector products through the
    probe, and the exact Hessian of the same function by brute force on a deep copy."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = (_mlp() if kind == "mlp" else _cnn()).to(DTYPE).train()
        shape = (16, 5) if kind == "mlp" else (8, 1, 5, 5)
        self.batch = (torch.randn(shape, dtype=DTYPE), torch.randint(0, 3, (shape[0],)))
        self.step = StepRecord(batch=self.batch, rng=RNGState.capture())
        self.probe = Probe(self.model, _loss)
        params = self.probe.parameters()
        self.op = HessianVectorProduct(
            lambda p: self.probe.loss({**params, **p}, self.step), params
        )
        self.layout = self.op.layout
        self.names = list(params)

    def hessian(self) -> Tensor:
        net = copy.deepcopy(self.model)
        params = dict(net.named_parameters())
        shapes = [params[n].shape for n in self.names]
        flat = torch.cat([params[n].detach().reshape(-1) for n in self.names])
        buffers = {k: v.clone() for k, v in net.named_buffers()}

        def loss_of(w: Tensor) -> Tensor:
            tensors, offset = {}, 0
            for n, s in zip(self.names, shapes, strict=True):
                tensors[n] = w[offset : offset + s.numel()].view(s)
                offset += s.numel()
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.step.rng.cpu)  # the step's dropout masks
                fresh = {k: b.clone() for k, b in buffers.items()}
                out = functional_call(net, (tensors, fresh), (self.batch[0],))
            return nn.functional.cross_entropy(out, self.batch[1])

        return torch.autograd.functional.hessian(loss_of, flat)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request: pytest.FixtureRequest) -> tuple[Case, Tensor]:
    c = Case(request.param)
    return c, c.hessian()


def test_top_k_to_1e_3_relative(case: tuple[Case, Tensor]) -> None:
    c, h = case
    exact = torch.linalg.eigvalsh(h).flip(0)
    res = top_eigenvalues(c.op.matvec, c.layout, 4, generator=torch.Generator().manual_seed(1))
    assert res.converged
    for got, want in zip(res.eigenvalues, exact[:4].tolist(), strict=True):
        assert got == pytest.approx(want, rel=1e-3)
    for value, vector, residual in zip(
        res.eigenvalues, res.eigenvectors, res.residuals, strict=True
    ):
        # the residual it reports is the true one
        true = torch.linalg.vector_norm(h @ vector - value * vector)
        assert float(true) == pytest.approx(residual, rel=1e-3, abs=1e-10)
    # warm-started from its own vectors at the same point: fewer products, same values
    warm = top_eigenvalues(c.op.matvec, c.layout, 4, res.eigenvectors)
    assert warm.converged and warm.iterations < res.iterations
    assert warm.eigenvalues == pytest.approx(res.eigenvalues, rel=1e-3)


def test_top_k_capped_says_so(case: tuple[Case, Tensor]) -> None:
    c, _ = case
    with pytest.warns(ConvergenceWarning, match="did not converge within 5"):
        res = top_eigenvalues(c.op.matvec, c.layout, 3, max_iters=5, tol=1e-9)
    assert not res.converged and res.iterations == 5


@pytest.mark.parametrize("deflate", [False, True])
def test_trace_within_three_standard_errors(case: tuple[Case, Tensor], deflate: bool) -> None:
    c, h = case
    gen = torch.Generator().manual_seed(2)
    top = top_eigenvalues(c.op.matvec, c.layout, 3, generator=gen)
    groups = {"first": c.names[:2], "last": c.names[-2:]}
    blocks = block_indices(c.layout, groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a saddle: the trace is small
        tr = hutchinson_trace(
            c.op.matvec,
            c.layout,
            max_samples=60,
            generator=gen,
            deflate=top.run if deflate else None,
            blocks=blocks,
        )
    assert tr.samples >= 10 and tr.stderr > 0
    assert abs(tr.trace - float(h.trace())) <= 3 * tr.stderr
    for name, idx in blocks.items():
        value, err = tr.blocks[name]
        assert abs(value - float(h[idx][:, idx].trace())) <= 3 * err


def test_deflation_reduces_the_standard_error(case: tuple[Case, Tensor]) -> None:
    c, _ = case
    gen = torch.Generator().manual_seed(3)
    top = top_eigenvalues(c.op.matvec, c.layout, 3, generator=gen)
    kw: dict[str, Any] = {"rtol": 0.0, "max_samples": 40, "warn": False}
    plain = hutchinson_trace(c.op.matvec, c.layout, generator=gen, **kw)
    deflated = hutchinson_trace(c.op.matvec, c.layout, generator=gen, deflate=top.run, **kw)
    assert deflated.stderr < plain.stderr


def _spd_quadratic(n: int, gen: torch.Generator) -> tuple[Tensor, FlatLayout]:
    """A random symmetric positive definite ``A`` (``n × n``, drawn from ``gen``) and the layout
    of the quadratic ``w ↦ wᵀAw / 2`` (whose Hessian is ``A``)."""
    a = torch.randn(n, n, generator=gen, dtype=DTYPE)
    a = a @ a.T / n + torch.eye(n, dtype=DTYPE)
    layout = HessianVectorProduct(
        lambda p: 0.5 * p["w"] @ a @ p["w"], {"w": torch.ones(n, dtype=DTYPE)}
    ).layout
    return a, layout


def test_trace_of_a_known_operator_stops_on_its_standard_error() -> None:
    gen = torch.Generator().manual_seed(0)
    a, layout = _spd_quadratic(50, gen)
    tr = hutchinson_trace(lambda v: a @ v, layout, rtol=0.01, max_samples=500, generator=gen)
    assert tr.converged and tr.stderr <= 0.01 * abs(tr.trace)
    assert abs(tr.trace - float(a.trace())) <= 3 * tr.stderr


def test_default_generator_draws_new_probes_and_starts() -> None:
    """Without a generator the probes (and SLQ starts) come from one seeded stream: they differ
    from each other, so the standard error is an estimate, and the result repeats exactly."""
    a, layout = _spd_quadratic(30, torch.Generator().manual_seed(1))
    tr = hutchinson_trace(lambda v: a @ v, layout, rtol=0.0, min_samples=20, max_samples=20)
    assert tr.stderr > 0.0
    assert abs(tr.trace - float(a.trace())) <= 4 * tr.stderr
    again = hutchinson_trace(lambda v: a @ v, layout, rtol=0.0, min_samples=20, max_samples=20)
    assert again.trace == tr.trace
    dens = spectral_density(lambda v: a @ v, layout, starts=2, steps=5)
    one, two = dens.nodes
    assert one.shape == two.shape and not torch.allclose(one, two)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_density_moments_match_the_exact_spectrum(
    case: tuple[Case, Tensor], reorthogonalize: bool
) -> None:
    c, h = case
    eig = torch.linalg.eigvalsh(h)
    gen = torch.Generator().manual_seed(4)
    dens = spectral_density(
        c.op.matvec, c.layout, starts=12, steps=25, generator=gen, reorthogonalize=reorthogonalize
    )
    for p in (1, 2):
        value, err = dens.moment(p)
        assert abs(value - float((eig**p).mean())) <= 3 * err, p
    masses, lo, hi = dens.histogram(bins=40, sigma=0.01)
    assert lo < float(eig.min()) and hi > float(eig.max())
    assert float(masses.sum()) == pytest.approx(1.0, abs=1e-3)
    # the histogram's mean is the nodes' mean to within a bin width
    centres = torch.linspace(lo, hi, 41, dtype=DTYPE)
    centres = (centres[1:] + centres[:-1]) / 2
    assert float((masses * centres).sum()) == pytest.approx(dens.moment(1)[0], abs=(hi - lo) / 40)


def test_density_is_exact_when_lanczos_spans_everything() -> None:
    eigs = torch.tensor([3.0, -1.0, 0.5, 2.0, 2.0], dtype=DTYPE)
    a = torch.diag(eigs)
    layout = HessianVectorProduct(
        lambda p: 0.5 * p["w"] @ a @ p["w"], {"w": torch.ones(5, dtype=DTYPE)}
    ).layout
    dens = spectral_density(lambda v: a @ v, layout, starts=1, steps=10)
    # a Rademacher start has equal weight on every coordinate: the exact distribution
    assert dens.converged
    assert dens.moment(1)[0] == pytest.approx(float(eigs.mean()), rel=1e-12)
    assert dens.moment(3)[0] == pytest.approx(float((eigs**3).mean()), rel=1e-12)


def test_blocks_against_the_exact_diagonal_blocks(case: tuple[Case, Tensor]) -> None:
    c, h = case
    groups = {"a": c.names[:2], "b": c.names[2:4], "c": c.names[-2:]}
    blocks = block_indices(c.layout, groups)
    res = block_top_eigenvalues(
        c.op.matvec, c.layout, blocks, generator=torch.Generator().manual_seed(5)
    )
    for name, idx in blocks.items():
        exact = float(torch.linalg.eigvalsh(h[idx][:, idx])[-1])
        assert res[name].converged
        assert res[name].eigenvalues[0] == pytest.approx(exact, rel=1e-3)


def test_adam_preconditioned_sharpness_against_exact(case: tuple[Case, Tensor]) -> None:
    c, h = case
    params = dict(c.model.named_parameters())
    opt = torch.optim.Adam(
        [
            {"params": [params[n] for n in c.names[:2]], "lr": 0.02},
            {"params": [params[n] for n in c.names[2:]]},
        ],
        lr=0.01,
        betas=(0.9, 0.99),
        eps=1e-3,
    )
    gen = torch.Generator().manual_seed(6)
    for n in c.names:  # a known state: step 7, a second moment of known values
        p = params[n]
        opt.state[p] = {
            "step": torch.tensor(7.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.rand(p.shape, generator=gen, dtype=DTYPE) * 1e-3,
        }
    pre = optimizer_preconditioner(opt, {n: params[n] for n in c.names}, c.layout)
    assert pre is not None and not pre.identity
    assert pre.threshold == pytest.approx(38 / 0.02)  # the first group's η
    diag = []
    for i, n in enumerate(c.names):  # brute force: P = sqrt(v / (1 - β₂^t)) + ε, lr ratio folded
        v = opt.state[params[n]]["exp_avg_sq"].reshape(-1)
        ratio = 1.0 if i < 2 else 0.5  # η_p / η
        diag.append(ratio / ((v / (1 - 0.99**7)).sqrt() + 1e-3))
    torch.testing.assert_close(pre.inverse, torch.cat(diag), rtol=1e-12, atol=0.0)
    s = torch.cat(diag).sqrt()
    exact = float(torch.linalg.eigvalsh(s[:, None] * h * s[None, :])[-1])
    res = top_eigenvalues(scaled_matvec(c.op.matvec, pre.inverse), c.layout, 1)
    assert res.converged
    assert res.eigenvalues[0] == pytest.approx(exact, rel=1e-3)
    # the product scaled inside the backward pass, added into the recurrence's vector
    root = pre.inverse.sqrt()

    def scaled(v: Tensor, into: Tensor | None) -> Tensor:
        return c.op.matvec(v, into, accumulate=into is not None, scale=root)

    res = top_eigenvalues(AddMatvec(scaled), c.layout, 1, basis_size=0)
    assert res.converged
    assert res.eigenvalues[0] == pytest.approx(exact, rel=1e-3)


def test_stability_thresholds() -> None:
    w = [nn.Parameter(torch.zeros(2))]
    assert stability_threshold(torch.optim.SGD(w, lr=0.1)) == pytest.approx(20.0)
    assert stability_threshold(torch.optim.SGD(w, lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    nesterov = torch.optim.SGD(w, lr=0.1, momentum=0.5, nesterov=True)
    assert stability_threshold(nesterov) == pytest.approx(2 * 1.5 / (0.1 * 2.0))
    assert stability_threshold(torch.optim.AdamW(w, lr=1e-3)) == pytest.approx(38_000.0)
    assert stability_threshold(torch.optim.RMSprop(w, lr=0.01)) == pytest.approx(200.0)
    with pytest.raises(TypeError, match="Expected an optimiser of type SGD"):
        stability_threshold(torch.optim.Adagrad(w, lr=0.1))


def test_adam_without_state_has_no_preconditioner(case: tuple[Case, Tensor]) -> None:
    c, _ = case
    params = dict(c.model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=0.01)
    assert optimizer_preconditioner(opt, params, c.layout) is None
    sgd = torch.optim.SGD(params.values(), lr=0.01)
    pre = optimizer_preconditioner(sgd, params, c.layout)
    assert pre is not None and pre.identity and bool((pre.inverse == 1).all())


# --- the plain function at its defaults ---------------------------------------------------------
def _tanh_mlp(bn: bool) -> nn.Module:
    layers: list[nn.Module] = []
    for cin, cout in ((10, 16), (16, 16)):
        layers += [nn.Linear(cin, cout), *([nn.BatchNorm1d(cout)] if bn else []), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(16, 4))


@pytest.mark.parametrize("kind", ["mlp", "mlp_bn", "cnn_bn"])
def test_top_hessian_eigenvalue_defaults_agree_with_exact_or_say_not_converged(kind: str) -> None:
    torch.manual_seed(11)
    if kind == "cnn_bn":
        model: nn.Module = _cnn()
        x = torch.randn(8, 1, 5, 5)
    else:
        model = _tanh_mlp(kind == "mlp_bn")
        x = torch.randn(32, 10)
    model.train()
    y = torch.randint(0, 3, (x.shape[0],))
    c = Case.__new__(Case)  # the float32 model as trained, the exact Hessian in float64
    c.model, c.batch, c.step = model, (x, y), StepRecord(batch=(x, y), rng=RNGState.capture())
    c.probe = Probe(model, _loss)
    params = c.probe.parameters()
    c.names = list(params)
    op = HessianVectorProduct(lambda p: c.probe.loss({**params, **p}, c.step), params)
    double = Case.__new__(Case)
    double.__dict__ = {**c.__dict__, "model": copy.deepcopy(model).double()}
    double.batch = (x.double(), y)
    eig = torch.linalg.eigvalsh(double.hessian())
    dominant = float(eig[eig.abs().argmax()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = top_hessian_eigenvalue(op, None)
    said = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    assert said == (not res.converged)
    if res.converged:
        assert res.eigenvalue == pytest.approx(dominant, rel=1e-3)
    if kind == "cnn_bn":  # the case power iteration got wrong: dominant negative or a small gap
        second = sorted(eig.abs().tolist())[-2]
        assert dominant < 0 or second > 0.9 * abs(dominant), (dominant, second)


def test_nan_is_not_converged() -> None:
    layout = HessianVectorProduct(lambda p: p["w"].sum(), {"w": torch.ones(3, dtype=DTYPE)}).layout
    with pytest.warns(ConvergenceWarning):
        res = top_eigenvalues(lambda v: v * math.nan, layout, 1)
    assert not res.converged and math.isnan(res.eigenvalues[0])
