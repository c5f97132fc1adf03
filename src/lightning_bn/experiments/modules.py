"""LightningModules of the built-in experiments: classification (digits, CIFAR-10) and the DLN.

Both wrap any ``nn.Module`` passed as ``model`` (it is not saved in ``hparams``; pass it again to
``load_from_checkpoint``), take a batch ``(x, y)`` and return the loss tensor from
``training_step``, so every diagnostic callback of the package can probe them.

Logged metrics:
    - ``train/loss``, ``val/loss``, ``test/loss``: the loss of the batch (training: per step;
      validation and test: averaged over the epoch, weighted by batch size).
    - ``train/acc``, ``val/acc``, ``test/acc`` (:class:`ClassificationModule` only): top-1 accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["OPTIMIZERS", "ClassificationModule", "RegressionModule", "squared_error_loss"]

#: Optimisers accepted by the modules' ``optimizer`` argument.
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
_REDUCTIONS = ("mean", "sum")


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected argument `model` to be a torch.nn.Module, but got {model!r}")
    return model


def _check_optim_args(lr: Any, optimizer: Any, momentum: Any, weight_decay: Any) -> str:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"Expected argument `lr` to be a finite number > 0, but got {lr!r}")
    name = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if name not in OPTIMIZERS:
        raise ValueError(
            f"Expected argument `optimizer` to be one of {', '.join(map(repr, OPTIMIZERS))}, "
            f"but got {optimizer!r}"
        )
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0 <= momentum < 1
    ):
        raise ValueError(f"Expected argument `momentum` to be in [0, 1), but got {momentum!r}")
    if name != "sgd" and momentum != 0:
        raise ValueError(
            f"Argument `momentum` applies to optimizer='sgd' only, but got momentum={momentum!r} "
            f"with optimizer={optimizer!r}"
        )
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(
            f"Expected argument `weight_decay` to be a finite number >= 0, but got {weight_decay!r}"
        )
    return str(name)


def _build_optimizer(
    params: Any, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"Expected a batch (inputs, targets), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


class _ModelModule(pl.LightningModule):
    """Shared wiring of the experiment modules: a wrapped model, the three steps routed to
    ``_shared_step(batch, stage)``, and the optimiser chosen by name."""

    _optimizer_name: str

    def _wrap(self, model: Any, lr: Any, optimizer: Any, momentum: Any, weight_decay: Any) -> None:
        self.model = _check_model(model)
        self._optimizer_name = _check_optim_args(lr, optimizer, momentum, weight_decay)

    def forward(self, x: Tensor) -> Tensor:
        """Output of the wrapped model."""
        return self.model(x)

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Loss of the batch (a scalar tensor); logs the ``train/*`` metrics."""
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logs the ``val/*`` metrics (epoch averages)."""
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logs the ``test/*`` metrics (epoch averages)."""
        return self._shared_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD (with ``momentum``) or Adam over all parameters, with ``lr`` and ``weight_decay``."""
        hp = self.hparams
        return _build_optimizer(
            self.parameters(), self._optimizer_name, hp["lr"], hp["momentum"], hp["weight_decay"]
        )


def _infer_num_classes(model: nn.Module, num_classes: Any) -> int:
    """``num_classes`` if given, else the model's ``num_classes`` or its last ``nn.Linear`` width."""
    if num_classes is None:
        num_classes = getattr(model, "num_classes", None)
        if num_classes is None:
            heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not heads:
                raise ValueError(
                    "Expected argument `num_classes` (the number of logits) for a model without"
                    " a `num_classes` attribute or an `nn.Linear` head, but got None"
                )
            num_classes = heads[-1].out_features
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"Expected argument `num_classes` to be an int >= 2, but got {num_classes!r}"
        )
    return num_classes


class ClassificationModule(_ModelModule):
    """Cross-entropy classification with plain SGD (the paper's setting) or Adam.

    Args:
        model: the network; maps inputs ``(N, *)`` to logits ``(N, num_classes)``.
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum (the paper: none); must be 0 for Adam.
        weight_decay: L2 penalty of the optimiser.
        num_classes: the number of logits; ``None`` (default) reads the model's
            ``num_classes`` attribute or the width of its last ``nn.Linear``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an optimiser argument outside its range, or no ``num_classes`` found
            (the message names it).

    Logged metrics:
        ``train/loss``, ``train/acc`` (every step), ``val/loss``, ``val/acc`` (every validation
        epoch), ``test/loss``, ``test/acc``. Accuracy is top-1 over all samples
        (:class:`torchmetrics.classification.MulticlassAccuracy` with ``average="micro"``, one
        per stage), so the epoch value is over the global batch under DDP as well.

    Example:
        >>> from lightning_bn.experiments.models import MLP
        >>> module = ClassificationModule(MLP(64, (32,), 10), lr=0.1)
        >>> module.hparams.lr
        0.1
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self._wrap(model, lr, optimizer, momentum, weight_decay)
        classes = _infer_num_classes(self.model, num_classes)
        # num_classes is the model's: like the model, it is not a hyperparameter of the module
        self.save_hyperparameters(ignore=["model", "num_classes"])
        # one metric per stage: their states must not mix (torchmetrics' advice)
        self.train_acc = MulticlassAccuracy(num_classes=classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=classes, average="micro")

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = _unpack(batch)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy = getattr(self, f"{stage}_acc")
        # forward: the batch's accuracy (the step value) and the running state (the epoch value)
        accuracy(logits.detach(), y)
        n = int(y.shape[0])
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=n)
        self.log(f"{stage}/acc", accuracy, prog_bar=stage == "val", batch_size=n)
        return loss


def squared_error_loss(pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""Squared Euclidean error per sample, averaged (or summed) over the samples.

    .. math::
        L = \frac{1}{n} \sum_{i=1}^{n} \lVert \hat y_i - y_i \rVert_2^2
        \quad (\text{``mean''}), \qquad
        L = \sum_{i=1}^{n} \lVert \hat y_i - y_i \rVert_2^2 \quad (\text{``sum''}).

    Unlike :func:`torch.nn.functional.mse_loss` (which also divides by the dimension), the
    squared norm of each sample is kept whole, as in the paper's DLN loss
    :math:`\lVert W_{25} \cdots W_1 x - A x \rVert^2`.

    Args:
        pred: predictions ``(n, d)`` (or ``(n, *)``, flattened per sample).
        target: targets of the same shape.
        reduction: ``"mean"`` or ``"sum"`` over the ``n`` samples.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: shapes differ or an unknown ``reduction``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"Expected argument `reduction` to be one of 'mean', 'sum', but got {reduction!r}"
        )
    if pred.shape != target.shape:
        raise ValueError(
            f"Expected predictions and targets of the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    per_sample = (pred - target).pow(2).reshape(pred.shape[0], -1).sum(dim=1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


class RegressionModule(_ModelModule):
    r"""Least-squares regression; with :class:`DeepLinearDataModule` the paper's DLN experiment.

    The loss of a batch ``(x, y)`` is :func:`squared_error_loss`,

    .. math::
        L = \frac{1}{n} \sum_{i=1}^{n} \lVert f(x_i) - y_i \rVert_2^2,

    i.e. for the deep linear network without norm and ``y = A x``,
    :math:`\frac1n \sum_i \lVert (W_{25} \cdots W_1 - A) x_i \rVert^2`: the squared norm of each
    sample's error is summed over its coordinates (not averaged as in ``mse_loss``) and averaged
    over the samples (``reduction="sum"`` sums them instead: the same gradient direction, ``n``
    times larger, so ``lr`` then means ``n`` times more). The paper does not say which it uses;
    the mean keeps the loss scale independent of ``n``. With the full-batch data module and
    ``optimizer="sgd"``, ``momentum=0``, every step is one step of full-batch gradient descent
    :math:`W \leftarrow W - \text{lr}\, \nabla L(W)`.

    Args:
        model: the network (a :class:`~lightning_bn.experiments.models.DeepLinearNetwork`, or any
            model mapping ``x`` to predictions of the targets' shape).
        lr: learning rate (spec §6: 1e-6 for the DLN).
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum; must be 0 for Adam.
        weight_decay: L2 penalty of the optimiser.
        reduction: ``"mean"`` or ``"sum"`` over the samples.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an argument outside its range (the message names it).

    Logged metrics:
        ``train/loss`` (every step), ``val/loss``, ``test/loss`` (epoch averages).

    Example:
        >>> from lightning_bn.experiments import DeepLinearNetwork
        >>> module = RegressionModule(DeepLinearNetwork(depth=3, width=4), lr=1e-3)
        >>> module.hparams.reduction
        'mean'
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-6,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self._wrap(model, lr, optimizer, momentum, weight_decay)
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"Expected argument `reduction` to be one of 'mean', 'sum', but got {reduction!r}"
            )
        self.save_hyperparameters(ignore=["model"])

    def compute_loss(self, batch: Any) -> Tensor:
        """The loss of a batch ``(x, y)`` without logging (see the class docstring)."""
        x, y = _unpack(batch)
        return squared_error_loss(self(x), y, self.hparams["reduction"])

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        loss = self.compute_loss(batch)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=len(batch[0]))
        return loss
