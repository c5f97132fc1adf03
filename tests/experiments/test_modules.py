"""Tests of the experiment LightningModules with a real ``lightning.Trainer``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_bn.experiments.data import (
    CIFAR10DataModule,
    DeepLinearDataModule,
    DigitsDataModule,
    write_cifar10_like,
)
from lightning_bn.experiments.deep_linear import DeepLinearNetwork
from lightning_bn.experiments.models import MLP, VGG, SmallCNN
from lightning_bn.experiments.modules import (
    ClassificationModule,
    RegressionModule,
    squared_error_loss,
)


def _trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("arch", "norm"), [("mlp", "batchnorm"), ("mlp", "none"), ("cnn", "batchnorm")]
)
def test_a_few_trainer_steps_on_digits_reduce_the_loss(arch: str, norm: str) -> None:
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=0, as_images=arch == "cnn")
    model = (
        MLP(64, (64, 64), 10, norm=norm) if arch == "mlp" else SmallCNN(norm=norm, widths=(8, 16))
    )
    module = ClassificationModule(model, lr=0.1)
    before = _trainer().validate(module, dm, verbose=False)[0]
    trainer = _trainer(max_steps=100, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, dm)
    assert trainer.global_step == 100
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc"} <= set(metrics)
    after = _trainer().validate(module, dm, verbose=False)[0]
    assert after["val/loss"] < 0.6 * before["val/loss"]
    assert after["val/acc"] > 0.7
    assert 0.0 <= float(metrics["train/acc"]) <= 1.0


def test_vgg_trains_on_cifar_files(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    dm = CIFAR10DataModule(write_cifar10_like(tmp_path, n_per_batch=8), batch_size=16)
    module = ClassificationModule(VGG([8, "M", 16, "M", 16, "M"], norm="batchnorm"), lr=0.1)
    trainer = _trainer(max_steps=3, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert trainer.global_step == 3
    result = trainer.test(module, dm, verbose=False)[0]
    assert {"test/loss", "test/acc"} <= set(result)
    assert np.isfinite(result["test/loss"])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_classification_steps_return_the_cross_entropy() -> None:
    torch.manual_seed(0)
    module = ClassificationModule(MLP(64, (8,), 10, norm="none"))
    x, y = torch.randn(5, 64), torch.tensor([0, 1, 2, 3, 4])
    loss = module.training_step((x, y), 0)
    assert loss.shape == () and loss.requires_grad
    torch.testing.assert_close(loss, nn.functional.cross_entropy(module(x), y))


def test_classification_optimisers_and_hparams() -> None:
    model = MLP(64, (8,), 10)
    module = ClassificationModule(model, lr=0.05, momentum=0.9, weight_decay=1e-4)
    assert "model" not in module.hparams
    assert dict(module.hparams) == {
        "lr": 0.05,
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 1e-4,
    }
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.9
    assert opt.defaults["weight_decay"] == 1e-4
    adam = ClassificationModule(model, lr=1e-3, optimizer="adam").configure_optimizers()
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"optimizer": "rmsprop"}, ValueError, "optimizer"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"optimizer": "adam", "momentum": 0.9}, ValueError, "momentum"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"model": "mlp"}, TypeError, "model"),
    ],
)
def test_bad_module_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = {"model": MLP(64, (8,), 10), **kwargs}
    with pytest.raises(error, match=match):
        ClassificationModule(**kwargs)
    with pytest.raises(error, match=match):
        RegressionModule(**kwargs)
    with pytest.raises(ValueError, match="reduction"):
        RegressionModule(MLP(64, (8,), 10), reduction="max")


def _closed_form_dln_loss(weights: list[np.ndarray], a: np.ndarray, x: np.ndarray) -> float:
    """Mean over samples of ‖(W_L ⋯ W_1 − A) x_i‖², by a plain numpy loop."""
    product = np.eye(a.shape[0])
    for w in weights:
        product = w @ product
    error = (product - a) @ x.T  # (dim, n): one column per sample
    return float(np.mean(np.sum(error**2, axis=0)))


def test_dln_loss_equals_the_closed_form() -> None:
    torch.manual_seed(0)
    dm = DeepLinearDataModule(n_samples=64, dim=10, seed=2, steps_per_epoch=1)
    net = DeepLinearNetwork(depth=25, width=10)
    module = RegressionModule(net, lr=1e-4)
    weights = [w.detach().double().numpy() for w in net.weights()]
    a, x = dm.data.A.double().numpy(), dm.data.x.double().numpy()
    expected = _closed_form_dln_loss(weights, a, x)
    loss = module.compute_loss((dm.data.x, dm.data.y))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    module_sum = RegressionModule(net, lr=1e-4, reduction="sum")
    total = module_sum.compute_loss((dm.data.x, dm.data.y)).item()
    assert total == pytest.approx(64 * expected, rel=1e-4)


def test_dln_trainer_step_is_full_batch_gradient_descent() -> None:
    torch.manual_seed(0)
    dm = DeepLinearDataModule(n_samples=40, dim=10, seed=1, steps_per_epoch=3)
    net = DeepLinearNetwork(depth=25, width=10)
    lr = 1e-3
    module = RegressionModule(net, lr=lr)
    w0 = [w.detach().double().clone().requires_grad_(True) for w in net.weights()]
    x, y = dm.data.x.double(), dm.data.y.double()
    # Independent autograd reference: L(W) = mean_i ‖W_L ⋯ W_1 x_i − y_i‖² (y = A x rounded to
    # float32, as the data module stores it; the closed form with A is checked above).
    product = torch.linalg.multi_dot(w0[::-1])
    reference = (x @ product.T - y).pow(2).sum(dim=1).mean()
    grads = torch.autograd.grad(reference, w0)
    expected_loss = reference.item()

    trainer = _trainer(max_steps=1, precision="64-true")
    trainer.fit(module, dm)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(expected_loss, rel=1e-9)
    for w_new, w_old, g in zip(net.weights(), w0, grads, strict=True):
        torch.testing.assert_close(w_new.detach(), (w_old - lr * g).detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm", ["none", "batchnorm"])
def test_dln_training_reduces_the_loss(norm: str) -> None:
    L.seed_everything(0, verbose=False)
    dm = DeepLinearDataModule(n_samples=200, dim=10, seed=0, steps_per_epoch=50)
    module = RegressionModule(DeepLinearNetwork(depth=25, width=10, norm=norm), lr=1e-3)
    first = module.compute_loss((dm.data.x, dm.data.y)).item()
    trainer = _trainer(max_steps=100, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, dm)
    assert trainer.global_step == 100
    assert float(trainer.callback_metrics["train/loss"]) < 0.8 * first


def test_squared_error_loss() -> None:
    pred, target = torch.randn(6, 4), torch.randn(6, 4)
    mean = squared_error_loss(pred, target)
    torch.testing.assert_close(mean, 4 * nn.functional.mse_loss(pred, target))
    torch.testing.assert_close(squared_error_loss(pred, target, "sum"), 6 * mean)
    with pytest.raises(ValueError, match="shape"):
        squared_error_loss(pred, target[:, :3])
    with pytest.raises(ValueError, match="reduction"):
        squared_error_loss(pred, target, "none")


def test_accuracy_is_top1_over_all_samples_per_step_and_epoch() -> None:
    """train/acc per step and val/acc per epoch against argmax counted by hand (uneven batches)."""
    from torch.utils.data import DataLoader, TensorDataset

    from tests.support.models import MemoryLogger

    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 8, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    module = ClassificationModule(model, lr=0.05)
    assert module.train_acc.num_classes == 4  # read from the last nn.Linear
    batches = DataLoader(TensorDataset(x, y), batch_size=16)  # 16, 16, 16, 2
    memory = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=memory,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with torch.no_grad():
        expected_step = (model(x[:16]).argmax(1) == y[:16]).double().mean().item()
    trainer.fit(module, batches)  # one step
    assert memory.history[0]["train/acc"] == pytest.approx(expected_step, abs=1e-7)
    with torch.no_grad():
        expected_val = (model(x).argmax(1) == y).double().mean().item()  # after the step
    (result,) = trainer.validate(module, batches, verbose=False)  # all 50 samples, 4 batches
    assert result["val/acc"] == pytest.approx(expected_val, abs=1e-7)
    (val,) = [v["val/acc"] for v in memory.history.values() if "val/acc" in v]
    assert val == pytest.approx(expected_val, abs=1e-7)


def test_num_classes_from_the_model_or_an_error() -> None:
    assert ClassificationModule(MLP(64, (8,), 7)).val_acc.num_classes == 7
    assert ClassificationModule(nn.Identity(), num_classes=5).test_acc.num_classes == 5
    with pytest.raises(ValueError, match="`num_classes`"):
        ClassificationModule(nn.Identity())
    with pytest.raises(ValueError, match="`num_classes` to be an int >= 2"):
        ClassificationModule(MLP(64, (8,), 10), num_classes=1)


def test_logged_accuracy_is_untouched_by_diagnostic_probes() -> None:
    """ICS probes after the optimiser step (before Lightning reads the step's metric values)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bn import ICSCallback, LipschitzCallback
    from tests.support.models import MemoryLogger

    def run(callbacks: list[Any]) -> dict[int, dict[str, float]]:
        L.seed_everything(0, verbose=False)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        memory = MemoryLogger()
        L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=4,
            callbacks=callbacks,
            logger=memory,
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        ).fit(ClassificationModule(model, lr=0.5), DataLoader(TensorDataset(x, y), batch_size=16))
        keys = ("train/acc", "train/loss")
        return {s: {k: v[k] for k in keys} for s, v in memory.history.items() if "train/acc" in v}

    plain = run([])
    measured = run([ICSCallback(every_n_steps=1), LipschitzCallback(every_n_steps=1)])
    assert sorted(plain) == [0, 1, 2, 3]
    assert measured == plain
