"""Train a model with every batch-statistics layer, single-process or on 2 gloo ranks with SyncNorm.

    python -m tests.support.ddp_sync_run {single|ddp|ddp-nosync|ddp-uneven} OUT.json

As ``tests.support.ddp_run``: the single process sees batches of 2B samples, each rank B of them
(contiguous shards; ``ddp-nosync``: an unshuffled DistributedSampler), so the union of the ranks'
batches is the single run's batch. ``ddp`` trains with
``plugins=[SyncNorm()]``, ``ddp-nosync`` without, ``ddp-uneven`` with SyncNorm and batches of
7 and 9 samples. The loss is the sum over the rank's samples times world size ÷ global batch
size, so that DDP's average over ranks is the mean over the global batch even for uneven sizes. Rank zero writes every logged value, the final
weights and buffers, and the layer types seen during training.
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_bn import (
    BatchNorm,
    ICSCallback,
    L1Norm,
    L2Norm,
    LinfNorm,
    LipschitzCallback,
    NoiseInjectionCallback,
    SmoothnessCallback,
    SyncNorm,
)
from tests.support.ddp_run import B, Data
from tests.support.models import Classifier, MemoryLogger

STEPS = 3


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 6),
        BatchNorm(6),
        nn.Tanh(),
        nn.Linear(6, 6),
        L1Norm(6),
        nn.Tanh(),
        nn.Linear(6, 6),
        L2Norm(6),
        nn.Tanh(),
        nn.Linear(6, 6),
        LinfNorm(6),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).double()


UNEVEN = (7, 9)


class WeightedClassifier(Classifier):
    """Cross-entropy summed over the rank's samples, × world size ÷ global batch size."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y, reduction="sum")
        return loss * self.trainer.world_size / (2 * B)


class ShardedData(Data):
    """Rank r takes sizes[r] consecutive samples of each global batch of 2B, so the ranks'
    batches in rank order are the single process's batch (what global-batch noise assumes)."""

    def __init__(self, sizes: tuple[int, int]) -> None:
        super().__init__(ddp=True)
        self.sizes = sizes

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        start, size = sum(self.sizes[:rank]), self.sizes[rank]
        n = len(self.data) // (2 * B)
        batches = [list(range(2 * B * k + start, 2 * B * k + start + size)) for k in range(n)]
        return DataLoader(self.data, batch_sampler=batches)


class FailingLoss:
    """The module's loss as a ``loss_fn`` that raises on rank 1 at step 1, before any forward pass
    (a probe failure on one rank only, while the other enters the synchronised layers)."""

    def __call__(self, module: nn.Module, batch: Any) -> Tensor:
        trainer = getattr(module, "_trainer", None)
        if trainer is not None and trainer.global_rank == 1 and trainer.global_step == 1:
            raise RuntimeError("injected failure on rank 1")
        x, y = batch
        loss = nn.functional.cross_entropy(module(x), y, reduction="sum")
        return loss * (trainer.world_size if trainer is not None else 1) / (2 * B)


class TypeRecorder(pl.Callback):
    """The norm layers' types while training (after the plugin converted them)."""

    def __init__(self) -> None:
        self.types: list[str] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if not self.types:
            self.types = [type(m).__name__ for m in pl_module.net]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "ddp", "ddp-nosync", "ddp-uneven", "ddp-fail"])
    parser.add_argument("out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("always", message=".*skipped the measurement.*")
    torch.set_num_threads(1)
    ddp = args.mode != "single"
    recorder = TypeRecorder()
    callbacks: list[pl.Callback] = [recorder]
    if args.mode == "ddp-fail":
        fail = FailingLoss()
        callbacks += [
            ICSCallback(every_n_steps=1, loss_fn=fail),
            LipschitzCallback(every_n_steps=1, loss_fn=fail),
            SmoothnessCallback(every_n_steps=1, max_iters=5, loss_fn=fail),
        ]
    elif args.mode != "ddp-nosync":
        callbacks += [
            ICSCallback(every_n_steps=1),
            LipschitzCallback(every_n_steps=1),
            SmoothnessCallback(every_n_steps=2, power_iters=30, tol=1e-8),
            # per-entry noise of the global batch, each rank keeping its rows
            NoiseInjectionCallback(targets="net.7", seed=3, global_batch_noise=True),
        ]
    logger = MemoryLogger()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        plugins=[SyncNorm()] if args.mode in ("ddp", "ddp-uneven", "ddp-fail") else None,
        max_steps=STEPS,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = WeightedClassifier(make_net(), lr=0.1)
    if args.mode == "ddp-nosync":
        data = Data(ddp)  # unshuffled DistributedSampler: interleaved samples
    elif ddp:
        data = ShardedData(UNEVEN if args.mode == "ddp-uneven" else (B, B))
    else:
        data = Data(ddp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=".*skipped the measurement.*")
        trainer.fit(module, datamodule=data)
    skipped = [str(w.message) for w in caught if "skipped the measurement" in str(w.message)]
    if args.mode == "ddp-fail":  # every rank writes what it skipped
        with open(f"{args.out}.rank{trainer.global_rank}", "w") as fh:
            json.dump(skipped, fh)
    if trainer.global_rank == 0:
        out = {
            "history": {str(k): v for k, v in logger.history.items()},
            "state": {k: v.tolist() for k, v in module.state_dict().items()},
            "types_in_training": recorder.types,
            "types_after": [type(m).__name__ for m in module.net],
            "world_size": trainer.world_size,
        }
        with open(args.out, "w") as fh:
            json.dump(out, fh)


if __name__ == "__main__":
    main()
