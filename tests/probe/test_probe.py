from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import pytest
import torch
import torchmetrics
from torch import nn

from lightning_bn.probe import Probe, RNGState, StepRecord, copy_batch, in_probe


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
        probe.loss_and_grad(probe.parameters(), StepRecord((x, y), 0, rng))
    assert module.acc._update_count == count
    for k, v in module.acc.metric_state.items():
        assert torch.equal(v, state[k]), k
    assert module.logged == ["train/acc"]  # only the real step logged
    assert "log" not in module.__dict__  # the silencing shadow is gone


class Pair(NamedTuple):
    x: torch.Tensor
    meta: list[Any]


@dataclasses.dataclass
class Inputs:
    ids: torch.Tensor
    extra: dict[str, torch.Tensor]
    tag: str = "a"


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: torch.Tensor


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_copy_batch_copies_every_tensor_at_any_nesting() -> None:
    t = [torch.randn(3) for _ in range(6)]
    batch = {
        "pair": Pair(t[0], [t[1], "name", 3]),
        "inputs": Inputs(t[2], {"mask": t[3]}),
        "frozen": Frozen(t[4]),
        "ordered": OrderedDict(z=(t[5], None)),
    }
    originals = [x.clone() for x in _tensors(batch)]
    out = copy_batch(batch)
    assert type(out["pair"]) is Pair and type(out["inputs"]) is Inputs
    assert type(out["frozen"]) is Frozen and type(out["ordered"]) is OrderedDict
    assert out["pair"].meta[1:] == ["name", 3] and out["inputs"].tag == "a"
    copied = _tensors(out)
    assert len(copied) == 6
    for c, o, orig in zip(copied, _tensors(batch), originals, strict=True):
        assert c is not o and torch.equal(c, o)
        c.mul_(0)  # an in-place change of the copy ...
        assert torch.equal(o, orig)  # ... leaves the batch alone


class Reads(nn.Module):
    """Reads a late layer's metadata first, uses a child's weight functionally, ties a weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.attn = nn.MultiheadAttention(4, 2)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.emb.weight
        self.unused = nn.Linear(4, 4)
        self.late = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.late.weight.shape == (4, 4) and self.late.weight.dtype == torch.float64
        h = self.emb(ids)
        h = self.attn(h, h, h)[0]
        return self.out(self.late(h) + nn.functional.linear(h, self.attn.out_proj.weight))


def test_use_order_traces_first_use_once() -> None:
    torch.manual_seed(0)
    calls = {"n": 0}

    def loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        return module(batch).pow(2).mean()

    model = Reads().double()
    probe = Probe(model, loss_fn=loss_fn)
    ids = torch.randint(0, 5, (3, 2))
    order = probe.use_order(probe.parameters(), ids)
    assert order == [
        "emb.weight",  # the tied output weight is used here first, under its owner's name
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "late.weight",  # its shape and dtype were read first: metadata is not a use
        "late.bias",
    ]  # `unused` never runs
    assert calls["n"] == 1
    assert probe.use_order(probe.parameters(), ids) == order
    assert calls["n"] == 1  # traced once per layout
    model.late.bias.requires_grad_(False)  # another layout: traced again, frozen ones left out
    assert "late.bias" not in probe.use_order(probe.parameters(), ids)
    assert calls["n"] == 2


def test_in_probe_is_true_only_inside_evaluations() -> None:
    seen: list[bool] = []

    def loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        seen.append(in_probe())
        return module(batch).sum()

    probe = Probe(nn.Linear(2, 1), loss_fn=loss_fn)
    x = torch.randn(3, 2)
    probe.loss_and_grad(probe.parameters(), x)
    probe.losses_along(probe.parameters(), probe.parameters(), [0.1, 0.2], StepRecord(x))
    assert seen == [True, True, True] and not in_probe()


class Failing(nn.Module):
    """Raises inside its forward pass after the parameters have been swapped in."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.lin(x))
        if out.abs().max() > 0:
            raise RuntimeError("boom")
        return out


def test_module_tensors_come_back_after_a_failing_evaluation() -> None:
    model = Failing()
    before = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    probe = Probe(model, loss_fn=_loss)
    point = {n: t + 1.0 for n, t in probe.parameters().items()}
    with pytest.raises(RuntimeError, match="boom"):
        probe.loss(point, torch.randn(4, 3))
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert after[name] is tensor  # the very objects, Parameters again
    assert isinstance(model.lin.weight, nn.Parameter)


def test_unknown_names_are_refused_and_lazy_parameters_are_found() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(2))
    probe = Probe(model, loss_fn=_loss)
    x = torch.randn(5, 3)
    probe.loss({}, x)  # first evaluation before the lazy layer is materialised
    weight = model[0].weight
    point = {"0.weight": torch.zeros_like(weight), "0.bias": torch.ones(2)}
    torch.testing.assert_close(probe.loss(point, x), torch.tensor(1.0))
    assert model[0].weight is weight
    with pytest.raises(ValueError, match=r"0\.scale"):
        probe.loss({"0.scale": torch.ones(2)}, x)


def _mse(module: nn.Module, batch: Any) -> torch.Tensor:
    return (module(batch[0]) - batch[1]).pow(2).mean()


def _reference(
    model: nn.Module, point: dict[str, torch.Tensor], batch: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Brute force: a deep copy of the model at ``point``, plain autograd."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(point[name])
    loss = _mse(ref, batch)
    names = [n for n, _ in ref.named_parameters()]
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    return loss.detach(), dict(zip(names, grads, strict=True))


def _check(probe: Probe, model: nn.Module, batch: Any) -> None:
    point = {n: t + 0.25 for n, t in probe.parameters().items()}
    loss, grads = probe.loss_and_grad(point, batch)
    ref_loss, ref_grads = _reference(model, point, batch)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g)


def test_a_module_changed_after_the_first_evaluation_is_seen() -> None:
    torch.manual_seed(0)
    batch = (torch.randn(8, 3), torch.randn(8, 1))
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    probe = Probe(net, loss_fn=_mse)
    probe.loss_and_grad(probe.parameters(), batch)  # layout gathered
    net[2] = nn.Linear(4, 1)  # a new head under the same names
    _check(probe, net, batch)
    grid = probe.losses_along(
        probe.parameters(), {"2.weight": torch.ones(1, 4)}, [0.0, 1.0], StepRecord(batch)
    )
    assert grid[0] != grid[1]  # the point reaches the new head
    net[0].weight = nn.Parameter(torch.randn(4, 3))  # a parameter reassigned
    _check(probe, net, batch)


class SharedBuffers(nn.Module):
    """One BatchNorm under two names, and one buffer tensor registered in two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.alias = self.body[1]
        self.head = nn.Linear(4, 1)
        mask = torch.tensor([1.0, 0.5, 1.0, 2.0])
        self.body[0].register_buffer("mask", mask)
        self.head.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x) * self.head.mask)


def test_shared_submodules_and_buffers() -> None:
    torch.manual_seed(0)
    net = SharedBuffers()
    batch = (torch.randn(8, 3), torch.randn(8, 1))
    running = net.body[1].running_mean.clone()
    _check(Probe(net, loss_fn=_mse), net, batch)
    assert torch.equal(net.body[1].running_mean, running)


class Reassigns(nn.Module):
    """Reassigns a buffer in its forward pass (``self.ema = ...``) instead of updating it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.register_buffer("ema", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x - self.ema)
        self.ema = 0.5 * self.ema + 0.5 * x.mean(0).detach()
        return out


@pytest.mark.parametrize("chunk", [None, 2])
def test_every_grid_point_starts_from_the_modules_buffers(chunk: int | None) -> None:
    torch.manual_seed(0)
    net = Reassigns()
    batch = (torch.randn(8, 3) + 2, torch.randn(8, 1))
    probe = Probe(net, loss_fn=_mse, vmap_chunk_size=chunk)
    point = probe.parameters()
    still = {n: torch.zeros_like(t) for n, t in point.items()}
    losses = probe.losses_along(point, still, [0.0, 0.0, 0.0], StepRecord(batch))
    expected = _mse(copy.deepcopy(net), batch).detach()
    torch.testing.assert_close(losses, expected.expand(3))
    assert torch.equal(net.ema, torch.zeros(3))


def test_a_grid_without_the_steps_random_state_is_the_same_batched_or_not() -> None:
    # without `step.rng` each point draws anew from the global state, which vmap cannot do: the
    # batched setting then evaluates point by point
    net = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    batch = (torch.randn(8, 3), torch.randn(8, 1))
    values = []
    for chunk in (None, 4):
        probe = Probe(net, loss_fn=_mse, vmap_chunk_size=chunk)
        point = probe.parameters()
        still = {n: torch.zeros_like(t) for n, t in point.items()}
        torch.manual_seed(1)
        values.append(probe.losses_along(point, still, [0.0] * 3, StepRecord(batch)))
        values.append(torch.rand(1))  # where the global stream stands afterwards
    torch.testing.assert_close(values[0], values[2])
    assert len(set(values[0].tolist())) == 3  # three different dropout masks
    torch.testing.assert_close(values[1], values[3])
