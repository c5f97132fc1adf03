"""A measured layer replaced or frozen during training: ICS resolves its layers again, warns once
per change, and the values it logs afterwards are those of the model as it now is."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.errors import DiagnosticWarning
from tests.support.models import Classifier, MemoryLogger, Recorder, fit, mlp


class Change(pl.Callback):
    """At step 2, replace ``net.4`` (a Linear) by a new one, or freeze it."""

    def __init__(self, what: str) -> None:
        self.what = what

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != 2:
            return
        if self.what == "replace":
            torch.manual_seed(5)
            pl_module.net[4] = nn.Linear(16, 16).double()
            trainer.optimizers[0].add_param_group({"params": list(pl_module.net[4].parameters())})
        else:
            pl_module.net[4].requires_grad_(False)


def _run(what: str) -> tuple[Any, MemoryLogger, Recorder, list[str]]:
    logger, recorder = MemoryLogger(), Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, _ = fit(
            lambda: Classifier(mlp().double()),
            [Change(what), recorder, ICSCallback(every_n_steps=1)],
            steps=4,
            logger=logger,
        )
    said = [
        str(w.message)
        for w in caught
        if issubclass(w.category, DiagnosticWarning) and "measured layers changed" in str(w.message)
    ]
    return module, logger, recorder, said


def _brute_l2(module: Any, record: dict[str, Any], layer: int) -> float:
    """‖G − G′‖ of ``net.<layer>``: G at W^t, G′ with the layers before it at W^{t+1}."""
    net = copy.deepcopy(module.net)
    x, y = record["batch"]

    def grad(state: dict[str, torch.Tensor]) -> torch.Tensor:
        net.load_state_dict({k[len("net.") :]: v for k, v in state.items()})
        torch.set_rng_state(record["rng"])
        loss = nn.functional.cross_entropy(net(x), y)
        gs = torch.autograd.grad(loss, [net[layer].weight, net[layer].bias])
        return torch.cat([g.reshape(-1) for g in gs])

    before = record["before"]
    mixed = dict(before)
    for key, value in record["after"].items():
        if key.startswith("net.") and int(key.split(".")[1]) < layer and "running" not in key:
            mixed[key] = value
    return float((grad(before) - grad(mixed)).norm())


def test_replaced_layer_is_measured_anew_and_said_once() -> None:
    module, logger, recorder, said = _run("replace")
    assert len(said) == 1
    assert "net.4 was replaced by another module" in said[0] and "step 2" in said[0]
    for step in (2, 3):
        got = logger.history[step]
        assert {"ics/net.0/l2", "ics/net.4/l2", "ics/net.8/l2"} <= set(got)
        record = recorder.steps[step]
        for layer in (4, 8):
            expected = _brute_l2(module, record, layer)
            assert got[f"ics/net.{layer}/l2"] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_frozen_layer_leaves_with_a_warning() -> None:
    module, logger, recorder, said = _run("freeze")
    assert len(said) == 1
    assert "net.4 left (frozen" in said[0] and "measures net.0, net.8" in said[0]
    for step in (2, 3):
        got = logger.history[step]
        assert "ics/net.4/l2" not in got
        expected = _brute_l2(module, recorder.steps[step], 8)
        assert got["ics/net.8/l2"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
