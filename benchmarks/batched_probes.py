"""Batched (``torch.func.vmap``) ÷ sequential evaluation of the step-size grid; prints ratios.

For each model, one :class:`~lightning_bn.probe.Probe` with ``vmap_chunk_size=None`` (point by
point) and one with ``vmap_chunk_size=<chunk>`` (default: the whole grid in one call) evaluate
the default 13-point grid :math:`W - \\eta g` (``DEFAULT_STEP_SIZES`` × lr 0.05, g the gradient at
W) on one batch, in training mode with the step's random state replayed:

- ``losses_along`` (the Lipschitz callback's grid: 13 forward passes);
- ``loss_and_grad_along`` (the Smoothness callback's grid: 13 gradients).

Each repeat times the sequential and the batched call back to back (interleaved, so load on a
shared machine hits both alike); printed are batched ÷ sequential per repeat, their minimum and
median, and the fastest time of each. Before timing, the values of the two paths are compared
(largest difference of the losses; per point, the largest difference of the gradients relative to
the largest gradient entry, median and largest over the points), and a fallback to the sequential
path (a model ``vmap`` cannot run) is reported. A point where a ReLU input lies within float
rounding of 0 can show a gradient difference far above rounding (the two paths round the forward
pass differently and the ReLU takes the other side of its kink): ``resnet13`` has two such points
on this grid (pre-activations of 2e-7 and 4e-7).

Clock: process CPU time on CPU (default ``--threads 1``), wall time with CUDA synchronisation on
``--device cuda``.

Models (``benchmarks/_models.py``): ``mlp`` (the digits MLP, batch 64), ``resnet13`` (13 convs
on 8×8 digits, batch 64), ``bert`` (BERT-small, batch 8 × 128 tokens).

Usage: ``python benchmarks/batched_probes.py [--models mlp resnet13 bert] [--repeats 5]
[--device cpu|cuda] [--chunk N] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import available, describe, make

from lightning_bn.batched import BatchedFallbackWarning, uses_vmap
from lightning_bn.diagnostics.landscape import resolve_step_sizes
from lightning_bn.probe import Probe, RNGState, StepRecord

LR = 0.05


def loss_fn(module: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":

        def wall() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return wall
    return time.process_time


def run(name: str, device: torch.device, repeats: int, chunk: int | None) -> None:
    torch.manual_seed(0)
    module, batch, _ = make(name)
    module = module.to(device).train()
    batch = tuple(t.to(device) for t in batch)
    etas = resolve_step_sizes(LR, None, True)
    seq = Probe(module, loss_fn=loss_fn, vmap_chunk_size=None)
    bat = Probe(module, loss_fn=loss_fn, vmap_chunk_size=chunk or len(etas))
    params = seq.parameters()
    step = StepRecord(batch, 0, RNGState.capture())
    _, grad = seq.loss_and_grad(params, step)
    print(f"\n{name}: {describe(module, batch)}, {len(etas)} points, chunk {chunk or len(etas)}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BatchedFallbackWarning)
        l_seq = seq.losses_along(params, grad, etas, step)
        l_bat = bat.losses_along(params, grad, etas, step)
        g_seq = seq.loss_and_grad_along(params, grad, etas, step)
        g_bat = bat.loss_and_grad_along(params, grad, etas, step)
    for w in caught:
        if issubclass(w.category, BatchedFallbackWarning):
            print(f"  fallback: {w.message}")
    # per point: largest gradient difference ÷ largest gradient entry
    gdiff = [
        max(float((a[n] - b[n]).abs().max()) for n in a) / max(float(a[n].abs().max()) for n in a)
        for (_, a), (_, b) in zip(g_seq, g_bat, strict=True)
    ]
    print(
        f"  agreement: losses {float((l_seq - l_bat).abs().max()):.2e}; gradients (relative to"
        f" the largest entry) median over points {statistics.median(gdiff):.2e}, largest"
        f" {max(gdiff):.2e}; batched in use: {uses_vmap(bat, device)}"
    )

    tick = clock(device)
    for label, call in (
        ("losses_along", lambda p: p.losses_along(params, grad, etas, step)),
        ("loss_and_grad_along", lambda p: p.loss_and_grad_along(params, grad, etas, step)),
    ):
        ratios, t_seq, t_bat = [], [], []
        for _ in range(repeats):
            times = []
            for probe in (seq, bat):
                t0 = tick()
                call(probe)
                times.append(tick() - t0)
            t_seq.append(times[0])
            t_bat.append(times[1])
            ratios.append(times[1] / times[0])
        print(
            f"  {label:20s} batched/sequential {min(ratios):.2f} (min; median"
            f" {statistics.median(ratios):.2f}, all [{', '.join(f'{r:.2f}' for r in ratios)}]);"
            f" fastest sequential {min(t_seq) * 1e3:.1f} ms, batched {min(t_bat) * 1e3:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet13", "bert"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=None, help="points per vmap call")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock_name = "wall time, CUDA synchronised" if device.type == "cuda" else "process CPU time"
    print(f"torch {torch.__version__}, device {device}, {args.threads} thread(s), {clock_name}")
    for name in args.models:
        why = available(name)
        if why is not None:
            print(f"\n{name}: skipped ({why})")
            continue
        run(name, device, args.repeats, args.chunk)


if __name__ == "__main__":
    main()
