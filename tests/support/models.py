"""Tiny LightningModules and helpers shared by the callback tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def mlp(norm: bool = True, dropout: float = 0.2, width: int = 16) -> nn.Sequential:
    """Linear → BN → ReLU → Dropout twice, then Linear: 8 inputs, 3 classes."""
    layers: list[nn.Module] = []
    cin = 8
    for _ in range(2):
        layers += [nn.Linear(cin, width), nn.BatchNorm1d(width) if norm else nn.Identity()]
        layers += [nn.ReLU(), nn.Dropout(dropout)]
        cin = width
    layers.append(nn.Linear(cin, 3))
    return nn.Sequential(*layers)


def cnn(norm: bool = True) -> nn.Sequential:
    """Two 3×3 convolutions with BatchNorm on (N, 1, 6, 6) inputs, then a linear head: 3 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4) if norm else nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4) if norm else nn.Identity(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


class Classifier(pl.LightningModule):
    """Cross-entropy on a given network; optimiser chosen by name."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: str = "sgd",
        lr: float = 0.05,
        log_loss: bool = False,
        return_dict: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.lr = lr
        self.log_loss = log_loss
        self.return_dict = return_dict

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.log_loss:
            self.log("train/loss", loss, on_step=True, on_epoch=False)
        return {"loss": loss} if self.return_dict else loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader(
    n: int = 128,
    batch_size: int = 32,
    image: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 6, 6) if image else (n, 8), generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(callbacks: list[Any], steps: int, logger: Any = False, **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(kwargs)
    return pl.Trainer(max_steps=steps, callbacks=callbacks, logger=logger, **settings)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call in memory: ``history[step] = {key: value}``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[int, dict[str, float]] = {}
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))
        self.history.setdefault(int(step or 0), {}).update(metrics)


class Recorder(pl.Callback):
    """Test-side record of each step: weights before and after, RNG state, batch, real loss."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.steps.append(
            {
                "step": trainer.global_step,
                "before": copy.deepcopy(pl_module.state_dict()),
                "rng": torch.get_rng_state(),
                "batch": [t.clone() for t in batch],
                "batch_idx": batch_idx,
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
            }
        )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps[-1]["loss"] = loss.detach().clone()
        self.steps[-1]["after"] = copy.deepcopy(pl_module.state_dict())


def fit(
    make_module: Callable[[], pl.LightningModule],
    callbacks: list[Any],
    steps: int,
    image: bool = False,
    seed: int = 0,
    logger: Any = False,
    dtype: torch.dtype = torch.float64,
    **kwargs: Any,
) -> tuple[pl.LightningModule, pl.Trainer]:
    pl.seed_everything(seed, verbose=False)
    module = make_module()
    t = trainer(callbacks, steps, logger=logger, **kwargs)
    t.fit(module, train_dataloaders=loader(image=image, seed=seed, dtype=dtype))
    return module, t


class CLIClassifier(Classifier):
    """A Classifier that LightningCLI can build from plain arguments."""

    def __init__(self, width: int = 16, lr: float = 0.05, dropout: float = 0.1) -> None:
        super().__init__(mlp(width=width, dropout=dropout).double(), lr=lr)


class RandomData(pl.LightningDataModule):
    """Random 8-feature, 3-class data in float64, unshuffled batches."""

    def __init__(self, n: int = 64, batch_size: int = 16) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> DataLoader:
        return loader(n=self.n, batch_size=self.batch_size)


class BNHessianCase(NamedTuple):
    """A float64 BatchNorm MLP in train mode on a fixed batch, its loss a function of the flat
    parameters (for ``torch.autograd.functional.hessian``/``jacobian``)."""

    probe: Any  # lightning_bn.probe.Probe
    params: dict[str, Tensor]
    batch: tuple[Tensor, Tensor]
    flat_loss: Callable[[Tensor], Tensor]
    flat0: Tensor
    generator: torch.Generator  # its state after drawing the batch


def bn_hessian_case() -> BNHessianCase:
    """Linear(8, 6) → BatchNorm1d → Tanh → Linear(6, 3), seed 0; 16 samples from seed 1."""
    from lightning_bn.probe import Probe

    torch.manual_seed(0)
    module = Classifier(
        nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    ).train()
    probe = Probe(module)
    gen = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(16, 8, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (16,), generator=gen),
    )
    params = probe.parameters()
    names, shapes = list(params), [params[n].shape for n in params]

    def flat_loss(flat: Tensor) -> Tensor:
        out, i = {}, 0
        for n, shape in zip(names, shapes, strict=True):
            out[n] = flat[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return probe.loss(out, batch)

    flat0 = torch.cat([params[n].reshape(-1) for n in names])
    return BNHessianCase(probe, params, batch, flat_loss, flat0, gen)
