"""Gradients summed straight into one flat buffer, against torch.autograd.grad."""

from __future__ import annotations

import torch
from torch import nn

from lightning_bn.probe import Probe
from lightning_bn.probe.flatgrad import backward_into, flat_views


def test_backward_into_equals_autograd_grad_and_leaves_no_grad() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    loss = torch.tanh(x @ w.T + b).pow(2).sum()
    expected = torch.autograd.grad(loss, [w, b], retain_graph=True)
    out = torch.full((12 + 4 + 2,), 7.0, dtype=torch.float64)  # stale values are overwritten
    got = backward_into([loss], [w, b, unused], out, retain_graph=True)
    assert got is out
    views = flat_views(out, [w, b, unused])
    assert torch.equal(views[0], expected[0]) and torch.equal(views[1], expected[1])
    assert torch.equal(views[2], torch.zeros(2, dtype=torch.float64))
    assert w.grad is None and b.grad is None and unused.grad is None
    # a second pass over the kept graph gives the same values again, in the same memory
    again = backward_into([loss], [w, b, unused], out)
    assert again.data_ptr() == out.data_ptr() and torch.equal(
        flat_views(again, [w, b, unused])[0], expected[0]
    )


def test_backward_into_accumulate_adds_to_what_out_holds() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    loss = torch.tanh(x @ w.T).pow(2).sum()
    (expected,) = torch.autograd.grad(loss, [w], retain_graph=True)
    prior = torch.randn(12 + 2, generator=gen, dtype=torch.float64)
    out = prior.clone()
    got = backward_into([loss], [w, unused], out, retain_graph=True, accumulate=True)
    assert got is out and w.grad is None and unused.grad is None
    views, before = flat_views(out, [w, unused]), flat_views(prior, [w, unused])
    torch.testing.assert_close(views[0], before[0] + expected, rtol=1e-15, atol=1e-15)
    assert torch.equal(views[1], before[1])  # an input the loss does not reach keeps its values
    # a sparse gradient is added into the dense slot as well
    table = torch.randn(6, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = nn.functional.embedding(torch.tensor([1, 4]), table, sparse=True).sum()
    out = torch.ones(12, dtype=torch.float64)
    backward_into([rows], [table], out, accumulate=True)
    dense = torch.zeros(6, 2, dtype=torch.float64)
    dense[[1, 4]] = 1.0
    assert torch.equal(out, 1.0 + dense.reshape(-1)) and table.grad is None


def test_backward_into_weighted_outputs_is_a_vector_jacobian_product() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    outputs = [w.sin(), (w * w).sum(0, keepdim=True)]
    weights = [
        torch.randn(3, generator=gen, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    ]
    out = backward_into(outputs, [w], torch.empty(3, dtype=torch.float64), weights)
    torch.testing.assert_close(out, w.detach().cos() * weights[0] + 2 * w.detach())


def test_parameter_views_share_the_modules_memory() -> None:
    net = nn.Linear(3, 2)
    probe = Probe(net, loss_fn=lambda m, b: m(b).sum())
    views, copies = probe.parameters(copy=False), probe.parameters()
    for name, p in net.named_parameters():
        assert views[name].data_ptr() == p.data_ptr() and not views[name].requires_grad
        assert copies[name].data_ptr() != p.data_ptr() and torch.equal(copies[name], p.detach())
