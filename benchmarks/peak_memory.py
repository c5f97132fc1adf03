"""Extra peak memory of each diagnostic callback at its defaults, in parameter copies.

A ~10M-parameter MLP (1024 inputs, four hidden layers of 1536 with BatchNorm and ReLU, 10
classes; float32), batch 16, 3 training steps with the callback measuring at every step. Each fit
runs in a fresh process; the extra peak is the process's peak resident memory (``ru_maxrss``)
with the callback minus that of the same fit without it, divided by the parameters' size (one
float32 copy). The callback's own ``<prefix>/peak_mem_mb`` (the peak of one measurement, sampled)
is printed beside it.

Run: ``PYTHONPATH=src python benchmarks/peak_memory.py`` (a few minutes on two cores);
``--only HessianCallback`` measures the named callbacks only.
"""

from __future__ import annotations

import itertools
import json
import resource
import subprocess
import sys
from typing import Any, ClassVar

CALLBACKS = ["none", "ICSCallback", "LipschitzCallback", "SmoothnessCallback", "HessianCallback"]


def _child(name: str) -> None:
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


def main(names: list[str]) -> None:
    rows = {}
    for name in names:
        out = subprocess.run(
            [sys.executable, __file__, name], capture_output=True, text=True, check=True
        ).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    base = rows["none"]
    copy_mb = base["params"] * 4 / 2**20
    print(f"model: {base['params'] / 1e6:.1f}M parameters (one float32 copy = {copy_mb:.1f} MiB)")
    print(f"{'callback':<22} {'extra peak (copies)':>20} {'logged peak_mem_mb (copies)':>28}")
    for name in names[1:]:
        if not rows[name]["logged"]:  # a skipped measurement would make the callback look cheap
            raise SystemExit(f"{name} logged no measurement (skipped? run it alone to see why)")
        extra = (rows[name]["peak_mb"] - base["peak_mb"]) / copy_mb
        logged = max(rows[name]["logged"].values()) / copy_mb
        print(f"{name:<22} {extra:>20.1f} {logged:>28.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--only":  # e.g. --only HessianCallback
        main(["none", *sys.argv[2:]])
    elif len(sys.argv) > 1:
        _child(sys.argv[1])
    else:
        main(CALLBACKS)
