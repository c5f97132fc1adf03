"""Swap the normalisation layers of an existing model, and compare the variants.

``swap_norm_layers`` replaces every BatchNorm (torch's or lightning-bn's), SyncBatchNorm and
LayerNorm inside a model, recursively, keeping γ, β, running statistics where they carry over,
device, dtype and train/eval mode. Here one small CNN written with ``torch.nn.BatchNorm2d`` is
turned into the paper's variants (standard = no normalisation, ℓ1, ℓ∞, LayerNorm) and each is
trained for a few hundred SGD steps on scikit-learn's digits.

    python examples/swap_norm_layers.py --steps 300
"""

from __future__ import annotations

import argparse
import copy

import lightning as L
import torch
from torch import nn

from lightning_bn import swap_norm_layers
from lightning_bn.experiments import ClassificationModule, DigitsDataModule


def make_cnn() -> nn.Module:
    """An ordinary CNN with torch's BatchNorm2d, as you might already have one."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 10),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    L.seed_everything(0)
    original = make_cnn()
    results = {}
    for kind in ("batchnorm", "none", "l1", "linf", "layernorm"):
        # Same starting weights for every variant: swap a copy of one model.
        model = copy.deepcopy(original)
        if kind != "batchnorm":
            model = swap_norm_layers(model, kind)
        if kind == "l1":
            print(model[1])  # γ and β were copied from the BatchNorm2d layer it replaces
        data = DigitsDataModule(batch_size=64, as_images=True)
        trainer = L.Trainer(
            max_steps=args.steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module = ClassificationModule(model, lr=args.lr)
        trainer.fit(module, datamodule=data)
        results[kind] = trainer.validate(module, datamodule=data, verbose=False)[0]["val/acc"]
    print(f"\nvalidation accuracy after {args.steps} SGD steps at lr {args.lr}:")
    for kind, acc in results.items():
        print(f"  {kind:<10} {acc:.3f}")
    return results


if __name__ == "__main__":
    main()
