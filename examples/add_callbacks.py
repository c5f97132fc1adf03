"""Add lightning-bn's diagnostics to a LightningModule you already have.

The module below is ordinary Lightning code that knows nothing about lightning-bn. The four
callbacks measure, while it trains, what Santurkar et al. (2018) measure: internal covariate
shift (``ics/...``), the loss and gradient along the gradient direction (``lipschitz/...``,
``smoothness/...``) and, with ``--noise``, BatchNorm with the paper's injected noise
(``noise/...``). They log through the trainer's loggers; here a CSVLogger, whose file the
script reads back at the end. A WandbLogger works the same way (``--wandb`` for an offline run).

    python examples/add_callbacks.py --steps 200
    python examples/add_callbacks.py --steps 200 --no-batchnorm --out lightning_logs/no_bn
    lightning-bn plot lightning_logs/add_callbacks lightning_logs/no_bn --labels BN,standard
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ICSCallback, LipschitzCallback, NoiseInjectionCallback, SmoothnessCallback


class MyClassifier(L.LightningModule):
    """A plain MLP with BatchNorm (or without), trained with SGD: your model goes here."""

    def __init__(self, lr: float = 0.1, batchnorm: bool = True) -> None:
        super().__init__()
        self.lr = lr

        def norm() -> nn.Module:
            return nn.BatchNorm1d(128) if batchnorm else nn.Identity()

        self.net = nn.Sequential(
            nn.Linear(64, 128), norm(), nn.ReLU(),
            nn.Linear(128, 128), norm(), nn.ReLU(),
            nn.Linear(128, 10),
        )  # fmt: skip

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss  # the callbacks probe the loss this method returns

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="steps between measurements")
    parser.add_argument("--noise", action="store_true", help="inject the noisy-BN noise")
    parser.add_argument(
        "--no-batchnorm", action="store_true", help="the same MLP without its BatchNorm layers"
    )
    parser.add_argument("--wandb", action="store_true", help="also log to W&B (offline)")
    parser.add_argument("--out", default="lightning_logs/add_callbacks")
    args = parser.parse_args(argv)
    if args.noise and args.no_batchnorm:
        parser.error("--noise injects noise after the BatchNorm layers: drop --no-batchnorm")

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    loader = DataLoader(TensorDataset(x, torch.tensor(digits.target)), batch_size=64, shuffle=True)

    callbacks: list[L.Callback] = [
        ICSCallback(every_n_steps=args.every),  # every Linear/Conv layer by default
        LipschitzCallback(every_n_steps=args.every),  # η grid: lr × {0.5, ..., 4}
        SmoothnessCallback(every_n_steps=args.every, max_iters=10),
    ]
    if args.noise:
        callbacks.append(NoiseInjectionCallback(log_every_n_steps=args.every))
    csv_logger = CSVLogger(args.out, name="", version="")
    loggers: list[Logger] = [csv_logger]
    if args.wandb:
        loggers.append(
            WandbLogger(project="lightning-bn-examples", save_dir=args.out, offline=True)
        )

    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    trainer.fit(MyClassifier(batchnorm=not args.no_batchnorm), loader)

    # Read the last value of a few keys back from the CSV file.
    rows = list(csv.DictReader((Path(csv_logger.log_dir) / "metrics.csv").open()))
    last = {k: float(v) for row in rows for k, v in row.items() if v and k != "epoch"}
    shown = ["smoothness/beta_eff", "lipschitz/loss_range", "ics/net.3/l2", "ics/net.3/cos"]
    shown += [k for k in last if k.endswith("thm41_ratio")]
    for key in shown:
        print(f"{key:<36} {last[key]:.4g}")
    return last


if __name__ == "__main__":
    main()
