"""Extra peak memory of each diagnostic callback at its defaults, in parameter copies.

A ~10M-parameter MLP (1024 inputs, four hidden layers of 1536 with BatchNorm and ReLU, 10
classes; float32), batch 16, 3 training steps with the callback measuring at every step. Each fit
runs in a fresh process; the extra peak is the process's peak resident memory (``ru_maxrss``)
with the callback minus that of the same fit without it, divided by the parameters' size (one
float32 copy). The callback's own ``<prefix>/peak_mem_mb`` (the peak of one measurement, sampled)
is printed beside it.

Resident memory depends on the C allocator as well as on what the callback allocates. glibc's
``malloc`` serves blocks below its mapping threshold (raised as mapped blocks are freed, up to
32 MiB: a layer's gradient here, or half a copy in bfloat16) from its heap and keeps them
resident once freed, so freed blocks that are not reused at the peak count too, and they shift
from run to run (by up to 2 copies). Each fit therefore runs twice, the second time (baseline
included) with ``MALLOC_MMAP_THRESHOLD_=1048576``, glibc's setting that maps every block from
1 MiB on and returns it when freed: that column is close to what the callback holds at its peak,
the first is what a default glibc process shows. (Other allocators ignore the variable.)

The optimiser is SGD (``--optimizer adam``: Adam, lr 1e-3). It matters to ``HessianCallback``,
which with an adaptive optimiser also measures the preconditioned sharpness (from the second
step on: Adam has no state before its first), and to the baseline (Adam's two moments).

Run: ``PYTHONPATH=src python benchmarks/peak_memory.py [--optimizer adam]`` (about 9 minutes on
two cores); ``--only HessianCallback`` measures the named callbacks only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
from typing import Any, ClassVar

CALLBACKS = ["none", "ICSCallback", "LipschitzCallback", "SmoothnessCallback", "HessianCallback"]


def _child(name: str, optimizer: str) -> None:
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_bn.callbacks as cbs

    torch.manual_seed(0)
    widths = [1024, 1536, 1536, 1536, 1536]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(widths[-1], 10))

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            if optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=1e-3)
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Keep(pl.loggers.logger.Logger):
        values: ClassVar[dict[str, float]] = {}
        name, version = "keep", 0

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            return None

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            for k, v in metrics.items():
                if k.endswith("/peak_mem_mb"):
                    Keep.values[k] = max(Keep.values.get(k, 0.0), v)

    x, y = torch.randn(48, 1024), torch.randint(0, 10, (48,))
    callbacks = [] if name == "none" else [getattr(cbs, name)(every_n_steps=1)]
    for callback in callbacks:
        callback.log_peak_memory = True
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=callbacks,
        logger=Keep(),
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Task(), DataLoader(TensorDataset(x, y), batch_size=16))
    n_params = sum(p.numel() for p in net.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    print(json.dumps({"params": n_params, "peak_mb": peak_mb, "logged": Keep.values}))


def main(names: list[str], optimizer: str) -> None:
    runs = {"glibc default": {}, "blocks >= 1 MiB returned": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}
    rows: dict[str, dict[str, Any]] = {}
    for label, extra_env in runs.items():
        for name in names:
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, optimizer],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, **extra_env},
            ).stdout
            rows[f"{label}/{name}"] = json.loads(out.strip().splitlines()[-1])
    base = rows[f"glibc default/{names[0]}"]
    copy_mb = base["params"] * 4 / 2**20
    print(
        f"model: {base['params'] / 1e6:.1f}M parameters (one float32 copy = {copy_mb:.1f} MiB),"
        f" optimiser {optimizer}"
    )
    print("extra peak resident memory over the same fit without a callback, in parameter copies")
    head = "".join(f"{label:>26}" for label in runs)
    print(f"{'callback':<20}{head}{'logged peak_mem_mb':>20}")
    for name in names[1:]:
        cells, logged = [], 0.0
        for label in runs:
            row, baseline = rows[f"{label}/{name}"], rows[f"{label}/{names[0]}"]
            if not row["logged"]:  # a skipped measurement would make the callback look cheap
                raise SystemExit(f"{name} logged no measurement (skipped? run it alone to see why)")
            cells.append(f"{(row['peak_mb'] - baseline['peak_mb']) / copy_mb:>26.1f}")
            logged = max(logged, max(row["logged"].values()) / copy_mb)
        print(f"{name:<20}{''.join(cells)}{logged:>20.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", nargs="+", metavar="CALLBACK", help="measure these only")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # one fit: name, optimiser
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
    else:
        main(["none", *args.only] if args.only else CALLBACKS, args.optimizer)
