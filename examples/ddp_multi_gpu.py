"""The diagnostics under DDP: one Trainer(strategy="ddp") line, on GPUs or CPU processes.

With DDP every callback computes what one process would on the global batch: gradients are
averaged over the ranks (as DDP does) before any norm is taken, and only rank zero logs.

    python examples/ddp_multi_gpu.py --devices 2                    # 2 GPUs
    python examples/ddp_multi_gpu.py --devices 2 --accelerator cpu  # 2 CPU processes (gloo)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_bn import ICSCallback, LipschitzCallback, SmoothnessCallback
from lightning_bn.experiments import MLP, ClassificationModule, DigitsDataModule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="auto", help="auto | gpu | cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", default="lightning_logs/ddp")
    args = parser.parse_args(argv)

    L.seed_everything(0)  # same initial weights on every rank
    module = ClassificationModule(MLP(64, (128, 128, 128), 10, norm="batchnorm"), lr=0.1)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp",  # the script is started again once per extra rank
        max_steps=args.steps,
        logger=CSVLogger(args.out, name="", version=""),
        callbacks=[
            ICSCallback(every_n_steps=args.every),
            LipschitzCallback(every_n_steps=args.every),
            SmoothnessCallback(every_n_steps=args.every, max_iters=10),
        ],
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    # batch_size is per rank: the global batch is devices × 32
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    if trainer.is_global_zero:
        metrics = Path(trainer.logger.log_dir) / "metrics.csv"  # type: ignore[union-attr]
        print(f"{trainer.world_size} ranks; metrics in {metrics}")


if __name__ == "__main__":
    main()
