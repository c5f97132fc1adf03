"""Cost of ICSCallback, measured side by side in one run; prints ratios.

(a) one measurement ÷ one training forward+backward, next to the k gradient evaluations the
    definition needs (target ≤ 1.3 × k);
(b) one measurement ÷ the brute-force deep-copy approach (target: ≥ 1.5× faster);
(c) whole training with ICSCallback at its defaults ÷ without (target ≤ 1.10).

Model: an MLP with 4 hidden layers (BatchNorm, ReLU) on digits-sized data (64 features, 10
classes, batch 64). Usage: ``python benchmarks/ics_overhead.py [--steps 1000] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ICSCallback
from lightning_bn.diagnostics.ics import compute_ics, measured_layers
from lightning_bn.probe import Probe, RNGState, StepRecord

#: Process CPU time by default: on a shared machine wall time also counts other processes' load.
CLOCK: Callable[[], float] = time.process_time


class MLP(pl.LightningModule):
    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 64
        for _ in range(depth):
            layers += [nn.Linear(cin, width), nn.BatchNorm1d(width), nn.ReLU()]
            cin = width
        layers.append(nn.Linear(cin, 10))
        self.net = nn.Sequential(*layers)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def timeit(fn: Callable[[], Any], repeats: int, inner: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        for _ in range(inner):
            fn()
        times.append((CLOCK() - t0) / inner)
    return statistics.median(times)


def brute_force(
    module: MLP, layers: list[str], before: dict, after: dict, batch: Any, rng: RNGState
) -> None:
    """Def. 2.1 the straightforward way: a deep copy of the model and a full backward per gradient."""
    order = [n for n, m in module.named_modules() if list(m.parameters(recurse=False))]
    for layer in [None, *layers]:  # None: the pass at W^t that gives every G
        net = copy.deepcopy(module.net)
        earlier = order[: order.index(layer)] if layer is not None else []
        with torch.no_grad():
            for name, p in net.named_parameters():
                full = f"net.{name}"
                p.copy_(after[full] if full.rpartition(".")[0] in earlier else before[full])
        with rng.replay():
            loss = nn.functional.cross_entropy(net(batch[0]), batch[1])
        loss.backward()
        _ = [p.grad for p in net.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    module = MLP()
    module.train()
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    batch = (x, y)
    probe = Probe(module)
    layers = measured_layers(module, None)
    k = len(layers)
    before = probe.parameters()
    after = {n: t + 1e-3 * torch.randn_like(t) for n, t in before.items()}
    rng = RNGState.capture()
    params = list(module.parameters())

    def train_pass() -> None:
        loss = module.training_step(batch, 0)
        torch.autograd.grad(loss, params)

    def measure() -> None:
        compute_ics(probe, layers, before, after, StepRecord(batch, 0, rng))

    def measure_grad_only() -> None:
        compute_ics(probe, layers, before, after, StepRecord(batch, 0, rng), distributional=False)

    names = [layer.name for layer in layers]
    t_pass = timeit(train_pass, args.repeats)
    t_ics = timeit(measure, args.repeats)
    t_ics_g = timeit(measure_grad_only, args.repeats)
    t_brute = timeit(lambda: brute_force(module, names, before, after, batch, rng), args.repeats)

    print(f"model: MLP 64-256x4-10 with BatchNorm, batch 64, k = {k} measured layers")
    print(
        f"(a) one measurement / one forward+backward      = {t_ics / t_pass:6.2f}"
        f"   (k = {k} gradient evaluations; ratio / k = {t_ics / t_pass / k:.2f}, target <= 1.3)"
    )
    print(
        f"    without the distributional shifts            = {t_ics_g / t_pass:6.2f}"
        f"   (ratio / k = {t_ics_g / t_pass / k:.2f})"
    )
    print(
        f"(b) brute force (deep copy + full backward per gradient) / ours = {t_brute / t_ics_g:6.2f}"
        "   (gradient form on both sides; target >= 1.5)"
    )

    data = DataLoader(
        TensorDataset(torch.randn(1024, 64), torch.randint(0, 10, (1024,))), batch_size=64
    )

    def fit(callbacks: list[Any]) -> float:
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=args.steps,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        t0 = CLOCK()
        trainer.fit(MLP(), data)
        return CLOCK() - t0

    ratios = []
    for _ in range(5):  # interleaved, so load on the machine hits both alike
        t_without = fit([])
        t_with = fit([ICSCallback()])
        ratios.append(t_with / t_without)
    print(
        f"(c) training {args.steps} steps with ICSCallback() / without = {min(ratios):6.3f}"
        f"   (min of {[round(r, 3) for r in ratios]}; target <= 1.10)"
    )


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
