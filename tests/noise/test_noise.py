"""The noisy-BatchNorm sampler against the recipe of spec §4 (scipy.stats as the reference)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from scipy import stats

from lightning_bn.callbacks.noise_injection import NoiseInjectionCallback
from lightning_bn.noise import NoiseSample, NoiseSampler, inject_noise

# (mean_range n_μ, std_range n_σ, mean_jitter r_μ, std_jitter r_σ): the paper's values and a set
# where every constant differs, so that a swapped constant or a variance/std mix-up shows.
CONSTANTS = [(0.5, 1.25, 0.1, 0.1), (1.5, 3.0, 0.4, 0.3)]
P_MIN = 1e-3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("n_mu", "n_sigma", "r_mu", "r_sigma"), CONSTANTS)
def test_unit_draws_follow_the_uniform_laws(
    n_mu: float, n_sigma: float, r_mu: float, r_sigma: float
) -> None:
    sampler = NoiseSampler(n_mu, n_sigma, r_mu, r_sigma)
    sample = sampler(torch.zeros(2, 20_000), _gen(0))
    mu, sigma = sample.mu.double().numpy(), sample.sigma.double().numpy()
    assert mu.min() >= -n_mu and mu.max() <= n_mu
    assert sigma.min() >= 1.0 and sigma.max() <= n_sigma
    assert stats.kstest(mu, stats.uniform(loc=-n_mu, scale=2 * n_mu).cdf).pvalue > P_MIN
    assert stats.kstest(sigma, stats.uniform(loc=1.0, scale=n_sigma - 1.0).cdf).pvalue > P_MIN
    # the moments of U(a, b): mean (a+b)/2, variance (b-a)²/12, within 5 standard errors
    n = mu.size
    assert abs(mu.mean()) < 5 * (2 * n_mu / math.sqrt(12)) / math.sqrt(n)
    assert abs(sigma.mean() - (1 + n_sigma) / 2) < 5 * ((n_sigma - 1) / math.sqrt(12)) / math.sqrt(
        n
    )
    assert mu.var() == pytest.approx((2 * n_mu) ** 2 / 12, rel=0.05)


@pytest.mark.parametrize(("n_mu", "n_sigma", "r_mu", "r_sigma"), CONSTANTS)
def test_entry_draws_follow_uniform_and_gaussian_laws_around_the_unit_draws(
    n_mu: float, n_sigma: float, r_mu: float, r_sigma: float
) -> None:
    sampler = NoiseSampler(n_mu, n_sigma, r_mu, r_sigma)
    sample = sampler(torch.randn(2_000, 6, 3, 3, dtype=torch.float64), _gen(1))
    view = (1, 6, 1, 1)
    jitter = (sample.shift - sample.mu.view(view)).flatten().numpy()
    noise = (sample.scale - sample.sigma.view(view)).flatten().numpy()
    assert jitter.min() >= -r_mu - 1e-12 and jitter.max() <= r_mu + 1e-12
    assert stats.kstest(jitter, stats.uniform(loc=-r_mu, scale=2 * r_mu).cdf).pvalue > P_MIN
    assert stats.kstest(noise, stats.norm(loc=0.0, scale=r_sigma).cdf).pvalue > P_MIN
    assert noise.std() == pytest.approx(r_sigma, rel=0.02)
    # r_σ is a standard deviation: reading it as a variance would be rejected outright
    wrong = stats.norm(loc=0.0, scale=math.sqrt(r_sigma)).cdf
    assert stats.kstest(noise, wrong).pvalue < 1e-10
    # each channel has its own unit draw, shared by all its N·H·W entries
    per_channel = (sample.shift - sample.mu.view(view)).abs().amax(dim=(0, 2, 3))
    assert bool((per_channel <= r_mu + 1e-12).all())


def test_output_is_scale_times_input_plus_shift_and_differentiable() -> None:
    x = torch.randn(16, 5, 4, requires_grad=True)
    sample = NoiseSampler()(x, _gen(2))
    torch.testing.assert_close(sample.output, sample.scale * x + sample.shift, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(sample.output.sum(), x)
    torch.testing.assert_close(grad, sample.scale, rtol=0, atol=0)
    assert not sample.scale.requires_grad and not sample.shift.requires_grad


@pytest.mark.parametrize(
    ("shape", "channels_last", "unit_dim"),
    [((64, 7), False, 1), ((8, 7, 5, 5), False, 1), ((8, 5, 7), True, 2), ((4, 3, 5, 7), True, 3)],
)
def test_a_unit_is_dimension_one_or_the_last_one(
    shape: tuple[int, ...], channels_last: bool, unit_dim: int
) -> None:
    sampler = NoiseSampler(mean_jitter=0.0, std_jitter=0.0)
    sample = sampler(torch.zeros(shape), _gen(3), channels_last=channels_last)
    assert sample.mu.shape == (7,) and sample.sigma.shape == (7,)
    view = [1] * len(shape)
    view[unit_dim] = 7
    expected_shift = sample.mu.view(view).expand(shape)
    torch.testing.assert_close(sample.shift, expected_shift, rtol=0, atol=0)
    torch.testing.assert_close(sample.scale, sample.sigma.view(view).expand(shape), rtol=0, atol=0)


def test_entry_draws_differ_across_samples_and_positions() -> None:
    sample = NoiseSampler()(torch.zeros(4, 3, 2, 2), _gen(4))
    flat = sample.shift.permute(1, 0, 2, 3).reshape(3, -1)
    assert all(torch.unique(row).numel() == row.numel() for row in flat)
    assert not torch.equal(sample.scale[0], sample.scale[1])


def test_same_generator_state_same_noise_and_separate_entry_generator() -> None:
    x = torch.randn(10, 4)
    a = NoiseSampler()(x, _gen(5))
    b = NoiseSampler()(x, _gen(5))
    for left, right in zip(a, b, strict=True):
        torch.testing.assert_close(left, right, rtol=0, atol=0)
    c = NoiseSampler()(x, _gen(5), entry_generator=_gen(6))
    torch.testing.assert_close(c.mu, a.mu, rtol=0, atol=0)
    torch.testing.assert_close(c.sigma, a.sigma, rtol=0, atol=0)
    assert not torch.equal(c.shift, a.shift)
    d = NoiseSampler()(x, _gen(7))
    assert not torch.equal(d.mu, a.mu)


def test_the_global_rng_is_neither_used_nor_disturbed() -> None:
    x = torch.ones(32, 8, 3, 3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(state)
    NoiseSampler()(x, _gen(8))
    inject_noise(x, _gen(9), entry_generator=_gen(10))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_output_keeps_the_input_dtype(dtype: torch.dtype) -> None:
    sample = NoiseSampler()(torch.randn(8, 3).to(dtype), _gen(10))
    assert sample.output.dtype == dtype
    assert sample.mu.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_inject_noise_equals_the_sampler() -> None:
    x = torch.randn(12, 5, 3)
    constants: dict[str, Any] = {
        "mean_range": 0.7,
        "std_range": 1.5,
        "mean_jitter": 0.2,
        "std_jitter": 0.05,
    }
    got = inject_noise(x, _gen(11), **constants)
    ref = NoiseSampler(**constants)(x, _gen(11))
    assert isinstance(got, NoiseSample)
    for left, right in zip(got, ref, strict=True):
        torch.testing.assert_close(left, right, rtol=0, atol=0)


def test_zero_width_noise_is_the_identity() -> None:
    x = torch.randn(6, 4)
    out = NoiseSampler(0.0, 1.0, 0.0, 0.0)(x, _gen(12)).output
    torch.testing.assert_close(out, x, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"std_range": 0.5}, r"`std_range` to be a finite number in \[1, 10000\], but got 0.5"),
        ({"mean_range": -0.1}, r"`mean_range` to be a finite number in \[0, 10000\], but got -0.1"),
        ({"mean_jitter": -1}, r"`mean_jitter` to be a finite number in \[0, 10000\], but got -1"),
        ({"std_jitter": -0.2}, r"`std_jitter` to be a finite number in \[0, 10000\], but got -0.2"),
        ({"std_jitter": float("nan")}, r"`std_jitter` to be a finite number in .*, but got nan"),
        ({"std_range": float("inf")}, r"`std_range` to be a finite number in .*, but got inf"),
        (
            {"std_range": 1e300},
            r"`std_range` to be a finite number in \[1, 10000\], but got 1e\+300",
        ),
        ({"mean_range": 1e5}, r"`mean_range` to be a finite number in .*, but got 100000.0"),
        ({"std_jitter": 1e40}, r"`std_jitter` to be a finite number in .*, but got 1e\+40"),
        ({"mean_range": True}, r"`mean_range` to be a finite number in .*, but got True"),
        ({"mean_range": "0.5"}, r"`mean_range` to be a finite number in .*, but got '0.5'"),
    ],
)
def test_bad_constants_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NoiseSampler(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        inject_noise(torch.zeros(2, 2), _gen(0), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        NoiseInjectionCallback(**kwargs)  # type: ignore[arg-type]


def test_sampler_arguments_repr_and_identity() -> None:
    # the four ranges in this order with the paper's defaults (inject_noise and the callback
    # pass them positionally), kept as floats and shown by repr; samplers compare by identity
    params = inspect.signature(NoiseSampler).parameters.values()
    assert [(p.name, p.default, p.kind) for p in params] == [
        (name, default, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for name, default in zip(
            ("mean_range", "std_range", "mean_jitter", "std_jitter"), CONSTANTS[0], strict=True
        )
    ]
    sampler = NoiseSampler(1, 2, 0, 0.25)
    ranges = (sampler.mean_range, sampler.std_range, sampler.mean_jitter, sampler.std_jitter)
    assert ranges == (1.0, 2.0, 0.0, 0.25) and all(type(r) is float for r in ranges)
    assert repr(sampler) == (
        "NoiseSampler(mean_range=1.0, std_range=2.0, mean_jitter=0.0, std_jitter=0.25)"
    )
    twin = NoiseSampler(1, 2, 0, 0.25)
    assert sampler != twin and len({sampler, twin}) == 2


def test_largest_allowed_noise_stays_finite() -> None:
    """At the largest allowed ranges, float32 activations of unit scale stay finite."""
    x = torch.randn(64, 8)
    out = NoiseSampler(1e4, 1e4, 1e4, 1e4)(x, _gen(1)).output
    assert torch.isfinite(out).all()


def test_bad_activations_raise() -> None:
    with pytest.raises(
        ValueError, match=r"at least 2 dimensions \(N, C, \.\.\.\), but got shape \(5,\)"
    ):
        NoiseSampler()(torch.zeros(5), _gen(0))
    with pytest.raises(ValueError, match=r"floating point activation, but got dtype torch.int64"):
        NoiseSampler()(torch.zeros(5, 2, dtype=torch.long), _gen(0))
