"""Cost of SyncNorm on 2 CPU processes (gloo, DDP): step time synchronised ÷ unsynchronised.

Torch's own ``SyncBatchNorm`` cannot be the baseline here: it refuses CPU inputs (and its
``batch_norm_stats`` / ``batch_norm_gather_stats_with_counts`` kernels exist only for GPUs), so on
the CPU the comparable run is the same DDP model with per-process statistics (torch's
``BatchNorm1d`` or this package's layer unconverted), i.e. what ``Trainer(sync_batchnorm=True)``
would leave on a CPU if it ran at all. The ratio is the price of the two collectives per layer.

Model: MLP 64 → 4 × (Linear 256, norm, ReLU) → 10, batch 64 per process, SGD; one step is
forward, backward (DDP's gradient all-reduce included) and the optimiser step. Variants are
interleaved and repeated; medians of wall time (collectives wait, so CPU time would hide them).

    python benchmarks/sync_norm_overhead.py [--steps 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_bn.layers import BatchNorm, L1Norm, LinfNorm
from lightning_bn.layers.sync import convert_sync_norm

NORMS = {
    "torch BatchNorm1d": nn.BatchNorm1d,
    "lightning_bn BatchNorm": BatchNorm,
    "L1Norm": L1Norm,
    "LinfNorm": LinfNorm,
}


def make_model(norm: type[nn.Module], sync: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    cin = 64
    for _ in range(4):
        layers += [nn.Linear(cin, 256), norm(256), nn.ReLU()]
        cin = 256
    layers.append(nn.Linear(cin, 10))
    model = nn.Sequential(*layers)
    if sync:
        convert_sync_norm(model)
    return model


def time_steps(model: nn.Module, steps: int, rank: int) -> float:
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(64, 64, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()

    step()  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    return (time.perf_counter() - t0) / steps


def collectives_per_forward(norm: type[nn.Module]) -> int:
    """Collectives one forward pass of one synchronised layer issues (counted by wrapping the
    ``torch.distributed`` functions that :mod:`lightning_bn.layers.sync` calls)."""
    layer = make_model(norm, sync=True)[1]
    calls = 0
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def counting(fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return fn(*args, **kwargs)

        return wrapped

    try:
        for name, fn in originals.items():
            setattr(dist, name, counting(fn))
        layer(torch.randn(8, 256))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return calls


def worker(rank: int, store: str, steps: int, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    counts = {name: collectives_per_forward(norm) for name, norm in NORMS.items()}
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(repeats):
        for name, norm in NORMS.items():
            for sync in (False, True):
                t = time_steps(make_model(norm, sync), steps, rank)
                times.setdefault((name, sync), []).append(t)
    if rank == 0:
        print(f"2 processes (gloo), torch {torch.__version__}, {steps} steps x {repeats} repeats")
        print(
            f"{'norm layer':<24} {'per-process ms':>15} {'SyncNorm ms':>12} {'ratio':>7}"
            f" {'collectives/forward':>20}"
        )
        for name in NORMS:
            plain = statistics.median(times[(name, False)]) * 1e3
            synced = statistics.median(times[(name, True)]) * 1e3
            print(
                f"{name:<24} {plain:>15.2f} {synced:>12.2f} {synced / plain:>7.2f}"
                f" {counts[name]:>20}"
            )
        print(
            "torch.nn.SyncBatchNorm: not measurable on the CPU (it raises 'SyncBatchNorm expected "
            "input tensor to be on GPU'); per-process statistics are the CPU baseline."
        )
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(f"{tmp}/store", args.steps, args.repeats), nprocs=2, join=True)


if __name__ == "__main__":
    main(sys.argv[1:])
