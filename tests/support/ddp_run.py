"""Train a tiny model with the diagnostic callbacks, single-process or real DDP (2 CPU ranks, gloo).

Run as a script (Lightning's DDP launcher re-runs it once per extra rank):

    python -m tests.support.ddp_run {single|ddp} OUT.json [--fail-rank R --fail-step S] [--auto]

Single-process runs see batches of 2B samples; each DDP rank sees B of them through its own
unshuffled DistributedSampler (``use_distributed_sampler=False``), so at every step the union of
the ranks' batches is exactly the single run's batch. Rank zero writes every logged value to
OUT.json, with the final weights.

``--hessian``: a HessianCallback at every step (Adam, so the preconditioned sharpness runs from
the second step), 4 steps.

``--auto``: a LipschitzCallback with ``every_n_steps="auto"`` and a budget of 1 on a fake clock
whose measurement cost differs by rank (rank 0's ledger plans 10 steps ahead, rank 1's alone would
not measure again), 20 steps; every rank writes its interval, measured steps and ledger spending to OUT.json.rank<R>.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lightning_bn import HessianCallback, ICSCallback, LipschitzCallback, SmoothnessCallback
from tests.support.models import Classifier, MemoryLogger

B = 8
STEPS = 4


def make_net() -> nn.Module:
    """No BatchNorm (its per-rank statistics would make the networks differ); LayerNorm is
    per sample, so the Lipschitz callback has an activation gradient to reduce."""
    return nn.Sequential(
        nn.Linear(8, 12),
        nn.LayerNorm(12),
        nn.Tanh(),
        nn.Linear(12, 12),
        nn.Tanh(),
        nn.Linear(12, 3),
    ).double()


class Data(pl.LightningDataModule):
    def __init__(self, ddp: bool, steps: int = STEPS) -> None:
        super().__init__()
        self.ddp = ddp
        gen = torch.Generator().manual_seed(0)
        n = 2 * B * steps
        self.data = TensorDataset(
            torch.randn(n, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen),
        )

    def train_dataloader(self) -> DataLoader:
        if not self.ddp:
            return DataLoader(self.data, batch_size=2 * B, shuffle=False)
        sampler = DistributedSampler(
            self.data,
            num_replicas=self.trainer.world_size,
            rank=self.trainer.global_rank,
            shuffle=False,
        )
        return DataLoader(self.data, batch_size=B, sampler=sampler)


class FakeClock:
    """A clock that only moves when told: 1 s per training step (``Tick``), and ``per_call[rank]``
    seconds per probe loss evaluation."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tick(pl.Callback):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.clock.now += 1.0


class SlowOnRank:
    """A loss_fn that advances the fake clock by a rank-dependent amount per call."""

    def __init__(self, clock: FakeClock, per_call: dict[int, float]) -> None:
        self.clock, self.per_call = clock, per_call

    def __call__(self, module: nn.Module, batch: Any) -> torch.Tensor:
        trainer = getattr(module, "_trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        self.clock.now += self.per_call[rank]
        x, y = batch
        return nn.functional.cross_entropy(module(x), y)


class FailOnRank:
    """A loss_fn that raises on one rank at one measured step (a rank-local probe failure)."""

    def __init__(self, rank: int, step: int, call: int | None = None) -> None:
        self.rank, self.step, self.call = rank, step, call  # call: only the call-th evaluation
        self.trainer: pl.Trainer | None = None
        self.calls = 0

    def __call__(self, module: nn.Module, batch: Any) -> torch.Tensor:
        trainer = getattr(module, "_trainer", None)
        if (
            trainer is not None
            and trainer.global_rank == self.rank
            and trainer.global_step == self.step
        ):
            self.calls += 1
            if self.call is None or self.calls == self.call:
                raise RuntimeError(f"injected failure on rank {self.rank}")
        x, y = batch
        return nn.functional.cross_entropy(module(x), y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "ddp"])
    parser.add_argument("out")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-step", type=int, default=None)
    # only SmoothnessCallback's evaluation number N of the step fails (a point of its grid)
    parser.add_argument("--fail-call", type=int, default=None)
    parser.add_argument("--auto", action="store_true")
    parser.add_argument("--hessian", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ddp = args.mode == "ddp"
    if args.auto:
        run_auto(ddp, args.out)
        return
    loss_fn = FailOnRank(args.fail_rank, args.fail_step) if args.fail_rank is not None else None
    smooth_fn = loss_fn
    if args.fail_call is not None:
        loss_fn, smooth_fn = None, FailOnRank(args.fail_rank, args.fail_step, args.fail_call)
    callbacks: list[pl.Callback] = [
        ICSCallback(every_n_steps=1, loss_fn=loss_fn),
        LipschitzCallback(every_n_steps=1, loss_fn=loss_fn),
        SmoothnessCallback(every_n_steps=2, power_iters=30, tol=1e-6, loss_fn=smooth_fn),
    ]
    optimizer = "sgd"
    if args.hessian:
        callbacks = [HessianCallback(every_n_steps=1, top_k=2, density_starts=2, density_steps=12)]
        optimizer = "adam"
    logger = MemoryLogger()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_steps=STEPS,
        callbacks=callbacks,
        logger=logger,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Classifier(make_net(), optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.01)
    trainer.fit(module, datamodule=Data(ddp))
    if trainer.global_rank == 0:
        out = {
            "history": {str(k): v for k, v in logger.history.items()},
            "weights": {k: v.tolist() for k, v in module.state_dict().items()},
            "world_size": trainer.world_size,
            "pid": os.getpid(),
        }
        with open(args.out, "w") as fh:
            json.dump(out, fh)


def run_auto(ddp: bool, out: str) -> None:
    clock = FakeClock()
    # the first measurement at the first plan (step 4: the a-priori 1 + 13 / 3 steps fit a
    # budget of 1); Lipschitz evaluates the loss 1 + len(step_sizes) = 13 times: 0.13 s on rank 0
    # (next at step 14), 13 s on rank 1 (alone, its ledger would not afford another in 20 steps)
    callback = LipschitzCallback(loss_fn=SlowOnRank(clock, {0: 0.01, 1: 1.0}), budget=1.0)
    callback.clock = clock
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_steps=20,
        callbacks=[callback, Tick(clock)],
        logger=MemoryLogger(),
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(make_net(), lr=0.1), datamodule=Data(ddp, steps=20))
    result = {
        "every_n_steps": callback.every_n_steps,
        "overhead": callback.overhead,
        "measured_steps": callback.measured_steps,
        "spent": callback.ledger.spent,
        "world_size": trainer.world_size,
    }
    with open(f"{out}.rank{trainer.global_rank}", "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
    # gloo's threads torn down before the interpreter exits (left to exit they can abort it:
    # "terminate called without an active exception"), as sync_layers_run does
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
