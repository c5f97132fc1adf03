"""Theorems 4.1 / 4.2 on real BatchNorm layers; the left sides come from autograd, not formulas."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_bn.diagnostics.bounds import (
    batchnorm_input_grad,
    theorem41_bound,
    theorem42_terms,
)
from lightning_bn.layers import BatchNorm

DTYPE = torch.float64
BN_KINDS = ["torch", "ours"]


def _bn(kind: str, channels: int, dim: int, eps: float) -> nn.Module:
    if kind == "ours":
        return BatchNorm(channels, eps=eps)
    return (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(channels, eps=eps)


def _mlp(kind: str, eps: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(5, 6), _bn(kind, 6, 1, eps), nn.Tanh(),
        nn.Linear(6, 4), _bn(kind, 4, 1, eps), nn.ReLU(),
        nn.Linear(4, 3),
    )  # fmt: skip


def _cnn(kind: str, eps: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), _bn(kind, 3, 2, eps), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1), _bn(kind, 4, 2, eps), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    )  # fmt: skip


NETS: dict[str, tuple[Callable[[str, float], nn.Sequential], tuple[int, ...]]] = {
    "mlp": (_mlp, (5,)),
    "cnn": (_cnn, (2, 5, 5)),
}

Captured = tuple[nn.Module, Tensor, Tensor, Tensor]  # (layer, y, ∂L/∂y, ∂L/∂z)


def _bn_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNorm))]


def _randomise_affine(net: nn.Module, gen: torch.Generator) -> None:
    # γ away from 1 (and of both signs), so that a formula dropping γ or squaring it wrongly fails
    with torch.no_grad():
        for m in _bn_layers(net):
            _weight(m, detach=False).copy_(
                torch.randn(_weight(m).shape, generator=gen, dtype=DTYPE) * 1.5
            )
            _bias(m, detach=False).copy_(torch.randn(_bias(m).shape, generator=gen, dtype=DTYPE))


def _run(net: nn.Module, in_shape: tuple[int, ...], gen: torch.Generator, n: int) -> list[Captured]:
    """One forward/backward on a random batch; capture y, ∂L/∂y, ∂L/∂z of every BN layer."""
    store: list[tuple[nn.Module, Tensor, Tensor]] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        args[0].retain_grad()
        out.retain_grad()
        store.append((module, args[0], out))

    handles = [m.register_forward_hook(hook) for m in _bn_layers(net)]
    try:
        x = torch.randn((n, *in_shape), generator=gen, dtype=DTYPE) * 2 + 0.5
        target = torch.randn((n, 3), generator=gen, dtype=DTYPE)
        out = net(x)
        loss = nn.functional.mse_loss(out, target) + 0.1 * out.pow(4).mean()
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    captured = []
    for module, y, z in store:
        assert y.grad is not None and z.grad is not None
        captured.append((module, y.detach(), y.grad, z.grad))
    assert len(captured) == len(_bn_layers(net)) == 2
    return captured


def _weight(module: nn.Module, detach: bool = True) -> Tensor:
    w = module.weight
    assert isinstance(w, Tensor)
    return w.detach() if detach else w


def _bias(module: nn.Module, detach: bool = True) -> Tensor:
    b = module.bias
    assert isinstance(b, Tensor)
    return b.detach() if detach else b


def _eps(module: nn.Module) -> float:
    eps = module.eps
    assert isinstance(eps, float)
    return eps


def _literal_rhs(y: Tensor, g: Tensor, gamma: Tensor, eps: float) -> Tensor:
    """spec §3 term by term, for (N, C) or (N, C, H, W) tensors."""
    dims = [0, *range(2, y.dim())]
    m = y.numel() // y.shape[1]
    var, mean = torch.var_mean(y, dim=dims, correction=0, keepdim=True)
    yhat = (y - mean) / torch.sqrt(var + eps)
    sq = g.pow(2).sum(dims)
    ones = g.sum(dims).pow(2) / m
    along = (g * yhat).sum(dims).pow(2) / m
    return gamma**2 / (var.flatten() + eps) * (sq - ones - along)


# --- Theorem 4.1 ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("net_name", list(NETS))
def test_theorem41_holds_on_every_layer_over_50_batches(kind: str, net_name: str) -> None:
    build, in_shape = NETS[net_name]
    gen = torch.Generator().manual_seed(41)
    with torch.random.fork_rng():  # the same initial weights whatever ran before
        torch.manual_seed(41)
        net = build(kind, 1e-5).to(DTYPE).train()
    _randomise_affine(net, gen)
    ratios = []
    for _ in range(50):
        net.zero_grad()
        for module, y, grad_y, grad_z in _run(net, in_shape, gen, n=8):
            res = theorem41_bound(y, grad_y, grad_z, _weight(module), _eps(module))
            assert res.lhs.shape == res.rhs.shape == (y.shape[1],)
            torch.testing.assert_close(
                res.rhs, _literal_rhs(y, grad_z, _weight(module), _eps(module)), rtol=1e-8, atol=0
            )
            assert bool((res.lhs <= res.rhs * (1 + 1e-5) + 1e-12).all()), res.channel_ratio
            ratios.append(res.ratio)
    assert max(ratios) <= 1 + 1e-5
    # eps = 1e-5 against unit-scale variances: the bound is tight, not merely true
    assert min(ratios) > 0.99


def test_theorem41_fails_with_the_one_over_sqrt_m_variant() -> None:
    # spec §3: the 1/√m variant of the subtracted terms is not a bound; our check must see that
    gen = torch.Generator().manual_seed(3)
    net = _mlp("torch", 1e-5).to(DTYPE).train()
    _randomise_affine(net, gen)
    module, y, grad_y, grad_z = _run(net, (5,), gen, n=16)[0]
    m = y.shape[0]
    res = theorem41_bound(y, grad_y, grad_z, _weight(module), _eps(module))
    var, mean = torch.var_mean(y, dim=0, correction=0)
    yhat = (y - mean) / torch.sqrt(var + _eps(module))
    g = grad_z
    wrong = (_weight(module) ** 2 / (var + _eps(module))) * (
        g.pow(2).sum(0) - g.sum(0) ** 2 / math.sqrt(m) - (g * yhat).sum(0) ** 2 / math.sqrt(m)
    )
    assert res.lhs.sum() > wrong.sum()


@pytest.mark.parametrize("net_name", list(NETS))
def test_theorem41_is_an_identity_for_eps_zero(net_name: str) -> None:
    # torch.nn.BatchNorm refuses eps=0 in training; our layer allows it
    build, in_shape = NETS[net_name]
    gen = torch.Generator().manual_seed(0)
    net = build("ours", 0.0).to(DTYPE).train()
    _randomise_affine(net, gen)
    for _ in range(50):
        net.zero_grad()
        for module, y, grad_y, grad_z in _run(net, in_shape, gen, n=8):
            res = theorem41_bound(y, grad_y, grad_z, _weight(module), 0.0)
            assert res.ratio == pytest.approx(1.0, abs=1e-4)
            torch.testing.assert_close(res.lhs, res.rhs, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_exact_gradient_formula_matches_autograd(kind: str, net_name: str, eps: float) -> None:
    build, in_shape = NETS[net_name]
    gen = torch.Generator().manual_seed(7)
    net = build(kind, eps).to(DTYPE).train()
    _randomise_affine(net, gen)
    for module, y, grad_y, grad_z in _run(net, in_shape, gen, n=6):
        formula = batchnorm_input_grad(y, grad_z, _weight(module), eps)
        torch.testing.assert_close(formula, grad_y, rtol=1e-9, atol=1e-12)


def test_channels_last_layout_and_no_affine() -> None:
    gen = torch.Generator().manual_seed(5)
    bn = BatchNorm(3, eps=1e-3, affine=False, channels_last=True).to(DTYPE).train()
    y = (torch.randn(4, 5, 3, generator=gen, dtype=DTYPE) * 3).requires_grad_(True)
    z = bn(y)
    z.retain_grad()
    (torch.sin(z) * torch.arange(60, dtype=DTYPE).view(4, 5, 3)).sum().backward()
    assert y.grad is not None and z.grad is not None
    torch.testing.assert_close(
        batchnorm_input_grad(y, z.grad, None, 1e-3, channel_dim=-1), y.grad, rtol=1e-9, atol=1e-12
    )
    res = theorem41_bound(y.detach(), y.grad, z.grad, None, 1e-3, channel_dim=-1)
    assert res.lhs.shape == (3,)
    assert 0.9 < res.ratio <= 1 + 1e-9
    # the same numbers with the channel moved to dimension 1
    moved = theorem41_bound(
        y.detach().movedim(-1, 1), y.grad.movedim(-1, 1), z.grad.movedim(-1, 1), None, 1e-3
    )
    torch.testing.assert_close(moved.rhs, res.rhs)


def test_zero_right_side_channels() -> None:
    gen = torch.Generator().manual_seed(9)
    y = torch.randn(10, 3, generator=gen, dtype=DTYPE)
    g = torch.randn(10, 3, generator=gen, dtype=DTYPE)
    gamma = torch.tensor([1.0, 0.0, 2.0], dtype=DTYPE)
    grad_y = batchnorm_input_grad(y, g, gamma, 1e-5)
    res = theorem41_bound(y, grad_y, g, gamma, 1e-5)
    assert res.lhs[1] == 0 and res.rhs[1] == 0  # γ = 0: nothing passes
    assert math.isnan(float(res.channel_ratio[1]))
    assert bool(torch.isfinite(res.channel_ratio[[0, 2]]).all())
    assert res.ratio == pytest.approx(float(res.lhs.sum() / res.rhs.sum()))
    assert 0.99 < res.ratio <= 1.0
    # eps = 0 and g in span{1, ŷ}: both sides vanish (the split form keeps rounding at ~1e-30)
    var, mean = torch.var_mean(y, dim=0, correction=0)
    yhat = (y - mean) / torch.sqrt(var)
    in_span = 2.0 + 3.0 * yhat
    res0 = theorem41_bound(y, batchnorm_input_grad(y, in_span, None, 0.0), in_span, None, 0.0)
    assert float(res0.rhs.max()) < 1e-20 and float(res0.lhs.max()) < 1e-20
    # eps > 0: only a constant g is lost entirely; ŷ still leaks through (ε/(σ²+ε) of it)
    const = torch.full_like(y, 2.0)
    res1 = theorem41_bound(y, batchnorm_input_grad(y, const, None, 0.1), const, None, 0.1)
    assert float(res1.rhs.max()) < 1e-20 and float(res1.lhs.max()) < 1e-20
    res2 = theorem41_bound(y, batchnorm_input_grad(y, yhat, None, 0.1), yhat, None, 0.1)
    assert bool((res2.rhs > 1e-3).all()) and bool((res2.lhs < res2.rhs).all())
    # no gradient at all: 0/0 is undefined, not a violation
    zeros = torch.zeros_like(y)
    assert math.isnan(theorem41_bound(y, zeros, zeros, gamma).ratio)
    # a left side with a zero right side is a violation, reported as inf
    assert theorem41_bound(y, torch.ones_like(y), zeros, gamma).ratio == math.inf


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(2, 12),
    c=st.integers(1, 4),
    eps=st.sampled_from([0.0, 1e-8, 1e-3, 0.1, 10.0]),
    scale=st.sampled_from([1e-2, 1.0, 1e2]),
)
def test_theorem41_formula_property(seed: int, m: int, c: int, eps: float, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(m, c, generator=gen, dtype=DTYPE) * scale
    g = torch.randn(m, c, generator=gen, dtype=DTYPE)
    gamma = torch.randn(c, generator=gen, dtype=DTYPE)
    res = theorem41_bound(y, batchnorm_input_grad(y, g, gamma, eps), g, gamma, eps)
    # rounding is relative to (γ/s)²‖g‖², the size of the terms that cancel
    var = y.var(dim=0, correction=0)
    size = gamma**2 / (var + eps) * g.pow(2).sum(0)
    assert bool((res.rhs >= 0).all())
    assert bool((res.lhs <= res.rhs + 1e-12 * size).all())
    if eps == 0.0:
        assert bool(((res.lhs - res.rhs).abs() <= 1e-10 * size).all())


def test_bad_arguments() -> None:
    y = torch.randn(4, 3)
    with pytest.raises(ValueError, match="grad_z"):
        theorem41_bound(y, y, torch.randn(4, 2))
    with pytest.raises(ValueError, match="grad_y"):
        theorem41_bound(y, torch.randn(3, 3), y)
    with pytest.raises(ValueError, match="weight"):
        theorem41_bound(y, y, y, torch.ones(4))
    with pytest.raises(ValueError, match="eps"):
        batchnorm_input_grad(y, y, None, -1.0)
    with pytest.raises(ValueError, match="2 dimensions"):
        batchnorm_input_grad(torch.randn(4), torch.randn(4))


# --- Theorem 4.2 ------------------------------------------------------------------------------
def _downstream_of(
    net: nn.Sequential, index: int, x: Tensor, target: Tensor
) -> tuple[Tensor, nn.Module, Callable[[Tensor], Tensor]]:
    """The BN layer at ``index``: its input on ``x`` and the loss as a function of its output."""
    before, layer, after = net[:index], net[index], net[index + 1 :]
    y = before(x).detach()

    def downstream(z: Tensor) -> Tensor:
        out = after(z)
        return nn.functional.mse_loss(out, target) + 0.1 * out.pow(4).mean()

    return y, layer, downstream


@pytest.mark.parametrize("net_name", list(NETS))
def test_theorem42_is_an_identity_for_eps_zero(net_name: str) -> None:
    build, in_shape = NETS[net_name]
    gen = torch.Generator().manual_seed(42)
    net = build("ours", 0.0).to(DTYPE).train()
    _randomise_affine(net, gen)
    x = torch.randn((8, *in_shape), generator=gen, dtype=DTYPE)
    target = torch.randn(8, 3, generator=gen, dtype=DTYPE)
    for index in (1, 4):
        y, layer, downstream = _downstream_of(net, index, x, target)
        res = theorem42_terms(y, downstream, _weight(layer), _bias(layer), 0.0)
        assert res.lhs.shape == (y.shape[1],)
        scale = res.hessian_term.abs() + res.correction.abs()
        assert float(scale.max()) > 0  # a channel may be dead (all-off ReLU), not all of them
        torch.testing.assert_close(res.lhs, res.rhs, rtol=1e-7, atol=1e-9 * float(scale.max()))


def test_theorem42_lhs_against_a_brute_force_hessian() -> None:
    # lhs_j = ĝ_jᵀ ∇²_{y_j} L ĝ_j with the full Hessian of the whole layer + downstream map
    gen = torch.Generator().manual_seed(1)
    net = _mlp("ours", 0.2).to(DTYPE).train()
    _randomise_affine(net, gen)
    x = torch.randn(6, 5, generator=gen, dtype=DTYPE)
    target = torch.randn(6, 3, generator=gen, dtype=DTYPE)
    y, layer, downstream = _downstream_of(net, 1, x, target)
    res = theorem42_terms(y, downstream, _weight(layer), _bias(layer), 0.2)

    def full(yy: Tensor) -> Tensor:
        out = layer(yy)
        assert isinstance(out, Tensor)
        return downstream(out)

    hess = torch.autograd.functional.hessian(full, y)  # (6, 6, 6, 6)
    yl = y.clone().requires_grad_(True)
    (ghat,) = torch.autograd.grad(full(yl), yl)
    for j in range(y.shape[1]):
        block = hess[:, j, :, j]
        assert float(ghat[:, j] @ block @ ghat[:, j]) == pytest.approx(float(res.lhs[j]), rel=1e-8)


def test_theorem42_is_not_an_inequality_for_positive_eps() -> None:
    # documented: with eps > 0 both sides differ by O(eps/σ²) terms of either sign
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(16, 3, 2, 2, generator=gen, dtype=DTYPE)
    w = torch.randn(3, 3, generator=gen, dtype=DTYPE)
    gamma = torch.randn(3, generator=gen, dtype=DTYPE)

    def downstream(z: Tensor) -> Tensor:
        return torch.tanh(torch.einsum("nchw,dc->ndhw", z, w)).pow(2).sum() + 0.1 * z.pow(3).sum()

    res = theorem42_terms(y, downstream, gamma, None, 0.5)
    gap = res.lhs - res.rhs
    assert float(gap.max()) > 0
    small = theorem42_terms(y, downstream, gamma, None, 1e-9)
    torch.testing.assert_close(small.lhs, small.rhs, rtol=1e-6, atol=1e-9)
