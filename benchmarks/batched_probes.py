"""Batched (``torch.func.vmap``) ÷ sequential evaluation of the step-size grid and of the ICS G′
passes; prints ratios.

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

ICS (``--probes ics``): :func:`~lightning_bn.diagnostics.ics.compute_ics` over the default
layers between W and W - lr·g, with a sequential probe and a batching one (``--chunk``, default
every G′ point in one call); timed is the whole call (the pass at W, the k - 1 G′ passes, the
distributional shifts); the line ``G′ passes only`` times the k - 1 mixed points alone
(``batched_points`` against one ``loss_and_grad`` per layer, no input capture). Agreement: the
largest difference of any logged value relative to max(1, |value|).

Clock: process CPU time on CPU (default ``--threads 1``), wall time with CUDA synchronisation on
``--device cuda``.

Models (``benchmarks/_models.py``): ``mlp`` (the digits MLP, batch 64), ``resnet13`` (13 convs
on 8×8 digits, batch 64), ``bert`` (BERT-small, batch 8 × 128 tokens).

Usage: ``python benchmarks/batched_probes.py [--models mlp resnet13 bert] [--probes grid ics]
[--repeats 5] [--device cpu|cuda] [--chunk N] [--threads 1]``.
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

from lightning_bn.diagnostics.ics import compute_ics, measured_layers
from lightning_bn.diagnostics.landscape import resolve_step_sizes
from lightning_bn.probe import Probe, RNGState, StepRecord
from lightning_bn.probe.batched import BatchedFallbackWarning, batched_points, uses_vmap

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


def setup(name: str, device: torch.device) -> tuple[nn.Module, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    module, batch, _ = make(name)
    return module.to(device).train(), tuple(t.to(device) for t in batch)


def interleaved(
    call: Callable[[Probe], Any], seq: Probe, bat: Probe, repeats: int, device: torch.device
) -> str:
    """Time ``call`` on both probes back to back per repeat; the summary line."""
    tick = clock(device)
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
    return (
        f"batched/sequential {min(ratios):.2f} (min; median"
        f" {statistics.median(ratios):.2f}, all [{', '.join(f'{r:.2f}' for r in ratios)}]);"
        f" fastest sequential {min(t_seq) * 1e3:.1f} ms, batched {min(t_bat) * 1e3:.1f} ms"
    )


def run_ics(name: str, device: torch.device, repeats: int, chunk: int | None) -> None:
    module, batch = setup(name, device)
    layers = measured_layers(module, None)
    seq = Probe(module, loss_fn=loss_fn, vmap_chunk_size=None)
    bat = Probe(module, loss_fn=loss_fn, vmap_chunk_size=chunk or len(layers))
    before = seq.parameters()
    step = StepRecord(batch, 0, RNGState.capture())
    _, grad = seq.loss_and_grad(before, step)
    after = {n: t - LR * grad[n] if n in grad else t for n, t in before.items()}
    print(
        f"\n{name} ICS: {describe(module, batch)}, {len(layers)} layers,"
        f" chunk {chunk or len(layers)}"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BatchedFallbackWarning)
        r_seq = compute_ics(seq, layers, before, after, step)
        r_bat = compute_ics(bat, layers, before, after, step)
    for w in caught:
        if issubclass(w.category, BatchedFallbackWarning):
            print(f"  fallback: {w.message}")
    worst = max(
        abs(r_bat[lay][k] - v) / max(1.0, abs(v))
        for lay, vals in r_seq.items()
        for k, v in vals.items()
    )
    print(f"  agreement: largest difference {worst:.2e}; batched in use: {uses_vmap(bat, device)}")
    line = interleaved(
        lambda p: compute_ics(p, layers, before, after, step), seq, bat, repeats, device
    )
    print(f"  {'compute_ics':20s} {line}")
    # the G' passes alone: the mixed points as compute_ics builds them, no hooks
    order = seq.use_order(before, step)
    rank = {n: i for i, n in enumerate(order)}
    firsts = [min(rank[q] for q in lay.params if q in rank) for lay in layers]
    mixed = [
        (lay, {q: after[q] for q in order if rank[q] < f and q not in lay.params})
        for lay, f in zip(layers, firsts, strict=True)
    ]
    mixed = [(lay, over) for lay, over in mixed if over]
    wrt = list(dict.fromkeys(q for lay, _ in mixed for q in lay.params))

    def g_prime(probe: Probe) -> None:
        if probe is bat:
            batched_points(probe, before, [over for _, over in mixed], step, wrt)
            return
        for lay, over in mixed:
            probe.loss_and_grad({**before, **over}, step, wrt=list(lay.params))

    print(f"  {'G′ passes only':20s} {interleaved(g_prime, seq, bat, repeats, device)}")


def run(name: str, device: torch.device, repeats: int, chunk: int | None) -> None:
    module, batch = setup(name, device)
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

    for label, call in (
        ("losses_along", lambda p: p.losses_along(params, grad, etas, step)),
        ("loss_and_grad_along", lambda p: p.loss_and_grad_along(params, grad, etas, step)),
    ):
        print(f"  {label:20s} {interleaved(call, seq, bat, repeats, device)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet13", "bert"])
    parser.add_argument("--probes", nargs="+", default=["grid", "ics"], choices=["grid", "ics"])
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
        if "grid" in args.probes:
            run(name, device, args.repeats, args.chunk)
        if "ics" in args.probes:
            run_ics(name, device, args.repeats, args.chunk)


if __name__ == "__main__":
    main()
