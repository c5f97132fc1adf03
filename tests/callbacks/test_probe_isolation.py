"""Probes cannot leak into training: private batch copies, the measured step's counters,
``in_probe()``; per-group step sizes; setup refusals."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_bn import in_probe
from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.diagnostics.landscape import DEFAULT_STEP_SIZES
from tests.support.models import Classifier, MemoryLogger, Recorder, fit, mlp


class InPlace(Classifier):
    """A training step that normalises its batch in place (as normalisation code often does)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        x.div_(2).add_(0.1)
        return super().training_step((x, y), batch_idx)


def _callbacks() -> list[Any]:
    return [
        ICSCallback(every_n_steps=1),
        LipschitzCallback(every_n_steps=1),
        SmoothnessCallback(every_n_steps=2, max_iters=3),
    ]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_in_place_batch_changes_do_not_leak(optimizer: str) -> None:
    make = lambda: InPlace(mlp(dropout=0.2).double(), optimizer=optimizer)  # noqa: E731
    m0, t0 = fit(make, [], steps=8, seed=2)
    m1, t1 = fit(make, _callbacks(), steps=8, seed=2)
    for key, value in m0.state_dict().items():
        assert torch.equal(m1.state_dict()[key], value), key
    s0, s1 = t0.optimizers[0].state_dict()["state"], t1.optimizers[0].state_dict()["state"]
    assert s0.keys() == s1.keys()
    for key, value in s0.items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(s1[key][name]), torch.as_tensor(tensor)), name


def test_ics_measures_the_batch_before_the_step_changed_it() -> None:
    """The probes of ICS (after the step) see the batch as it was when the step began."""
    recorder, logger = Recorder(), MemoryLogger()
    seen: list[Tensor] = []

    class Spy(InPlace):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if in_probe():
                seen.append(batch[0].clone())
            return super().training_step(batch, batch_idx)

    fit(
        lambda: Spy(mlp().double()),
        [recorder, ICSCallback(every_n_steps=1)],
        steps=2,
        logger=logger,
    )
    assert seen
    originals = [r["batch"][0] for r in recorder.steps]
    assert all(any(torch.equal(s, o) for o in originals) for s in seen)


class StepAware(Classifier):
    """A loss that depends on the step (an annealed penalty), and a log of what each call saw."""

    def __init__(self) -> None:
        super().__init__(mlp().double())
        self.calls: list[tuple[bool, int, int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.calls.append((in_probe(), self.global_step, self.current_epoch))
        loss = super().training_step(batch, batch_idx)
        return loss * (1.0 + 0.5 * self.global_step)


def test_probes_see_the_measured_step() -> None:
    recorder, logger = Recorder(), MemoryLogger()
    module, t = fit(
        StepAware, [recorder, ICSCallback(every_n_steps=1)], steps=6, logger=logger
    )  # 4 batches per epoch: steps 4 and 5 are in epoch 1
    assert t.global_step == 6  # restored after every probe
    assert not in_probe()
    real: tuple[int, int] | None = None
    probes = 0
    for probing, step, epoch in module.calls:
        if not probing:
            real = (step, epoch)
        else:
            probes += 1
            assert (step, epoch) == real  # ICS probes run after the step, at step t's values
    assert probes > 0
    assert {e for p, _, e in module.calls if p} == {0, 1}
    # the first layer's G' equals G, and with the loss scaled by (1 + 0.5 t), so is l2_rel's
    # denominator: G at step t must use the factor of step t, checked against the recorded loss
    for record in recorder.steps:
        factor = 1.0 + 0.5 * record["step"]
        net = copy.deepcopy(module.net)
        net.load_state_dict({k[len("net.") :]: v for k, v in record["before"].items()})
        torch.set_rng_state(record["rng"])
        x, y = record["batch"]
        loss = nn.functional.cross_entropy(net(x), y) * factor
        assert torch.equal(loss.detach(), record["loss"])
        g = torch.autograd.grad(loss, [net[8].weight, net[8].bias])
        torch.set_rng_state(record["rng"])
        later = copy.deepcopy(net)
        with torch.no_grad():
            for name, p in later.named_parameters():
                if not name.startswith("8."):
                    p.copy_(record["after"][f"net.{name}"])
        torch.set_rng_state(record["rng"])
        loss_p = nn.functional.cross_entropy(later(x), y) * factor
        gp = torch.autograd.grad(loss_p, [later[8].weight, later[8].bias])
        flat, flat_p = torch.cat([a.reshape(-1) for a in g]), torch.cat([a.reshape(-1) for a in gp])
        got = logger.history[record["step"]]["ics/net.8/l2"]
        assert got == pytest.approx(float((flat - flat_p).norm()), rel=1e-6, abs=1e-12)


def test_in_probe_inside_landscape_probes() -> None:
    module, _ = fit(StepAware, [LipschitzCallback(every_n_steps=2)], steps=4)
    probing = [c for c in module.calls if c[0]]
    assert len(probing) == 2 * (1 + len(DEFAULT_STEP_SIZES))  # a gradient and the grid, twice
    assert {s for _, s, _ in probing} == {0, 2}


class TwoGroups(Classifier):
    """SGD with the first Linear frozen by lr 0 and the rest at lr 0.5."""

    def __init__(self) -> None:
        super().__init__(mlp(dropout=0.0).double())

    def configure_optimizers(self) -> Any:
        first = list(self.net[0].parameters())
        rest = [p for n, p in self.net.named_parameters() if not n.startswith("0.")]
        return torch.optim.SGD([{"params": first, "lr": 0.0}, {"params": rest, "lr": 0.5}])


def test_per_group_step_sizes_match_brute_force() -> None:
    grid = [0.5, 1.0, 2.0]
    recorder, logger = Recorder(), MemoryLogger()
    module, _ = fit(
        TwoGroups,
        [
            recorder,
            LipschitzCallback(every_n_steps=1, step_sizes=grid),
            SmoothnessCallback(every_n_steps=1, step_sizes=grid, hessian=False),
        ],
        steps=2,
        logger=logger,
    )
    for record in recorder.steps:
        net = copy.deepcopy(module.net)

        def at(state: dict[str, Tensor], net: nn.Module = net) -> nn.Module:
            moved = copy.deepcopy(net)
            moved.load_state_dict(state)
            return moved.train()

        base = {k[len("net.") :]: v for k, v in record["before"].items()}
        x, y = record["batch"]
        w0 = at(base)
        names = [n for n, _ in w0.named_parameters()]
        g = torch.autograd.grad(nn.functional.cross_entropy(w0(x), y), list(w0.parameters()))
        lrs = [0.0 if n.startswith("0.") else 0.5 for n in names]
        losses, diffs, betas = [], [], []
        for c in grid:
            point = dict(base)
            step = {n: c * lr * gi for n, lr, gi in zip(names, lrs, g, strict=True)}
            for n in names:
                point[n] = base[n] - step[n]
            net_c = at(point)
            loss_c = nn.functional.cross_entropy(net_c(x), y)
            losses.append(float(loss_c))
            g_c = torch.autograd.grad(loss_c, list(net_c.parameters()))
            d = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(g, g_c, strict=True)))
            length = math.sqrt(sum(float((s**2).sum()) for s in step.values()))
            diffs.append(d)
            betas.append(d / length)
        got = logger.history[record["step"]]
        assert got["lipschitz/loss_min"] == pytest.approx(min(losses), rel=1e-6)
        assert got["lipschitz/loss_max"] == pytest.approx(max(losses), rel=1e-6)
        assert got["lipschitz/loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-6)
        assert got["lipschitz/loss_range"] > 0
        assert got["smoothness/grad_diff_max"] == pytest.approx(max(diffs), rel=1e-6)
        assert got["smoothness/beta_eff"] == pytest.approx(max(betas), rel=1e-6)


def test_only_lr_zero_groups_give_an_empty_band() -> None:
    """The old rule (group 0's lr for everyone) gave loss_range 0 here: lr 0 for group 0."""

    logger = MemoryLogger()
    fit(TwoGroups, [LipschitzCallback(every_n_steps=1)], steps=1, logger=logger)
    assert logger.history[0]["lipschitz/loss_range"] > 0


def test_relu_layer_refused() -> None:
    with pytest.raises(ValueError, match=r"'net\.2' selects only net\.2 \(ReLU\), which own none"):
        fit(lambda: Classifier(mlp().double()), [ICSCallback(layers=["net.2"])], steps=1)
    with pytest.raises(ValueError, match=r"ReLU selects only net\.2 \(ReLU\), net\.6 \(ReLU\)"):
        fit(lambda: Classifier(mlp().double()), [ICSCallback(layers=[nn.ReLU])], steps=1)


def test_nothing_measurable_refused() -> None:
    def make() -> Classifier:
        net = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))
        net[1].weight.requires_grad_(False)  # only rank-1 trainable parameters are left
        return Classifier(net.double())

    with pytest.raises(
        ValueError,
        match=r"found no layer to measure.*contains: net \(Sequential\), net\.0 "
        r"\(BatchNorm1d\), net\.1 \(Linear\)\. Choose .*layers=",
    ):
        fit(make, [ICSCallback()], steps=1)
    logger = MemoryLogger()  # naming the module measures its trainable bias
    fit(make, [ICSCallback(every_n_steps=1, layers=["net.1"])], steps=1, logger=logger)
    assert {k.split("/")[1] for k in logger.history[0]} == {"net.1"}
