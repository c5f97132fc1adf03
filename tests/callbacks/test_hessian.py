"""HessianCallback in a real Trainer: every logged value against the exact Hessian of the measured
step (brute force on a deep copy, float64, BatchNorm in train mode, dropout masks replayed), no
observer effect, warm-start state, checks."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_bn import HessianCallback
from lightning_bn.diagnostics.eigen import ConvergenceWarning
from tests.support.models import Classifier, MemoryLogger, Recorder, fit, mlp

LAYERS = ("net.0", "net.4", "net.8")


class OptimizerState(pl.Callback):
    """The optimiser's state at the start of every step (what the callback measures with)."""

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.states.append(copy.deepcopy(trainer.optimizers[0].state_dict()))


def _exact(
    module: pl.LightningModule, record: dict[str, Any]
) -> tuple[Tensor, list[str], list[int]]:
    """The float64 Hessian of the step's train-mode loss at the weights before the step."""
    net = copy.deepcopy(module.net)
    net.load_state_dict({k[len("net.") :]: v for k, v in record["before"].items()})
    names = [n for n, p in net.named_parameters()]
    params = dict(net.named_parameters())
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    x, y = record["batch"]

    def loss_of(w: Tensor) -> Tensor:
        tensors = {n: t.view(params[n].shape) for n, t in zip(names, w.split(sizes), strict=True)}
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(record["rng"])
            out = functional_call(net, (tensors, {k: b.clone() for k, b in buffers.items()}), (x,))
        return nn.functional.cross_entropy(out, y)

    return torch.autograd.functional.hessian(loss_of, flat), [f"net.{n}" for n in names], sizes


def _indices(names: list[str], sizes: list[int], layer: str) -> Tensor:
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return torch.cat(
        [
            torch.arange(offsets[i], offsets[i + 1])
            for i, n in enumerate(names)
            if n.rsplit(".", 1)[0] == layer
        ]
    )


@pytest.fixture(scope="module")
def run() -> tuple[HessianCallback, MemoryLogger, Recorder, OptimizerState, pl.LightningModule]:
    cb = HessianCallback(every_n_steps=2, top_k=3, tol=1e-4, trace_max_samples=60)
    logger, rec, opt = MemoryLogger(), Recorder(), OptimizerState()
    module, _ = fit(
        lambda: Classifier(mlp(dropout=0.3).double(), optimizer="adam", lr=0.01),
        [rec, opt, cb],
        steps=5,
        seed=4,
        logger=logger,
    )
    return cb, logger, rec, opt, module


def test_logged_values_against_the_exact_hessian(run: Any) -> None:
    cb, logger, rec, opt, module = run
    assert cb.measured_steps == [0, 2, 4]
    for step in cb.measured_steps:
        got = logger.history[step]
        h, names, sizes = _exact(module, rec.steps[step])
        eig = torch.linalg.eigvalsh(h).flip(0)
        assert got["hessian/eig_converged"] == 1.0
        for i in range(3):
            assert got[f"hessian/eig_{i + 1}"] == pytest.approx(float(eig[i]), rel=1e-3)
        assert abs(got["hessian/trace"] - float(h.trace())) <= 3 * got["hessian/trace_stderr"]
        for layer in LAYERS:
            idx = _indices(names, sizes, layer)
            block = h[idx][:, idx]
            assert got[f"hessian/{layer}/eig_converged"] == 1.0
            assert got[f"hessian/{layer}/eig_max"] == pytest.approx(
                float(torch.linalg.eigvalsh(block)[-1]), rel=1e-3
            )
            err = got[f"hessian/{layer}/trace_stderr"]
            assert abs(got[f"hessian/{layer}/trace"] - float(block.trace())) <= 3 * err
        bins = [v for k, v in got.items() if k.startswith("hessian/density/bin_")]
        assert len(bins) == 32 and sum(bins) == pytest.approx(1.0, abs=1e-3)
        assert got["hessian/density/lo"] < float(eig[-1]) and got["hessian/density/hi"] > eig[0]
        if step == 0:  # Adam has no second moment before its first step
            assert "hessian/precond_eig_max" not in got
            continue
        # the preconditioned sharpness against P = sqrt(v / (1 - β₂^t)) + ε from the saved state
        state = opt.states[step]
        params = dict(module.named_parameters())
        order = list(params)
        diag = []
        for name in names:
            s = state["state"][order.index(name)]
            v = s["exp_avg_sq"].reshape(-1) / (1 - 0.999 ** float(s["step"]))
            diag.append(1.0 / (v.sqrt() + 1e-8))
        root = torch.cat(diag).sqrt()
        exact = float(torch.linalg.eigvalsh(root[:, None] * h * root[None, :])[-1])
        assert got["hessian/precond_converged"] == 1.0
        assert got["hessian/precond_eig_max"] == pytest.approx(exact, rel=1e-3)
        assert got["hessian/stability_threshold"] == pytest.approx(38 / 0.01)


def test_no_observer_effect() -> None:
    make = lambda: Classifier(mlp(dropout=0.3).double(), optimizer="adam")  # noqa: E731
    m0, t0 = fit(make, [], steps=6, seed=2)
    next0 = torch.rand(1)
    cb = HessianCallback(every_n_steps=2, density_starts=2, density_steps=10)
    m1, t1 = fit(make, [cb], steps=6, seed=2, logger=MemoryLogger())
    next1 = torch.rand(1)
    assert cb.measured_steps == [0, 2, 4]
    for key, value in m0.state_dict().items():
        assert torch.equal(m1.state_dict()[key], value), key
    s0, s1 = t0.optimizers[0].state_dict()["state"], t1.optimizers[0].state_dict()["state"]
    for key, value in s0.items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(s1[key][name]), torch.as_tensor(tensor)), name
    assert torch.equal(next0, next1)  # the global random stream is where it would have been


def test_blocks_start_from_the_top_k_eigenvectors_and_keep_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each layer's Lanczos starts from its part of the top-k eigenvectors just found (views of
    the kept warm start, no memory); no per-layer vector is kept between measurements, and an
    older checkpoint that has them still loads."""
    import lightning_bn.diagnostics.hessian as diag

    real = diag.block_top_eigenvalues
    seen: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def spy(matvec: Any, layout: Any, blocks: Any, init: Any, **kwargs: Any) -> Any:
        seen.append((dict(blocks), dict(init)))
        return real(matvec, layout, blocks, init, **kwargs)

    monkeypatch.setattr(diag, "block_top_eigenvalues", spy)
    cb = HessianCallback(every_n_steps=2, density=False, layers=list(LAYERS))
    fit(lambda: Classifier(mlp().double()), [cb], steps=4, seed=5, logger=MemoryLogger())
    assert len(seen) == 2
    blocks, init = seen[-1]
    (top,) = cb.state.top  # the last measurement's top-k, summed: the next one's warm start
    assert set(init) == set(blocks) == set(LAYERS)
    for name, idx in blocks.items():
        assert isinstance(idx, slice)  # a layer's parameters are contiguous
        assert init[name].untyped_storage().data_ptr() == top.untyped_storage().data_ptr()
        assert torch.equal(init[name], top[idx])
        assert float(init[name].abs().max()) > 0
    assert [f.name for f in dataclasses.fields(diag.HessianState)] == ["top", "precond"]
    state = cb.state_dict()
    assert set(state["warm"]) == {"top", "precond"}
    old = {**state, "warm": {**state["warm"], "blocks": {LAYERS[0]: torch.ones(3)}}}
    other = HessianCallback(every_n_steps=2, density=False, layers=list(LAYERS))
    other.load_state_dict(old)
    assert torch.equal(other.state.top[0], top)


def test_measures_on_the_modules_own_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """No copy of the parameters (one copy of memory): the measurement, which runs before the
    step, reads the module's own tensors, and its values are those on a copy."""
    import lightning_bn.callbacks.hessian as hessian_module

    real = hessian_module.compute_hessian
    shared: list[bool] = []
    on_copy: list[dict[str, float]] = []

    def spy(probe: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        own = dict(probe.module.named_parameters())
        shared.append(all(params[n].data_ptr() == own[n].data_ptr() for n in own))
        copies = {n: t.clone() for n, t in params.items()}
        gen = kwargs["generator"]
        state = copy.deepcopy(kwargs["state"])
        expected, _ = real(probe, copies, *args, **{**kwargs, "state": state,
                                                     "generator": copy.deepcopy(gen)})  # fmt: skip
        on_copy.append(expected)
        return real(probe, params, *args, **kwargs)

    monkeypatch.setattr(hessian_module, "compute_hessian", spy)
    logger = MemoryLogger()
    cb = HessianCallback(every_n_steps=2, density_starts=1, density_steps=8)
    fit(lambda: Classifier(mlp().double()), [cb], steps=4, seed=3, logger=logger)
    assert shared == [True, True]
    got = [logger.history[step] for step in cb.measured_steps]
    assert len(got) == len(on_copy) == 2
    for logged, expected in zip(got, on_copy, strict=True):
        assert len(expected) > 40  # top-k, trace, per-layer blocks, density bins
        for key, value in expected.items():
            assert logged[f"hessian/{key}"] == pytest.approx(value, rel=0, abs=0, nan_ok=True), key


def test_sgd_precondition_is_the_top_eigenvalue_and_state_roundtrips() -> None:
    cb = HessianCallback(every_n_steps=1, top_k=1, trace=False, density=False, per_layer=False)
    logger = MemoryLogger()
    fit(lambda: Classifier(mlp().double(), lr=0.05), [cb], steps=2, logger=logger)
    got = logger.history[1]
    assert set(got) == {
        "hessian/eig_1",
        "hessian/eig_converged",
        "hessian/eig_iters",
        "hessian/precond_eig_max",
        "hessian/precond_converged",
        "hessian/stability_threshold",
    }
    assert got["hessian/precond_eig_max"] == got["hessian/eig_1"]
    assert got["hessian/stability_threshold"] == pytest.approx(2 * 1.9 / 0.05)  # momentum 0.9
    state = cb.state_dict()
    assert len(state["warm"]["top"]) == 1 and state["measured_steps"] == [0, 1]
    other = HessianCallback(every_n_steps=1, top_k=1, trace=False, density=False, per_layer=False)
    other.load_state_dict(state)
    assert torch.equal(other.state.top[0], state["warm"]["top"][0])
    assert torch.equal(other._generator.get_state(), cb._generator.get_state())


def test_unconverged_is_flagged_not_hidden() -> None:
    cb = HessianCallback(
        every_n_steps=1,
        top_k=2,
        max_iters=3,
        tol=1e-12,
        trace_rtol=1e-9,
        trace_max_samples=12,
        density=False,
        per_layer=False,
        preconditioned=False,
    )
    logger = MemoryLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # the callback logs, never warns
        fit(lambda: Classifier(mlp().double()), [cb], steps=1, logger=logger)
    got = logger.history[0]
    assert got["hessian/eig_converged"] == 0.0 and got["hessian/eig_iters"] == 3.0
    assert got["hessian/trace_converged"] == 0.0 and got["hessian/trace_samples"] == 12.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 5, "max_iters": 5}, "max_iters"),
        ({"tol": -1.0}, "tol"),
        ({"density_bins": 0}, "density_bins"),
        ({"hvp_method": "magic"}, "hvp_method"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HessianCallback(**kwargs)


def test_unsupported_optimiser_warns_once_and_logs_the_rest() -> None:
    class Adagrad(Classifier):
        def configure_optimizers(self) -> Any:
            return torch.optim.Adagrad(self.parameters(), lr=0.01)

    cb = HessianCallback(every_n_steps=1, top_k=1, trace=False, density=False, per_layer=False)
    logger = MemoryLogger()
    with pytest.warns(UserWarning, match="no preconditioned sharpness"):
        fit(lambda: Adagrad(mlp().double()), [cb], steps=2, logger=logger)
    assert set(logger.history[1]) == {"hessian/eig_1", "hessian/eig_converged", "hessian/eig_iters"}


def test_csv_logger_keeps_every_key(tmp_path: Any) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    cb = HessianCallback(every_n_steps=1, top_k=2, density_bins=12, density_steps=10)
    logger = CSVLogger(tmp_path, name="run")
    fit(lambda: Classifier(mlp().double(), optimizer="adam"), [cb], steps=2, logger=logger)
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("hessian/eig_1")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert float(rows[1]["hessian/precond_eig_max"]) > 0
    bins = [float(rows[1][f"hessian/density/bin_{j:02d}"]) for j in range(12)]
    assert sum(bins) == pytest.approx(1.0, abs=1e-3)
    for layer in LAYERS:
        assert rows[1][f"hessian/{layer}/eig_max"] != ""
