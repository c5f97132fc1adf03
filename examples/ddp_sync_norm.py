"""ℓ1 / ℓ∞ / BatchNorm networks under DDP with the global batch's statistics: SyncNorm.

`Trainer(sync_batchnorm=True)` synchronises only torch's BatchNorm layers (and on the CPU not
even those: torch's SyncBatchNorm needs a GPU). `plugins=[SyncNorm()]` synchronises torch's and
every layer of this package, on GPUs (nccl) and CPU processes (gloo): each rank normalises with
the mean and ℓp divisor of the global batch, so the network and every diagnostic are those of
one process training on the global batch.

    python examples/ddp_sync_norm.py --devices 2 --accelerator cpu --norm linf   # 2 CPU processes
    python examples/ddp_sync_norm.py --devices 4 --norm l1                        # 4 GPUs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_bn import LipschitzCallback, SyncNorm
from lightning_bn.experiments import MLP, ClassificationModule, DigitsDataModule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="auto", help="auto | gpu | cpu")
    parser.add_argument("--norm", default="l1", help="batchnorm | l1 | l2 | linf")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", default="lightning_logs/ddp_sync_norm")
    args = parser.parse_args(argv)

    L.seed_everything(0)  # same initial weights on every rank
    module = ClassificationModule(MLP(64, (128, 128, 128), 10, norm=args.norm), lr=0.1)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp",  # the script is started again once per extra rank
        plugins=[SyncNorm()],  # in place of sync_batchnorm=True
        max_steps=args.steps,
        logger=CSVLogger(args.out, name="", version=""),
        # Theorem 4.1 is checked with the global batch's statistics
        callbacks=[LipschitzCallback(every_n_steps=args.every)],
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    # batch_size is per rank: the layers normalise over devices × 32 samples
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    if trainer.is_global_zero:
        metrics = Path(trainer.logger.log_dir) / "metrics.csv"  # type: ignore[union-attr]
        print(f"{trainer.world_size} ranks, {args.norm} synchronised; metrics in {metrics}")


if __name__ == "__main__":
    main()
