"""Cost of LipschitzCallback and SmoothnessCallback, measured side by side in one run; prints ratios.

(a) one Lipschitz measurement (:func:`compute_lipschitz`) ÷ the passes its definition needs: one
    gradient + one forward per grid point + the Theorem 4.1 pass (target ≤ 1.3). The Theorem 4.1
    pass needs the gradients w.r.t. every BatchNorm layer's input and output, i.e. one
    forward+backward; the implementation takes them from the gradient pass and then does the
    Theorem 4.1 arithmetic, so the ratio is also printed with the measured cost of that
    arithmetic (:func:`theorem41_bound` on every BatchNorm layer) in place of the pass;
(b) one Smoothness measurement (:func:`compute_smoothness`, cold start and warm start from the
    same point's eigenvector) ÷ the passes its definition needs: one gradient per grid point +
    two passes per power iteration actually taken, the count read from the result (target ≤ 1.3);
    also printed counting the three passes the issue's count leaves out (the gradient g_t itself
    and the product for gᵀHg);
(c) whole training with ``LipschitzCallback()`` and with ``SmoothnessCallback()``, each at its
    defaults, ÷ without (target ≤ 1.10 each). On a loaded machine two whole runs differ by more
    than the callback costs, so the time spent inside the callback's hooks is also accounted in
    the run itself, and (time without + that) ÷ time without is printed next to the direct
    ratio, with the cost per measurement in training steps and the smallest ``every_n_steps``
    that meets the target.

The baselines are run, not computed: "n forward+backward passes" is a loop of n plain passes of
the module itself on the same batch (its ``training_step``, then :func:`torch.autograd.grad`), so
the probe's own cost (``functional_call``, cloned buffers, RNG replay, writing each point
W - η g) is part of what is measured, not of the baseline. In every repeat a
measurement and its baseline run back to back (and the three training runs of (c) interleave),
so load on a shared machine hits both alike; the minimum, the median and every ratio are
printed. Time is process CPU time by default (``--clock wall`` for wall time): on a shared
machine it leaves out the time other processes hold the core.

Models (batch 64, 10 classes, SGD with momentum, lr 0.05): an MLP with 4 hidden layers of 256
units (BatchNorm, ReLU) on digits-sized data (64 features), and a small CNN on 8×8 one-channel
images (two 3×3 convolutions with 16 and 32 channels, BatchNorm, ReLU, max-pool, a linear head).

Usage: ``python benchmarks/landscape_overhead.py [--threads 1] [--steps 1000] [--repeats 5]
[--fits 3] [--models mlp cnn] [--clock cpu]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.diagnostics.bounds import theorem41_bound
from lightning_bn.diagnostics.landscape import (
    LayerCapture,
    compute_lipschitz,
    compute_smoothness,
    norm_layers,
    resolve_step_sizes,
)
from lightning_bn.probe import Probe, RNGState, StepRecord

LR = 0.05


def make_mlp() -> nn.Module:
    layers: list[nn.Module] = []
    cin = 64
    for _ in range(4):
        layers += [nn.Linear(cin, 256), nn.BatchNorm1d(256), nn.ReLU()]
        cin = 256
    layers.append(nn.Linear(cin, 10))
    return nn.Sequential(*layers)


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


MODELS: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": ("MLP 64-256x4-10 with BatchNorm", make_mlp, (64,)),
    "cnn": ("CNN 1x8x8 conv16-conv32 with BatchNorm", make_cnn, (1, 8, 8)),
}


class Classifier(pl.LightningModule):
    def __init__(self, make_net: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


#: The clock of every timing: process CPU time by default (``--clock wall`` for wall time).
CLOCK: Callable[[], float] = time.process_time


def timed(fn: Callable[[], Any], inner: int = 1) -> float:
    """Mean seconds per call over ``inner`` back-to-back calls."""
    t0 = CLOCK()
    for _ in range(inner):
        fn()
    return (CLOCK() - t0) / inner


def fmt(values: Sequence[float], digits: int = 2) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def summary(ratios: Sequence[float], target: str, digits: int = 2) -> str:
    return (
        f"{min(ratios):.{digits}f}   (min; median {statistics.median(ratios):.{digits}f},"
        f" all {fmt(ratios, digits)}; target {target})"
    )


def measurement_costs(key: str, repeats: int) -> dict[str, float]:
    """Print (a) and (b) for one model; return the fastest seconds of each kind of measurement."""
    title, make_net, shape = MODELS[key]
    torch.manual_seed(0)
    module = Classifier(make_net).train()
    batch = (torch.randn(64, *shape), torch.randint(0, 10, (64,)))
    probe = Probe(module)
    params = probe.parameters()
    rng = RNGState.capture()
    step = StepRecord(batch, 0, rng)
    etas = resolve_step_sizes(LR, None, True)
    grid = len(etas)
    layers = norm_layers(module)
    bn_layers = [(n, m) for n, m in layers if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    weights = list(module.parameters())

    def forward() -> None:
        with torch.no_grad():
            module.training_step(batch, 0)

    def forward_backward() -> None:
        torch.autograd.grad(module.training_step(batch, 0), weights)

    def passes(n_fb: int, n_f: int = 0) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n_fb):
                forward_backward()
            for _ in range(n_f):
                forward()

        return run

    capture = LayerCapture(bn_layers)
    capture.attach()
    try:
        probe.loss_and_grad(params, step)
    finally:
        capture.detach()
    captured = [(capture.store[n], m) for n, m in bn_layers]

    def thm41_arithmetic() -> None:
        for rec, m in captured:
            assert rec.y is not None and rec.grad_y is not None and rec.grad_z is not None
            theorem41_bound(rec.y.detach(), rec.grad_y, rec.grad_z, rec.weight, m.eps)

    def lipschitz() -> None:
        compute_lipschitz(probe, params, step, etas, layers)

    def smoothness(init: dict[str, Tensor] | None) -> Callable[[], None]:
        def run() -> None:
            gen = torch.Generator().manual_seed(0)
            compute_smoothness(
                probe, params, step, etas, init=init, generator=gen, eig_algorithm="power"
            )

        return run

    def probe_forward() -> None:
        with torch.no_grad():
            probe.loss(params, step)

    def probe_gradient() -> None:
        probe.loss_and_grad(params, step)

    def iterations(init: dict[str, Tensor] | None) -> tuple[int, dict[str, Tensor] | None]:
        gen = torch.Generator().manual_seed(0)
        res = compute_smoothness(
            probe, params, step, etas, init=init, generator=gen, eig_algorithm="power"
        )
        return int(res.metrics["hessian_iters"]), res.eigenvector

    def lipschitz_arith_baseline() -> None:
        passes(1, grid)()
        thm41_arithmetic()

    iters_cold, eigenvector = iterations(None)
    iters_warm, _ = iterations(eigenvector)  # warm start from the same point's eigenvector
    # (measured, its baseline) timed back to back in every repeat, so both see the same load.
    pairs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "lip": (lipschitz, passes(2, grid)),
        "lip_arith": (lipschitz, lipschitz_arith_baseline),
        "cold": (smoothness(None), passes(grid + 2 * iters_cold)),
        "warm": (smoothness(eigenvector), passes(grid + 2 * iters_warm)),
        "probe_f": (probe_forward, forward),
        "probe_fb": (probe_gradient, forward_backward),
    }
    for fn, base in pairs.values():
        fn(), base()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in pairs}
    bases: dict[str, list[float]] = {k: [] for k in pairs}
    single = {"f": forward, "fb": forward_backward, "thm": thm41_arithmetic}
    singles: dict[str, list[float]] = {k: [] for k in single}
    for _ in range(repeats):
        for k, (fn, base) in pairs.items():
            inner = 20 if k.startswith("probe") else 1
            times[k].append(timed(fn, inner))
            bases[k].append(timed(base, inner))
        for k, fn in single.items():
            singles[k].append(timed(fn, 20))
    ratio = {k: [a / b for a, b in zip(times[k], bases[k], strict=True)] for k in pairs}
    best = {k: min(v) for k, v in times.items()}
    one = {k: min(v) for k, v in singles.items()}

    ms = 1e3
    print(f"model: {title}, batch 64, grid of {grid} step sizes, {len(bn_layers)} BatchNorm layers")
    print(
        f"    fastest of {repeats}: one forward = {one['f'] * ms:.3f} ms,"
        f" one forward+backward = {one['fb'] * ms:.3f} ms,"
        f" Theorem 4.1 arithmetic on every BN layer = {one['thm'] * ms:.3f} ms"
    )
    print(
        f"(a) Lipschitz, one measurement = {best['lip'] * ms:.2f} ms;"
        f" / (1 fwd+bwd + {grid} fwd + Thm 4.1 pass as 1 fwd+bwd) = {summary(ratio['lip'], '<= 1.3')}"
    )
    print(
        f"    the same with the Thm 4.1 pass taken as its arithmetic alone"
        f" = {summary(ratio['lip_arith'], '<= 1.3')}"
    )
    print(
        f"    probe forward / plain forward = {min(ratio['probe_f']):.2f},"
        f" probe gradient / plain forward+backward = {min(ratio['probe_fb']):.2f}"
    )
    for k, label, n in (("cold", "cold", iters_cold), ("warm", "warm", iters_warm)):
        full = (grid + 2 * n) / (grid + 3 + 2 * n)
        print(
            f"(b) Smoothness, {label} start ({n} power iterations), one measurement ="
            f" {best[k] * ms:.2f} ms; / (({grid} + 2 x {n}) fwd+bwd) = {summary(ratio[k], '<= 1.3')}"
        )
        print(
            f"    counting also the gradient g_t and the product for g'Hg (+3 passes):"
            f" {min(ratio[k]) * full:.2f}"
        )
    return {"lip": best["lip"], "cold": best["cold"], "warm": best["warm"]}


_HOOKS = ("setup", "on_train_batch_start", "on_train_batch_end", "on_fit_end", "teardown")


def account(callback: pl.Callback) -> list[float]:
    """Wrap the callback's hooks; the returned one-element list accumulates the time inside."""
    total = [0.0]
    for name in _HOOKS:
        hook = getattr(callback, name)

        def timed_hook(*args: Any, _hook: Callable[..., Any] = hook, **kwargs: Any) -> Any:
            t0 = CLOCK()
            try:
                return _hook(*args, **kwargs)
            finally:
                total[0] += CLOCK() - t0

        setattr(callback, name, timed_hook)
    return total


def training_overhead(key: str, steps: int, fits: int, costs: dict[str, float]) -> None:
    """Print (c) for one model: fit with each callback at its defaults ÷ fit without."""
    title, make_net, shape = MODELS[key]
    data = DataLoader(
        TensorDataset(torch.randn(1024, *shape), torch.randint(0, 10, (1024,))), batch_size=64
    )

    def fit(callbacks: list[pl.Callback]) -> float:
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=steps,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = Classifier(make_net)
        t0 = CLOCK()
        trainer.fit(model, data)
        return CLOCK() - t0

    fit([])  # warm-up (first Trainer, first DataLoader)
    runs: dict[str, list[float]] = {"without": [], "lip": [], "smooth": []}
    inside: dict[str, list[float]] = {"lip": [], "smooth": []}
    for _ in range(fits):  # interleaved, so load on the machine hits all three alike
        runs["without"].append(fit([]))
        for k, cb in (("lip", LipschitzCallback()), ("smooth", SmoothnessCallback())):
            total = account(cb)
            runs[k].append(fit([cb]))
            inside[k].append(total[0])
    t_without = min(runs["without"])
    t_step = t_without / steps
    print(
        f"(c) {title}: {steps} steps without a callback = {t_without:.2f} s"
        f" ({t_step * 1e3:.2f} ms per step, fastest of {fits})"
    )
    for name, n, k, cost in (
        ("LipschitzCallback()", LipschitzCallback().every_n_steps, "lip", costs["lip"]),
        ("SmoothnessCallback()", SmoothnessCallback().every_n_steps, "smooth", costs["warm"]),
    ):
        ratios = [a / b for a, b in zip(runs[k], runs["without"], strict=True)]
        accounted = [(b + h) / b for b, h in zip(runs["without"], inside[k], strict=True)]
        measured = math.ceil(steps / n)
        per = min(inside[k]) / measured
        print(
            f"    with {name:<21} (every_n_steps={n}, {measured} measurements) / without"
            f" = {summary(ratios, '<= 1.10', 3)}"
        )
        print(
            f"        fastest with / fastest without = {min(runs[k]) / t_without:.3f}; time inside"
            f" the callback's hooks = {min(inside[k]):.3f} s, (without + that) / without ="
            f" {summary(accounted, '<= 1.10', 3)}"
        )
        print(
            f"        per measurement in training {per * 1e3:.1f} ms = {per / t_step:.1f} steps"
            f" (a bare measurement{' with a warm start' if k == 'smooth' else ''}:"
            f" {cost * 1e3:.1f} ms); <= 1.10 needs every_n_steps >= "
            f"{math.ceil(per / (0.10 * t_step))}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps of (c)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of (a), (b)")
    parser.add_argument("--fits", type=int, default=3, help="interleaved training runs of (c)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall time"
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} time;"
        f" {args.repeats} repeats of (a)/(b), {args.fits} interleaved fits of (c)"
    )
    for key in args.models:
        costs = measurement_costs(key, args.repeats)
        training_overhead(key, args.steps, args.fits, costs)
        print()


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    main()
