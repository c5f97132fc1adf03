from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import swap_norm_layers
from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.diagnostics.landscape import DEFAULT_STEP_SIZES, compute_smoothness
from lightning_bn.probe import Probe, RNGState, StepRecord
from tests.support.models import (
    Classifier,
    MemoryLogger,
    Recorder,
    bn_hessian_case,
    cnn,
    fit,
    mlp,
    trainer,
)

BN_LAYERS = {"mlp": ["net.1", "net.5"], "cnn": ["net.1", "net.4"]}


def _net_at(make_net: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    net = make_net().double()
    net.load_state_dict({k[len("net.") :]: v for k, v in state.items()})
    return net.train()


def _loss(net: nn.Module, record: dict[str, Any]) -> torch.Tensor:
    torch.set_rng_state(record["rng"])  # the step's dropout masks
    x, y = record["batch"]
    return nn.functional.cross_entropy(net(x), y)


def _grad(net: nn.Module, record: dict[str, Any]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(_loss(net, record), list(net.parameters())))


def _moved(
    make_net: Any, record: dict[str, Any], grads: list[torch.Tensor], eta: float
) -> nn.Module:
    net = _net_at(make_net, record["before"])
    with torch.no_grad():
        for p, g in zip(net.parameters(), grads, strict=True):
            p.sub_(eta * g)
    return net


def _thm41_by_hand(
    y: torch.Tensor, gz: torch.Tensor, gy: torch.Tensor, gamma: torch.Tensor, eps: float
) -> float:
    """Both sides of Theorem 4.1 with an explicit loop over channels."""
    lhs = rhs = 0.0
    for j in range(y.shape[1]):
        yj = y[:, j].reshape(-1)
        gj = gz[:, j].reshape(-1)
        m = yj.numel()
        mu = yj.mean()
        var = ((yj - mu) ** 2).mean()
        yhat = (yj - mu) / torch.sqrt(var + eps)
        lhs += float((gy[:, j] ** 2).sum())
        rhs += float(
            gamma[j] ** 2 / (var + eps) * (gj @ gj - gj.sum() ** 2 / m - (gj @ yhat) ** 2 / m)
        )
    return lhs / rhs


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_lipschitz_matches_brute_force(arch: str) -> None:
    make_net = mlp if arch == "mlp" else cnn
    recorder, logger = Recorder(), MemoryLogger()
    fit(
        lambda: Classifier(make_net().double(), optimizer="adam", lr=0.01),
        [recorder, LipschitzCallback(every_n_steps=1)],
        steps=3,
        image=arch == "cnn",
        logger=logger,
    )
    for record in recorder.steps:
        net = _net_at(make_net, record["before"])
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def keep(name: str, inputs: dict = inputs, outputs: dict = outputs) -> Any:
            def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                inputs[name], outputs[name] = args[0], output

            return hook

        for name in BN_LAYERS[arch]:
            net.get_submodule(name[len("net.") :]).register_forward_hook(keep(name))
        loss = _loss(net, record)
        params = list(net.parameters())
        tensors = [inputs[n] for n in BN_LAYERS[arch]] + [outputs[n] for n in BN_LAYERS[arch]]
        grads = torch.autograd.grad(loss, params + tensors)
        g, act = grads[: len(params)], grads[len(params) :]
        k = len(BN_LAYERS[arch])
        losses = []
        for s in DEFAULT_STEP_SIZES:
            with torch.no_grad():
                losses.append(float(_loss(_moved(make_net, record, g, s * record["lr"]), record)))
        got = logger.history[record["step"]]
        assert got["lipschitz/loss"] == pytest.approx(float(loss.detach()), rel=1e-9)
        assert got["lipschitz/loss_min"] == pytest.approx(min(losses), rel=1e-6)
        assert got["lipschitz/loss_max"] == pytest.approx(max(losses), rel=1e-6)
        assert got["lipschitz/loss_range"] == pytest.approx(
            max(losses) - min(losses), rel=1e-6, abs=1e-12
        )
        grad_norm = math.sqrt(sum(float((t**2).sum()) for t in g))
        assert got["lipschitz/grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
        for i, name in enumerate(BN_LAYERS[arch]):
            assert got[f"lipschitz/{name}/act_grad_norm"] == pytest.approx(
                float(act[i].norm()), rel=1e-6
            )
            bn = net.get_submodule(name[len("net.") :])
            expected = _thm41_by_hand(
                inputs[name].detach(), act[k + i], act[i], bn.weight.detach(), bn.eps
            )
            assert got[f"lipschitz/{name}/thm41_ratio"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_theorem41_over_50_batches(arch: str, eps: float) -> None:
    make_net = mlp if arch == "mlp" else cnn

    def make() -> Classifier:
        net = make_net().double()
        if eps == 0.0:  # torch refuses eps = 0 in training: our BatchNorm allows it
            net = swap_norm_layers(net, "batchnorm", eps=0.0)
        return Classifier(net)

    logger = MemoryLogger()
    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(5)
    shape = (400, 1, 6, 6) if arch == "cnn" else (400, 8)
    data = TensorDataset(
        torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5,
        torch.randint(0, 3, (400,), generator=gen),
    )
    t = trainer([LipschitzCallback(every_n_steps=1, step_sizes=[1.0])], steps=50, logger=logger)
    t.fit(make(), DataLoader(data, batch_size=8, shuffle=True))
    ratios = [
        v for vals in logger.history.values() for k, v in vals.items() if k.endswith("thm41_ratio")
    ]
    assert len(ratios) == 100  # 50 batches × 2 BatchNorm layers
    assert max(ratios) <= 1 + 1e-5
    if eps == 0.0:
        assert all(r == pytest.approx(1.0, abs=1e-4) for r in ratios)
    else:
        assert min(ratios) < 1.0


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_smoothness_matches_brute_force(arch: str) -> None:
    make_net = mlp if arch == "mlp" else cnn
    recorder, logger = Recorder(), MemoryLogger()
    fit(
        lambda: Classifier(make_net().double(), lr=0.05),
        [
            recorder,
            SmoothnessCallback(
                every_n_steps=1, hessian=False, step_sizes=[0.1, 0.3, 1.0], relative_to_lr=False
            ),
        ],
        steps=2,
        image=arch == "cnn",
        logger=logger,
    )
    for record in recorder.steps:
        g = _grad(_net_at(make_net, record["before"]), record)
        g_norm = math.sqrt(sum(float((t**2).sum()) for t in g))
        diffs, betas = [], []
        for eta in [0.1, 0.3, 1.0]:
            g_eta = _grad(_moved(make_net, record, g, eta), record)
            d = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(g, g_eta, strict=True)))
            diffs.append(d)
            betas.append(d / (eta * g_norm))
        got = logger.history[record["step"]]
        assert got["smoothness/grad_diff_min"] == pytest.approx(min(diffs), rel=1e-6)
        assert got["smoothness/grad_diff_max"] == pytest.approx(max(diffs), rel=1e-6)
        assert got["smoothness/beta_eff"] == pytest.approx(max(betas), rel=1e-6)


class LinearRegression(pl.LightningModule):
    """L(w) = mean((Xw - y)²): a quadratic with the constant Hessian H = 2 XᵀX / n."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 1, bias=False, dtype=torch.float64)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.lin(x).squeeze(1) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_quadratic_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64) * torch.tensor(
        [3.0, 1.0, 1.0, 0.5, 0.2], dtype=torch.float64
    )
    y = torch.randn(32, generator=gen, dtype=torch.float64)
    recorder, logger = Recorder(), MemoryLogger()
    cb = SmoothnessCallback(every_n_steps=1, max_iters=200, tol=1e-10)
    pl.seed_everything(0, verbose=False)
    module = LinearRegression()
    t = trainer([recorder, cb], steps=3, logger=logger)
    t.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    hess = 2 * x.T @ x / 32
    eigs = torch.linalg.eigvalsh(hess)
    for record in recorder.steps:
        w = record["before"]["lin.weight"].reshape(-1)
        g = 2 * x.T @ (x @ w - y) / 32
        hg = hess @ g
        got = logger.history[record["step"]]
        # ∇L(w − ηg) = g − ηHg, so every step size gives β = ‖Hg‖ / ‖g‖
        assert got["smoothness/beta_eff"] == pytest.approx(float(hg.norm() / g.norm()), rel=1e-8)
        assert got["smoothness/grad_diff_min"] == pytest.approx(
            0.5 * 0.05 * float(hg.norm()), rel=1e-8
        )
        assert got["smoothness/grad_diff_max"] == pytest.approx(
            4.0 * 0.05 * float(hg.norm()), rel=1e-8
        )
        assert got["smoothness/hessian_top_eig"] == pytest.approx(float(eigs[-1]), rel=1e-6)
        assert got["smoothness/grad_curvature"] == pytest.approx(float(g @ hg / (g @ g)), rel=1e-8)


def test_top_eigenvalue_against_full_hessian() -> None:
    case = bn_hessian_case()
    probe, params, batch, gen = case.probe, case.params, case.batch, case.generator
    flat_loss, flat0 = case.flat_loss, case.flat0
    hess = torch.autograd.functional.hessian(flat_loss, flat0)
    eigs = torch.linalg.eigvalsh(hess)
    dominant = eigs[eigs.abs().argmax()]
    g = torch.autograd.functional.jacobian(flat_loss, flat0)
    result = compute_smoothness(probe, params, StepRecord(batch), [0.1], max_iters=1000, tol=1e-9)
    assert result.metrics["hessian_top_eig"] == pytest.approx(float(dominant), rel=1e-3)
    assert result.metrics["grad_curvature"] == pytest.approx(
        float(g @ hess @ g / (g @ g)), rel=1e-8
    )
    # warm start: a nearby point converges in fewer products than a cold start
    moved = {
        k: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()
    }
    cold = compute_smoothness(probe, moved, StepRecord(batch), [0.1], max_iters=1000, tol=1e-6)
    warm = compute_smoothness(
        probe, moved, StepRecord(batch), [0.1], max_iters=1000, tol=1e-6, init=result.eigenvector
    )
    assert warm.metrics["hessian_iters"] < cold.metrics["hessian_iters"]
    assert warm.metrics["hessian_top_eig"] == pytest.approx(
        cold.metrics["hessian_top_eig"], rel=1e-3
    )


def _final_state(module: Any, t: Any) -> tuple[dict, dict, torch.Tensor]:
    return (
        copy.deepcopy(module.state_dict()),
        copy.deepcopy(t.optimizers[0].state_dict()),
        torch.rand(1),
    )


@pytest.mark.parametrize(
    "make_cb",
    [
        lambda: LipschitzCallback(every_n_steps=1),
        lambda: SmoothnessCallback(every_n_steps=2, max_iters=5),
    ],
    ids=["lipschitz", "smoothness"],
)
def test_no_observer_effect(make_cb: Any) -> None:
    make = lambda: Classifier(mlp(dropout=0.3).double(), optimizer="adam")  # noqa: E731
    ref = _final_state(*fit(make, [], steps=20, seed=2))
    got = _final_state(*fit(make, [make_cb()], steps=20, seed=2))
    for key, value in ref[0].items():
        assert torch.equal(got[0][key], value), key
    for key, value in ref[1]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(got[1]["state"][key][name]), torch.as_tensor(tensor))
    assert torch.equal(got[2], ref[2])


def test_warm_start_state_roundtrip() -> None:
    cb = SmoothnessCallback(every_n_steps=1, max_iters=10)
    fit(lambda: Classifier(mlp().double()), [cb], steps=2, logger=MemoryLogger())
    state = cb.state_dict()
    assert state["eigenvector"] is not None and state["measured_steps"] == [0, 1]
    other = SmoothnessCallback()
    other.load_state_dict(state)
    assert other.eigenvector is not None
    for k, v in state["eigenvector"].items():
        assert torch.equal(other.eigenvector[k], v)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="`step_sizes` to be a non-empty sequence of positive"):
        LipschitzCallback(step_sizes=[0.1, -1.0])
    with pytest.raises(ValueError, match="`max_iters` to be a positive integer"):
        SmoothnessCallback(max_iters=0)
    with (
        pytest.warns(DeprecationWarning, match="`power_iters` is deprecated"),
        pytest.raises(ValueError, match="`power_iters` to be a positive integer"),
    ):
        SmoothnessCallback(power_iters=0)
    with pytest.raises(ValueError, match="`tol` to be a finite number >= 0"):
        SmoothnessCallback(tol=-1.0)
    with pytest.raises(ValueError, match="`hvp_method` to be one of"):
        SmoothnessCallback(hvp_method="magic")
    with pytest.raises(
        TypeError, match="`step_sizes` to be a non-empty sequence of positive finite numbers"
    ):
        LipschitzCallback(step_sizes=["a"])  # type: ignore[list-item]


def test_absolute_step_sizes() -> None:
    recorder, logger = Recorder(), MemoryLogger()
    fit(
        lambda: Classifier(mlp(dropout=0.0).double()),
        [recorder, LipschitzCallback(every_n_steps=1, step_sizes=[0.2], relative_to_lr=False)],
        steps=1,
        logger=logger,
    )
    record = recorder.steps[0]
    g = _grad(_net_at(lambda: mlp(dropout=0.0), record["before"]), record)
    with torch.no_grad():
        expected = float(_loss(_moved(lambda: mlp(dropout=0.0), record, g, 0.2), record))
    got = logger.history[0]
    assert got["lipschitz/loss_min"] == pytest.approx(expected, rel=1e-9)
    assert got["lipschitz/loss_range"] == 0.0


def test_rng_state_object() -> None:
    state = RNGState.capture()
    with state.replay():
        a = torch.rand(3)
    b = torch.rand(3)
    assert torch.equal(a, b)  # replay drew the same numbers and left the stream where it was


def test_probe_sees_the_noise_of_the_step_it_measures() -> None:
    """Listed before NoiseInjectionCallback, the Lipschitz probe still evaluates the very loss
    of the real step (the step's noise is drawn before the probe runs)."""
    from lightning_bn import NoiseInjectionCallback

    recorder, logger = Recorder(), MemoryLogger()
    callbacks = [recorder, LipschitzCallback(every_n_steps=1), NoiseInjectionCallback(seed=3)]
    fit(lambda: Classifier(mlp(dropout=0.0).double()), callbacks, steps=4, logger=logger)
    for record in recorder.steps:
        real = float(record["loss"])
        assert logger.history[record["step"]]["lipschitz/loss"] == pytest.approx(real, rel=1e-12)


def test_theorem41_with_noise_after_batchnorm() -> None:
    """Noise injected after a BatchNorm layer changes what follows it, not the layer: the ratio
    uses the gradient w.r.t. the layer's own output and stays ≤ 1."""
    from lightning_bn import NoiseInjectionCallback

    logger = MemoryLogger()
    callbacks = [NoiseInjectionCallback(seed=1), LipschitzCallback(every_n_steps=1)]
    fit(lambda: Classifier(mlp().double()), callbacks, steps=6, logger=logger)
    ratios = [v for vals in logger.history.values() for k, v in vals.items() if "thm41" in k]
    assert len(ratios) == 12
    assert max(ratios) <= 1 + 1e-9


def test_probe_grid_methods_equal_one_call_per_point() -> None:
    """losses_along / loss_and_grad_along reparametrise once for the grid: same values as
    one loss / loss_and_grad call per step size (dropout and BatchNorm in the model)."""
    torch.manual_seed(0)
    module = Classifier(mlp(dropout=0.3).double())
    module.train()
    probe = Probe(module)
    gen = torch.Generator().manual_seed(2)
    batch = (
        torch.randn(16, 8, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (16,), generator=gen),
    )
    rng = RNGState.capture()
    params = probe.parameters()
    _, grad = probe.loss_and_grad(params, StepRecord(batch, 0, rng))
    etas = [0.01, 0.1, 0.5]
    moved = [{k: v - eta * grad[k] if k in grad else v for k, v in params.items()} for eta in etas]
    expected_losses = torch.stack(
        [probe.loss(p, StepRecord(batch, 0, rng)) for p in moved]
    ).detach()
    torch.testing.assert_close(
        probe.losses_along(params, grad, etas, StepRecord(batch, 0, rng)), expected_losses
    )
    along = probe.loss_and_grad_along(params, grad, etas, StepRecord(batch, 0, rng))
    for (loss, g), point in zip(along, moved, strict=True):
        ref_loss, ref_grad = probe.loss_and_grad(point, StepRecord(batch, 0, rng))
        torch.testing.assert_close(loss, ref_loss)
        for k, v in ref_grad.items():
            torch.testing.assert_close(g[k], v)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    probe.losses_along(params, grad, etas, StepRecord(batch, 0, rng))
    for k, v in module.state_dict().items():  # running statistics untouched
        assert torch.equal(v, before[k]), k


def test_bf16_mixed_probe_computes_the_training_loss() -> None:
    """Under precision="bf16-mixed" (CPU autocast) the probe runs in the step's precision
    context: its loss at W^t is the real step's loss, bit for bit."""
    recorder, logger = Recorder(), MemoryLogger()
    fit(
        lambda: Classifier(mlp(dropout=0.3)),
        [
            recorder,
            LipschitzCallback(every_n_steps=1),
            SmoothnessCallback(every_n_steps=2, max_iters=3),
        ],
        steps=3,
        logger=logger,
        precision="bf16-mixed",
        dtype=torch.float32,
    )
    for record in recorder.steps:
        values = logger.history[record["step"]]
        assert values["lipschitz/loss"] == float(record["loss"])
        assert all(math.isfinite(v) for v in values.values())


@pytest.mark.parametrize(("basis", "cold"), [(0, 9), (5, 5), (None, 5)])
def test_lanczos_on_the_quadratic_logs_the_exact_dominant_eigenvalue(
    basis: int | None, cold: int
) -> None:
    """eig_algorithm="lanczos" (the default): on L(w) = mean((Xw - y)²) the Hessian 2XᵀX/n is
    constant, so a cold start is exact after at most 5 Lanczos steps (the Krylov space is then the
    whole space): 5 products with a basis, 2·5 - 1 without one (the default), and the warm start
    of the next steps (an exact eigenvector) after one product."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64) * torch.tensor(
        [3.0, 1.0, 1.0, 0.5, 0.2], dtype=torch.float64
    )
    y = torch.randn(32, generator=gen, dtype=torch.float64)
    assert SmoothnessCallback().eig_algorithm == "lanczos"
    assert SmoothnessCallback().lanczos_basis == 0
    with pytest.raises(ValueError, match="`eig_algorithm` to be one of 'power', 'lanczos'"):
        SmoothnessCallback(eig_algorithm="arnoldi")
    logger = MemoryLogger()
    cb = SmoothnessCallback(every_n_steps=1, tol=0.0, eig_algorithm="lanczos", lanczos_basis=basis)
    assert cb._settings()["eig_algorithm"] == "lanczos"  # in the W&B run config
    pl.seed_everything(0, verbose=False)
    t = trainer([cb], steps=3, logger=logger)
    t.fit(LinearRegression(), DataLoader(TensorDataset(x, y), batch_size=32))
    eigs = torch.linalg.eigvalsh(2 * x.T @ x / 32)
    dominant = float(eigs[eigs.abs().argmax()])
    iters = []
    for step in range(3):
        got = logger.history[step]
        assert got["smoothness/hessian_top_eig"] == pytest.approx(dominant, rel=1e-12)
        iters.append(got["smoothness/hessian_iters"])
    assert iters[0] <= cold and iters[1:] == [1.0, 1.0]
