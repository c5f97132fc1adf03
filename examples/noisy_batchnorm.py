"""Noisy BatchNorm (Santurkar et al. 2018, Fig. 2) on scikit-learn's digits, logged to W&B.

Trains the same MLP four ways: without normalisation ("standard"), the standard network with the
noise injected where BatchNorm would be, with BatchNorm, and with BatchNorm followed by the paper's
random, time-varying scale and shift noise ("noisy BN"). Noisy BN trains about as well as BN although
the layer inputs are less stable than without BN: BN's benefit is not the stability of the layer
input distributions. The ``noise/...`` metrics show that instability.

W&B runs offline unless ``WANDB_MODE`` says otherwise (``wandb sync <dir>`` uploads them later).

    python examples/noisy_batchnorm.py --steps 600
"""

from __future__ import annotations

import argparse
import itertools
import os

os.environ.setdefault("WANDB_MODE", "offline")

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks.noise_injection import NoiseInjectionCallback
from lightning_bn.layers import create_norm_layer

# name: (normalisation layer, inject noise)
CONFIGS: dict[str, tuple[str, bool]] = {
    "standard": ("none", False),
    "standard + noise": ("none", True),
    "batchnorm": ("batchnorm", False),
    "noisy batchnorm": ("batchnorm", True),
}


class DigitsMLP(L.LightningModule):
    """``depth`` blocks of Linear → norm → ReLU, then a linear head; SGD on cross-entropy."""

    def __init__(self, norm: str, width: int = 64, depth: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        dims = [64] + [width] * depth
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Linear(a, b),
                    create_norm_layer(norm, b),  # `none` gives nn.Identity, the noise's slot
                    nn.ReLU(),
                )
                for a, b in itertools.pairwise(dims)
            )
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train/loss", loss)
        self.log("train/acc", (logits.argmax(1) == y).float().mean())
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])


def digits_loaders(seed: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Digits scaled to [0, 1]; 1400 training images, the other 397 held out."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, val = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).split(1400)
    train_loader = DataLoader(
        TensorDataset(x[train], y[train]),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return train_loader, DataLoader(TensorDataset(x[val], y[val]), batch_size=len(val))


def run(name: str, args: argparse.Namespace) -> dict[str, float]:
    norm, noise = CONFIGS[name]
    L.seed_everything(args.seed, verbose=False)
    model = DigitsMLP(norm, width=args.width, depth=args.depth, lr=args.lr)
    callbacks: list[Callback] = []
    if noise:
        # with BN: every normalisation layer (the default); without: the Identity placeholders
        targets = None if norm != "none" else "blocks.*.1"
        callbacks.append(
            NoiseInjectionCallback(
                targets=targets, seed=args.seed, log_every_n_steps=args.log_every
            )
        )
    logger: WandbLogger | bool = False
    if not args.no_wandb:
        logger = WandbLogger(
            project=args.project, group="noisy-batchnorm", name=name, save_dir=args.save_dir
        )
        logger.log_hyperparams({"config": name, "seed": args.seed, "steps": args.steps})
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=args.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train_loader, val_loader = digits_loaders(args.seed, args.batch_size)
    trainer.fit(model, train_loader, val_loader)
    result = {"train_acc": accuracy(model, train_loader), "val_acc": accuracy(model, val_loader)}
    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update({f"final/{k}": v for k, v in result.items()})
        logger.experiment.finish()
    return result


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Accuracy of the model in evaluation mode (no noise, BN running statistics)."""
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per run")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10, help="logging interval in steps")
    parser.add_argument("--project", default="lightning-bn")
    parser.add_argument("--save-dir", default="wandb_runs", help="where W&B keeps its runs")
    parser.add_argument("--no-wandb", action="store_true", help="run without any logger")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not args.no_wandb:
        os.makedirs(args.save_dir, exist_ok=True)

    results = {name: run(name, args) for name in CONFIGS}
    width = max(map(len, CONFIGS))
    print(f"\ndigits, {args.steps} SGD steps at lr {args.lr}, seed {args.seed}")
    print(f"{'':{width}}  train acc  val acc")
    for name, result in results.items():
        print(f"{name:{width}}  {result['train_acc']:9.3f}  {result['val_acc']:7.3f}")
    return results


if __name__ == "__main__":
    main()
