"""The Hessian's spectrum during training: HessianCallback with a CSVLogger, then a figure.

Full-batch gradient descent (SGD, no momentum) on 512 of scikit-learn's digits, a tanh MLP
(``--batchnorm`` adds BatchNorm), squared loss on one-hot targets as in Cohen et al. (2021),
measured every 10 steps: the top eigenvalues against the stability threshold 2/η (step size 0.4,
threshold 5: the sharpness rises to the threshold, overshoots, falls back and stays around it,
the edge of stability) and the eigenvalue density over training. A few minutes on 2 CPU cores.

    python examples/hessian_spectrum.py [--out docs/hessian_spectrum.png] [--steps 400] [--lr 0.4]

The figure is drawn from the run's ``metrics.csv`` only (read back with :mod:`csv`), so
:func:`draw` works on any CSVLogger run of the callback.
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import HessianCallback


class Net(pl.LightningModule):
    def __init__(self, lr: float, batchnorm: bool) -> None:
        super().__init__()
        self.lr = lr
        layers: list[nn.Module] = []
        for cin in (64, 32):
            layers += [nn.Linear(cin, 32), *([nn.BatchNorm1d(32)] if batchnorm else []), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(32, 10))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        target = nn.functional.one_hot(y, 10).to(x.dtype)
        loss = 0.5 * (self.net(x) - target).pow(2).sum(1).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def train(out_dir: Path, steps: int, lr: float, batchnorm: bool) -> Path:
    """Train with the callback; return the run's metrics.csv."""
    digits = load_digits()
    x = torch.tensor(digits.data[:512], dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(digits.target[:512])
    data = DataLoader(TensorDataset(x, y), batch_size=512)  # full batch: gradient descent
    pl.seed_everything(0, verbose=False)
    logger = CSVLogger(out_dir, name="hessian")
    trainer = pl.Trainer(
        max_steps=steps,
        logger=logger,
        log_every_n_steps=10,
        callbacks=[HessianCallback(every_n_steps=10, top_k=3, per_layer=False)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(lr, batchnorm), data)
    return Path(logger.log_dir) / "metrics.csv"


def read(path: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            step = int(float(row["step"]))
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    rows.setdefault(step, {})[key] = float(value)
    return rows


def draw(metrics_csv: Path, out: Path, prefix: str = "hessian") -> None:
    """Density over training (left) and sharpness against the stability threshold (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(metrics_csv)
    steps = sorted(s for s, r in rows.items() if f"{prefix}/eig_1" in r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    # density: each measurement's bins between its own lo and hi, as one column of a heat map
    lo = min(rows[s][f"{prefix}/density/lo"] for s in steps)
    hi = max(rows[s][f"{prefix}/density/hi"] for s in steps)
    grid = torch.linspace(lo, hi, 200)
    image = torch.zeros(len(grid), len(steps))
    for j, s in enumerate(steps):
        bins = sorted(k for k in rows[s] if k.startswith(f"{prefix}/density/bin_"))
        masses = torch.tensor([rows[s][k] for k in bins])
        a, b = rows[s][f"{prefix}/density/lo"], rows[s][f"{prefix}/density/hi"]
        width = (b - a) / len(bins)
        index = ((grid - a) / width).floor().long()
        inside = (index >= 0) & (index < len(bins))
        image[inside, j] = masses[index[inside]] / width
    left.imshow(
        image.clamp_min(1e-4).log10(),
        aspect="auto",
        origin="lower",
        extent=(steps[0], steps[-1], lo, hi),
        cmap="viridis",
    )
    left.set(xlabel="step", ylabel="eigenvalue", title="Hessian eigenvalue density (log10)")
    for i in (1, 2, 3):
        right.plot(steps, [rows[s][f"{prefix}/eig_{i}"] for s in steps], label=f"eig_{i}")
    threshold = [rows[s].get(f"{prefix}/stability_threshold", math.nan) for s in steps]
    right.plot(steps, threshold, "k--", label="stability threshold 2/η")
    right.set(xlabel="step", ylabel="eigenvalue", title="sharpness and the edge of stability")
    right.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/hessian_spectrum.png"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--batchnorm", action="store_true")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; pass another --out")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train(Path(tmp), args.steps, args.lr, args.batchnorm)
        draw(metrics, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
