"""Soak run for the memory test: the four callbacks at every step over two fits in one process.

Prints one JSON line ``{"start": MB, "fit1": MB, "fit2": MB}`` of resident memory (from
``/proc/self/statm``) before the first fit, after the first and after the second.
Usage: ``python -m tests.support.soak [STEPS] [WIDTH]``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ICSCallback, LipschitzCallback, NoiseInjectionCallback, SmoothnessCallback
from tests.support.models import Classifier, MemoryLogger, trainer


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _fit(steps: int, width: int, data: DataLoader) -> None:
    net = nn.Sequential(
        nn.Linear(32, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 3),
    )
    callbacks = [
        ICSCallback(every_n_steps=1),
        LipschitzCallback(every_n_steps=1, step_sizes=(1.0, 2.0)),
        SmoothnessCallback(every_n_steps=1, step_sizes=(1.0, 2.0), max_iters=2),
        NoiseInjectionCallback(log_every_n_steps=1),
    ]
    trainer(callbacks, steps, logger=MemoryLogger()).fit(Classifier(net, lr=0.01), data)
    gc.collect()


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    width = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(steps * 64, 32, generator=gen)
    y = torch.randint(0, 3, (steps * 64,), generator=gen)
    data = DataLoader(TensorDataset(x, y), batch_size=64)
    start = resident_mb()
    _fit(steps, width, data)
    fit1 = resident_mb()
    _fit(steps, width, data)
    fit2 = resident_mb()
    print(json.dumps({"start": start, "fit1": fit1, "fit2": fit2}))


if __name__ == "__main__":
    main()
