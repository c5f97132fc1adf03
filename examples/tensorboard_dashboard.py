"""The diagnostics in TensorBoard: a TensorBoardLogger run, its dashboard, and `plot` on it.

Trains the MLP of ``examples/add_callbacks.py`` (digits, BatchNorm, SGD) with a
``TensorBoardLogger`` and the diagnostic callbacks, among them a second, named ICSCallback on
the last layer (keys ``ics@head/...``) and a HessianCallback (whose eigenvalue density is drawn
over training). The run's event file then holds the scalars and a custom-scalars layout of the
paper's panels. The script

1. draws ``lightning-bn plot``'s figures from the run's ``version_0`` folder (``--figures``);
2. with ``--screenshot PNG``, serves ``tensorboard --logdir`` on 127.0.0.1 and takes a
   screenshot of its Custom Scalars dashboard with headless Chromium (Debian's ``chromium``
   package; nothing leaves the machine).

    python examples/tensorboard_dashboard.py --out tb_logs --figures tb_figures \\
        --screenshot docs/tensorboard_dashboard.png

A few minutes on 2 CPU cores (the Hessian's density is the largest share).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import HessianCallback, ICSCallback, LipschitzCallback, SmoothnessCallback
from lightning_bn.cli import main as lightning_bn


class MyClassifier(L.LightningModule):
    """A plain MLP with BatchNorm, trained with SGD."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Linear(64, 10),
        )  # fmt: skip

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def train(out: Path, steps: int, every: int) -> Path:
    """Fit with a TensorBoardLogger; returns the run's ``version_0`` folder."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    loader = DataLoader(TensorDataset(x, torch.tensor(digits.target)), batch_size=64, shuffle=True)
    callbacks: list[L.Callback] = [
        ICSCallback(every_n_steps=every),
        ICSCallback(every_n_steps=every, layers=["net.6"], name="head"),
        LipschitzCallback(every_n_steps=every),
        SmoothnessCallback(every_n_steps=every, max_iters=10),
        HessianCallback(every_n_steps=every, top_k=3, density_steps=30, trace_max_samples=30),
    ]
    logger = TensorBoardLogger(str(out), name="lightning_logs", version=0)
    if Path(logger.log_dir).exists():
        raise SystemExit(f"{logger.log_dir} exists; choose another --out")
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(MyClassifier(), loader)
    return Path(logger.log_dir)


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise SystemExit(f"tensorboard did not start on port {port} within {timeout:.0f} s")


def screenshot(logdir: Path, png: Path, port: int = 6006, budget_ms: int = 15000) -> None:
    """Serve ``logdir`` with tensorboard on 127.0.0.1 and screenshot its Custom Scalars tab."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_port(port)
        time.sleep(3)  # let it load the event files
        png.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1400,1000", f"--virtual-time-budget={budget_ms}",
                 f"--screenshot={png}", f"http://127.0.0.1:{port}/#custom_scalars"],
                check=True,
                timeout=180,
                capture_output=True,
            )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"screenshot: {png}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tb_logs"), help="TensorBoard save_dir")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=10, help="steps between measurements")
    parser.add_argument("--figures", type=Path, default=None, help="`plot` output folder")
    parser.add_argument("--screenshot", type=Path, default=None, help="dashboard PNG")
    parser.add_argument("--budget-ms", type=int, default=15000, help="Chromium's virtual time")
    args = parser.parse_args(argv)
    version = train(args.out, args.steps, args.every)
    figures = args.figures or args.out / "figures"
    lightning_bn(["plot", str(version), "--labels", "BatchNorm MLP", "--out", str(figures)])
    if args.screenshot is not None:
        screenshot(args.out, args.screenshot, budget_ms=args.budget_ms)


if __name__ == "__main__":
    main()
