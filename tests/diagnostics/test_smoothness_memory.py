"""What one smoothness measurement allocates, counted allocation by allocation (torch's profiler).

The CPU profiler records every allocation and free of torch's allocator in order, so the peak of
their running sum is the same number on every run (unlike resident memory). A warm-started
measurement allocates, in parameter copies: the Lanczos basis (without one, ``basis_size=0``:
three vectors), the gradient with its graph and the partial gradients of one Hessian-vector
product; the working vector (or start) is the warm start's own memory and the parameters are
read in place.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bn.diagnostics.landscape import compute_smoothness
from lightning_bn.probe import Probe, RNGState, StepRecord
from tests.support.profiling import peak_allocated


def _peak_copies(basis: int, max_iters: int = 12) -> float:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    n = sum(p.numel() for p in net.parameters())
    assert n == 86_026
    probe = Probe(net, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen))
    step = StepRecord(batch, 0, RNGState.capture())
    params = probe.parameters(copy=False)
    warm = compute_smoothness(probe, params, step, [0.1, 0.2], basis_size=basis).eigenvector

    def measure() -> None:
        compute_smoothness(
            probe, params, step, [0.1, 0.2], basis_size=basis, init=warm, reuse_init=True,
            max_iters=max_iters, tol=0.0,
        )  # fmt: skip

    return peak_allocated(measure) / (4 * n)


def test_a_warm_measurement_allocates_its_basis_and_about_two_more_copies() -> None:
    five, eight = _peak_copies(5), _peak_copies(8)
    # basis + the gradient with its graph + a product's partial gradients (under one copy)
    assert 5 + 1 < five <= 5 + 2.5
    assert 8 + 1 < eight <= 8 + 2.5
    assert eight - five == pytest.approx(3.0, abs=0.05)  # each basis vector costs one copy


def test_a_warm_measurement_without_a_basis_allocates_the_same_whatever_the_products() -> None:
    short, long = _peak_copies(0, 12), _peak_copies(0, 40)
    # the float64 chunks of its dot products (two of 2**16 entries at a time: 1 MiB, three
    # copies of this small model, nothing next to a large one's parameters)
    dot = 2 * 8 * 2**16 / (4 * 86_026)
    # three vectors (the start, then the Ritz vector's sum, is the warm start's memory), the
    # gradient with its graph, a product's partials
    assert 3 + 1 < long <= 3 + 2.5 + dot
    assert abs(long - short) <= 0.05  # three times the products, no more memory
