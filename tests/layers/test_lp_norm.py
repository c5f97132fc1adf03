from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_bn import BatchNorm, L1Norm, L2Norm, LinfNorm, LpNorm


def _reference(x: torch.Tensor, p: float, eps: float, centered: bool = True) -> torch.Tensor:
    """Spec §5 written out per channel with a Python loop (channel dim 1)."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        v = x[:, c]
        mu = v.mean()
        dev = (v - mu) if centered else v
        if math.isinf(p):
            divisor = dev.abs().max() + eps
        else:
            divisor = (dev.abs().pow(p).mean() + eps) ** (1 / p)
        out[:, c] = (v - mu) / divisor
    return out


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("shape", [(16, 3), (6, 3, 5), (4, 3, 4, 4), (2, 3, 2, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("centered", [True, False])
def test_train_matches_formula(
    p: float, shape: tuple[int, ...], dtype: torch.dtype, centered: bool
) -> None:
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    layer = LpNorm(3, p=p, affine=False, centered_divisor=centered, dtype=dtype)
    torch.testing.assert_close(layer(x), _reference(x, p, 1e-5, centered))


@pytest.mark.parametrize(("cls", "p"), [(L1Norm, 1.0), (L2Norm, 2.0), (LinfNorm, math.inf)])
def test_fixed_p_classes(cls: type[LpNorm], p: float) -> None:
    layer = cls(5)
    assert layer.p == p
    with pytest.raises(TypeError, match="fixes p"):
        cls(5, p=2)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_gradcheck(p: float) -> None:
    torch.manual_seed(0)
    layer = LpNorm(3, p=p, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    w = layer.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda weight: torch.func.functional_call(layer, {"weight": weight}, (x.detach(),)), (w,)
    )


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics(p: float, momentum: float | None) -> None:
    layer = LpNorm(2, p=p, momentum=momentum, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    mean, div = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for step in range(1, 5):
        x = torch.randn(10, 2, generator=gen, dtype=torch.float64) * step + step
        layer(x)
        mu = x.mean(0)
        dev = (x - mu).abs()
        s = dev.amax(0) if math.isinf(p) else dev.pow(p).mean(0).pow(1 / p)
        f = momentum if momentum is not None else 1 / step
        mean, div = (1 - f) * mean + f * mu, (1 - f) * div + f * s
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_divisor, div)
    assert int(layer.num_batches_tracked) == 4
    layer.eval()
    x = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    d = div + 1e-5 if math.isinf(p) else (div.pow(p) + 1e-5).pow(1 / p)
    torch.testing.assert_close(layer(x), (x - mean) / d)


def test_bad_p() -> None:
    with pytest.raises(ValueError, match="Expected argument `p` to be one of 1, 2, inf, but got 3"):
        LpNorm(4, p=3)
    assert LpNorm(4, p="inf").p == math.inf


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 12),
    c=st.integers(1, 5),
    scale=st.floats(0.1, 10.0),
    shift=st.floats(-5.0, 5.0),
    seed=st.integers(0, 2**16),
)
def test_l2_equals_batchnorm(n: int, c: int, scale: float, shift: float, seed: int) -> None:
    x = torch.randn(n, c, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = x * scale + shift
    torch.testing.assert_close(
        L2Norm(c, dtype=torch.float64)(x), BatchNorm(c, dtype=torch.float64)(x)
    )
    torch.testing.assert_close(
        L2Norm(c, dtype=torch.float64)(x), nn.BatchNorm1d(c, dtype=torch.float64)(x)
    )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 12),
    seed=st.integers(0, 2**16),
    gamma=st.lists(st.floats(-3.0, 3.0), min_size=3, max_size=3),
    beta=st.lists(st.floats(-3.0, 3.0), min_size=3, max_size=3),
)
def test_linf_within_affine_bounds(
    n: int, seed: int, gamma: list[float], beta: list[float]
) -> None:
    x = torch.randn(n, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 5
    layer = LinfNorm(3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(gamma, dtype=torch.float64))
        layer.bias.copy_(torch.tensor(beta, dtype=torch.float64))
    y = layer(x).detach()
    g, b = torch.tensor(gamma, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
    # |ŷ| ≤ 1, so every output lies in [β − |γ|, β + |γ|]
    lo, hi = (b - g.abs()).view(1, 3, 1), (b + g.abs()).view(1, 3, 1)
    assert bool(((y >= lo - 1e-12) & (y <= hi + 1e-12)).all())


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["bn", "l1", "l2", "linf"]),
    seed=st.integers(0, 2**16),
    n=st.integers(1, 9),
)
def test_eval_is_batch_independent(kind: str, seed: int, n: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layer: nn.Module = {"bn": BatchNorm, "l1": L1Norm, "l2": L2Norm, "linf": LinfNorm}[kind](
        4, dtype=torch.float64
    )
    for _ in range(3):
        layer(torch.randn(8, 4, generator=gen, dtype=torch.float64) * 3 + 1)
    layer.eval()
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    other = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    together = layer(torch.cat([x, other]))[:n]
    torch.testing.assert_close(layer(x), together)
    per_sample = torch.cat([layer(x[i : i + 1]) for i in range(n)])
    torch.testing.assert_close(layer(x), per_sample)
