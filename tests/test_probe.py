from __future__ import annotations

import copy
from typing import Any

import torch
import torchmetrics
from torch import nn

from lightning_bn.probe import Probe, RNGState


class Tied(nn.Module):
    """A weight shared by two Linear layers (tied, as in tied embeddings) and a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight  # named_parameters() lists it once, as enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.bn(self.enc(x))))


def _loss(module: nn.Module, batch: Any) -> torch.Tensor:
    return module(batch).pow(2).mean()


def test_tied_weights_follow_the_parameter_point() -> None:
    torch.manual_seed(0)
    model = Tied().double()
    probe = Probe(model, loss_fn=_loss)
    x = torch.randn(10, 6, dtype=torch.float64)
    point = {k: v + 0.1 * torch.randn_like(v) for k, v in probe.parameters().items()}
    assert set(point) == {"enc.weight", "enc.bias", "bn.weight", "bn.bias", "dec.bias"}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(point[name])  # both uses of the tied Linear move
    loss, grads = probe.loss_and_grad(point, x)
    ref_loss = _loss(reference, x)
    ref_grads = torch.autograd.grad(ref_loss, list(reference.parameters()))
    torch.testing.assert_close(loss, ref_loss.detach())
    for (name, _), g in zip(reference.named_parameters(), ref_grads, strict=True):
        torch.testing.assert_close(grads[name], g)
    running = model.bn.running_mean.clone()
    probe.loss(point, x)
    assert torch.equal(model.bn.running_mean, running)  # running statistics untouched


class WithMetric(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
        self.logged: list[str] = []

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        self.logged.append(name)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        self.acc(logits, y)
        self.log("train/acc", self.acc)
        return nn.functional.cross_entropy(logits, y)


def test_probe_leaves_metrics_and_logs_alone() -> None:
    torch.manual_seed(0)
    module = WithMetric()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    module.training_step((x, y), 0)  # the real step updates the metric once
    state = {k: v.clone() for k, v in module.acc.metric_state.items()}
    count = module.acc._update_count
    probe = Probe(module)
    rng = RNGState.capture()
    for _ in range(3):
        probe.loss_and_grad(probe.parameters(), (x, y), 0, rng)
    assert module.acc._update_count == count
    for k, v in module.acc.metric_state.items():
        assert torch.equal(v, state[k]), k
    assert module.logged == ["train/acc"]  # only the real step logged
    assert "log" not in module.__dict__  # the silencing shadow is gone
