"""StepRecord in place of (batch, batch_idx, rng), and `max_iters` in place of `power_iters`."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.diagnostics.ics import compute_ics
from lightning_bn.diagnostics.landscape import compute_lipschitz, compute_smoothness, norm_layers
from lightning_bn.probe import Probe, RNGState, StepRecord
from tests.support.models import Classifier, mlp


def _setup() -> tuple[Probe, dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    module = Classifier(mlp(dropout=0.3).double()).train()
    gen = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(12, 8, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (12,), generator=gen),
    )
    probe = Probe(module)
    return probe, probe.parameters(), batch


def test_probe_takes_a_record_and_the_old_triple() -> None:
    probe, params, batch = _setup()
    rng = RNGState.capture()
    torch.rand(100)  # the global stream moves on: only a replay sees the captured state
    record = StepRecord(batch, 3, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a record nor a bare batch warns
        new = probe.loss(params, record)
        bare = probe.loss(params, batch)
    with pytest.warns(DeprecationWarning, match="StepRecord"):
        old = probe.loss(params, batch, 3, rng)
    assert torch.equal(new, old)
    # the replayed RNG state matters (dropout): without it the loss differs
    assert not torch.equal(new, bare)
    with pytest.warns(DeprecationWarning):
        _, g_old = probe.loss_and_grad(params, batch, 3, rng)
    _, g_new = probe.loss_and_grad(params, record)
    assert g_old.keys() == g_new.keys()
    assert all(torch.equal(g_old[k], g_new[k]) for k in g_new)
    etas = [0.1, 0.5]
    with pytest.warns(DeprecationWarning):
        along_old = probe.losses_along(params, g_new, etas, batch, 3, rng)
    assert torch.equal(probe.losses_along(params, g_new, etas, record), along_old)


def test_compute_functions_take_a_record_and_the_old_form() -> None:
    probe, params, batch = _setup()
    rng = RNGState.capture()
    record = StepRecord(batch, 0, rng)
    layers = norm_layers(probe.module)
    new = compute_lipschitz(probe, params, record, [0.1, 0.2], layers)
    with pytest.warns(DeprecationWarning):
        old = compute_lipschitz(probe, params, batch, 0, rng, [0.1, 0.2], layers)
    assert new == old
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bare batch is StepRecord(batch): no warning
        bare = compute_lipschitz(probe, params, batch, [0.1, 0.2], layers)
    # (no RNG state to replay: dropout draws fresh masks, so only the keys can be compared)
    assert bare.keys() == new.keys()
    after = {k: v + 1e-2 for k, v in params.items()}
    linears = [(n, m) for n, m in probe.module.named_modules() if isinstance(m, nn.Linear)]
    ics_new = compute_ics(probe, linears, params, after, record)
    with pytest.warns(DeprecationWarning):
        ics_old = compute_ics(probe, linears, params, after, batch=batch, batch_idx=0, rng=rng)
    assert ics_new == ics_old and set(ics_new) == {"net.0", "net.4", "net.8"}


def test_power_iters_is_a_deprecated_alias_of_max_iters() -> None:
    probe, params, batch = _setup()
    record = StepRecord(batch, rng=RNGState.capture())  # same dropout masks in every call
    new = compute_smoothness(probe, params, record, [0.1], max_iters=6, tol=0.0)
    with pytest.warns(DeprecationWarning, match="`power_iters` is deprecated"):
        old = compute_smoothness(probe, params, record, [0.1], power_iters=6, tol=0.0)
    assert new.metrics == old.metrics
    assert new.metrics["hessian_iters"] == 6.0  # tol 0: the cap stops it
    assert new.eigenvector is not None and old.eigenvector is not None
    assert all(torch.equal(new.eigenvector[k], old.eigenvector[k]) for k in new.eigenvector)
    with pytest.raises(TypeError, match="both"):
        compute_smoothness(probe, params, record, [0.1], max_iters=6, power_iters=6)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="`power_iters`"):
        compute_smoothness(probe, params, record, [0.1], power_iters=0)


def test_callback_power_iters_alias_and_shared_default_algorithm() -> None:
    with pytest.warns(DeprecationWarning, match="`power_iters` is deprecated"):
        old = SmoothnessCallback(power_iters=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = SmoothnessCallback(max_iters=5)
    assert old.max_iters == new.max_iters == old.power_iters == 5
    assert old._settings() == new._settings()
    assert new._settings()["max_iters"] == new._settings()["power_iters"] == 5
    assert SmoothnessCallback().max_iters == 40  # two products a Lanczos step without a basis
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ValueError, match="`power_iters` to be a positive integer"),
    ):
        SmoothnessCallback(power_iters=0)
    default = inspect.signature(compute_smoothness).parameters["eig_algorithm"].default
    assert default == inspect.signature(SmoothnessCallback).parameters["eig_algorithm"].default
    assert default == "lanczos"


def test_default_algorithm_is_lanczos() -> None:
    probe, params, batch = _setup()
    record = StepRecord(batch, rng=RNGState.capture())  # same dropout masks in every call
    default = compute_smoothness(probe, params, record, [0.1], max_iters=8, tol=1e-6)
    lanczos = compute_smoothness(
        probe, params, record, [0.1], max_iters=8, tol=1e-6, eig_algorithm="lanczos"
    )
    power = compute_smoothness(
        probe, params, record, [0.1], max_iters=8, tol=1e-6, eig_algorithm="power"
    )
    assert default.metrics == lanczos.metrics
    assert default.metrics["hessian_top_eig"] != power.metrics["hessian_top_eig"]
