from __future__ import annotations

import copy
import csv
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from scipy.stats import wasserstein_distance
from torch import nn

from lightning_bn.callbacks.base import DiagnosticWarning
from lightning_bn.callbacks.ics import ICSCallback
from tests.support.models import Classifier, MemoryLogger, Recorder, cnn, fit, mlp

# Hand-written forward order of the parameterised modules of each test network.
MLP_ORDER = ["net.0", "net.1", "net.4", "net.5", "net.8"]
MLP_MEASURED = ["net.0", "net.4", "net.8"]
CNN_ORDER = ["net.0", "net.1", "net.3", "net.4", "net.8"]
CNN_MEASURED = ["net.0", "net.3", "net.8"]


def _brute_force(
    make_net: Any, order: list[str], measured: list[str], record: dict[str, Any]
) -> dict[str, float]:
    """Def. 2.1 by hand: a deep-copied model per layer, earlier layers loaded from W^{t+1}."""
    net_before = {k[len("net.") :]: v for k, v in record["before"].items()}
    net_after = {k[len("net.") :]: v for k, v in record["after"].items()}
    x, y = record["batch"]
    expected: dict[str, float] = {}
    grads: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    for layer in [None, *measured]:
        net = make_net().double()
        net.load_state_dict(net_before)
        if layer is not None:
            earlier = order[: order.index(layer)]
            with torch.no_grad():
                for name, p in net.named_parameters():
                    if f"net.{name.rpartition('.')[0]}" in earlier:
                        p.copy_(net_after[name])
        net.train()
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            net.get_submodule(m[len("net.") :]).register_forward_pre_hook(
                lambda mod, args, m=m, captured=captured: captured.update(
                    {m: args[0].detach().clone()}
                )
            )
            for m in measured
        ]
        torch.set_rng_state(record["rng"])
        loss = nn.functional.cross_entropy(net(x), y)
        for h in hooks:
            h.remove()
        targets = measured if layer is None else [layer]
        for m in targets:
            mod = net.get_submodule(m[len("net.") :])
            g = torch.autograd.grad(loss, list(mod.parameters()), retain_graph=True)
            flat = torch.cat([t.reshape(-1) for t in g])
            if layer is None:
                grads[m] = flat
                inputs[m] = captured[m]
            else:
                gp = flat
                gm = grads[m]
                expected[f"ics/{m}/l2"] = float((gm - gp).norm())
                expected[f"ics/{m}/cos"] = float(gm @ gp / (gm.norm() * gp.norm()))
                expected[f"ics/{m}/l2_rel"] = float((gm - gp).norm() / gm.norm())
                x0, x1 = inputs[m], captured[m]
                if x0.dim() == 4:  # a unit is a channel: values over batch × H × W
                    u0 = x0.permute(1, 0, 2, 3).reshape(x0.shape[1], -1).numpy()
                    u1 = x1.permute(1, 0, 2, 3).reshape(x1.shape[1], -1).numpy()
                else:
                    u0, u1 = x0.T.numpy(), x1.T.numpy()
                expected[f"ics/{m}/mean_shift"] = float(np.mean(np.abs(u1.mean(1) - u0.mean(1))))
                expected[f"ics/{m}/std_shift"] = float(np.mean(np.abs(u1.std(1) - u0.std(1))))
                expected[f"ics/{m}/emd"] = float(
                    np.mean([wasserstein_distance(a, b) for a, b in zip(u0, u1, strict=True)])
                )
    return expected


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_matches_brute_force(arch: str, optimizer: str) -> None:
    make_net = mlp if arch == "mlp" else cnn
    order, measured = (MLP_ORDER, MLP_MEASURED) if arch == "mlp" else (CNN_ORDER, CNN_MEASURED)
    recorder = Recorder()
    logger = MemoryLogger()
    fit(
        lambda: Classifier(make_net().double(), optimizer=optimizer),
        [recorder, ICSCallback(every_n_steps=1)],
        steps=3,
        image=arch == "cnn",
        logger=logger,
        gradient_clip_val=1.0 if optimizer == "adamw" else None,
    )
    assert len(recorder.steps) == 3
    for record in recorder.steps:
        expected = _brute_force(make_net, order, measured, record)
        logged = logger.history[record["step"]]
        got = {k: v for k, v in logged.items() if k.startswith("ics/")}
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        # the first layer has nothing before it: G' = G and the same input
        assert got[f"ics/{measured[0]}/l2"] == 0.0
        assert got[f"ics/{measured[-1]}/l2"] > 0.0


def test_dropout_mask_replayed() -> None:
    """The probe's loss at W^t equals the real step's loss (same batch, same dropout mask)."""
    recorder = Recorder()
    ics = ICSCallback(every_n_steps=1)
    module, _ = fit(lambda: Classifier(mlp(dropout=0.5).double()), [recorder, ics], steps=2)
    record = recorder.steps[-1]
    params = {
        k: v
        for k, v in record["before"].items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    from lightning_bn.probe import Probe, RNGState, StepRecord

    probe = Probe(module)
    loss = probe.loss(params, StepRecord(record["batch"], 0, RNGState(cpu=record["rng"])))
    assert torch.equal(loss, record["loss"])
    other = probe.loss(params, StepRecord(record["batch"]))
    assert not torch.equal(other, record["loss"])  # another mask gives another loss


def _state(module: Any, trainer: Any) -> tuple[dict, dict, torch.Tensor]:
    return (
        copy.deepcopy(module.state_dict()),
        copy.deepcopy(trainer.optimizers[0].state_dict()),
        torch.rand(1),
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_no_observer_effect(optimizer: str) -> None:
    make = lambda: Classifier(mlp(dropout=0.3).double(), optimizer=optimizer)  # noqa: E731
    m0, t0 = fit(make, [], steps=30, seed=3)
    ref = _state(m0, t0)
    m1, t1 = fit(make, [ICSCallback(every_n_steps=1)], steps=30, seed=3)
    got = _state(m1, t1)
    for key, value in ref[0].items():
        assert torch.equal(got[0][key], value), key
    for key, value in ref[1]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(got[1]["state"][key][name]), torch.as_tensor(tensor))
    assert torch.equal(got[2], ref[2])  # the next random number is the same


def test_failing_probe_warns_and_training_goes_on() -> None:
    calls = {"n": 0}

    def flaky_loss(module: Any, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        x, y = batch
        return nn.functional.cross_entropy(module(x), y)

    make = lambda: Classifier(mlp().double())  # noqa: E731
    m0, _ = fit(make, [], steps=6, seed=1)
    logger = MemoryLogger()
    with pytest.warns(DiagnosticWarning, match="injected failure"):
        m1, t1 = fit(
            make, [ICSCallback(every_n_steps=2, loss_fn=flaky_loss)], steps=6, seed=1, logger=logger
        )
    assert t1.global_step == 6
    for key, value in m0.state_dict().items():
        assert torch.equal(m1.state_dict()[key], value), key
    measured = sorted(step for step, vals in logger.history.items() if "ics/net.0/l2" in vals)
    assert measured == [2, 4]  # step 0 failed, the others were measured


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_training_step_logs_not_doubled(tmp_path: Any) -> None:
    logger = CSVLogger(tmp_path, name="run")
    fit(
        lambda: Classifier(mlp().double(), log_loss=True, return_dict=True),
        [ICSCallback(every_n_steps=1)],
        steps=8,
        logger=logger,
        log_every_n_steps=1,
    )
    rows = _csv_rows(logger)
    loss_rows = [r for r in rows if r.get("train/loss")]
    assert len(loss_rows) == 8
    ics_rows = [r for r in rows if r.get("ics/net.4/l2")]
    assert sorted(int(r["step"]) for r in ics_rows) == list(range(8))
    for key in ("l2", "cos", "l2_rel", "mean_shift", "std_shift", "emd"):
        assert all(r[f"ics/net.8/{key}"] for r in ics_rows)


def test_csv_logger_counts(tmp_path: Any) -> None:
    logger = CSVLogger(tmp_path, name="run")
    fit(lambda: Classifier(mlp().double()), [ICSCallback(every_n_steps=3)], steps=10, logger=logger)
    rows = _csv_rows(logger)
    steps = sorted(int(r["step"]) for r in rows if r.get("ics/net.0/cos"))
    assert steps == [0, 3, 6, 9]


def test_layer_selection_and_errors() -> None:
    logger = MemoryLogger()
    fit(
        lambda: Classifier(mlp().double()),
        [ICSCallback(every_n_steps=1, layers=["net.[48]"])],
        steps=1,
        logger=logger,
    )
    assert {k.split("/")[1] for k in logger.history[0]} == {"net.4", "net.8"}
    with pytest.raises(ValueError, match="Layer selector 'nothing' matches no module"):
        fit(lambda: Classifier(mlp().double()), [ICSCallback(layers=["nothing"])], steps=1)
    with pytest.raises(ValueError, match="Layer selector Conv2d matches no module"):
        fit(lambda: Classifier(mlp().double()), [ICSCallback(layers=[nn.Conv2d])], steps=1)
    with pytest.raises(ValueError, match="gradient accumulation"):
        fit(lambda: Classifier(mlp().double()), [ICSCallback()], steps=1, accumulate_grad_batches=2)
    with pytest.raises(
        ValueError, match="`every_n_steps` to be 'auto' or a positive integer, but got 0"
    ):
        ICSCallback(every_n_steps=0)
    with pytest.raises(
        TypeError,
        match=r"`layers` to be None, a module name \(glob\) or a torch\.nn\.Module subclass",
    ):
        ICSCallback(layers=[3])  # type: ignore[list-item]


def test_manual_optimisation_refused() -> None:
    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__(mlp().double())
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return loss

    with pytest.raises(ValueError, match="needs automatic optimisation"):
        fit(Manual, [ICSCallback()], steps=1)


def test_no_logger_warns() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(lambda: Classifier(mlp().double()), [ICSCallback(every_n_steps=1)], steps=1)
    assert any(
        "has no logger, so nothing it measures will be recorded" in str(w.message) for w in caught
    )
