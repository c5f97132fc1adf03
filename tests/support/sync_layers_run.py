"""Run every synchronised layer on 2 gloo processes, each on its slice of a global batch.

    python -m tests.support.sync_layers_run OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.pt``: per case its slice of the forward output, of the input
gradient and of a Hessian-vector product, its share of the parameter gradients, the running
statistics after two training batches and the evaluation output. The test compares these with
the unsynchronised layer on the concatenated batch (``tests/layers/test_sync.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from lightning_bn.layers import BatchNorm, L1Norm, L2Norm, LinfNorm, LpNorm
from lightning_bn.layers.sync import convert_sync_norm

WORLD = 2

#: name -> (layer factory, global input shape without the batch dimension, per-rank batch sizes)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, int]]] = {
    "batchnorm": (lambda: BatchNorm(3), (3,), (7, 9)),
    "batchnorm_even": (lambda: BatchNorm(3), (3,), (8, 8)),
    "batchnorm_2d": (lambda: BatchNorm(2, momentum=None), (2, 3, 2), (3, 5)),
    "batchnorm_channels_last": (lambda: BatchNorm(4, channels_last=True), (5, 4), (2, 3)),
    "l1": (lambda: L1Norm(3), (3,), (7, 9)),
    "l2": (lambda: L2Norm(3), (3,), (7, 9)),
    "linf": (lambda: LinfNorm(3), (3,), (7, 9)),
    "l1_uncentred": (lambda: LpNorm(3, 1, centered_divisor=False), (3,), (7, 9)),
    "linf_uncentred_2d": (lambda: LpNorm(2, "inf", centered_divisor=False), (2, 3, 3), (3, 2)),
    "batchnorm_empty_rank": (lambda: BatchNorm(3), (3,), (0, 5)),
    "linf_empty_rank": (lambda: LinfNorm(3), (3,), (5, 0)),
    "torch_bn1d": (lambda: nn.BatchNorm1d(3), (3,), (7, 9)),
    "torch_bn2d": (lambda: nn.BatchNorm2d(2, momentum=None), (2, 3, 2), (3, 5)),
    "torch_syncbn": (lambda: nn.SyncBatchNorm(3), (3,), (7, 9)),
}


def make_layer(case: str) -> nn.Module:
    """The unsynchronised layer of ``case``, in float64, with non-trivial affine parameters."""
    torch.manual_seed(0)
    layer = CASES[case][0]().double()
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return layer


def make_data(case: str) -> dict[str, Tensor]:
    """Global inputs: two training batches, the loss weights, a direction, an evaluation batch."""
    _, shape, sizes = CASES[case]
    n = sum(sizes)
    gen = torch.Generator().manual_seed(1)

    def draw(rows: int) -> Tensor:
        return torch.randn(rows, *shape, generator=gen, dtype=torch.float64) * 2 + 0.3

    return {"x": draw(n), "x2": draw(n), "w": draw(n), "v": draw(n), "x_eval": draw(4)}


def run_layer(layer: nn.Module, data: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    """Forward and backward on ``rows`` of the global batch; the loss is Σ out·w (a sum over
    entries, so the ranks' losses add up to the global one)."""
    out: dict[str, Tensor] = {}
    layer.train()
    x = data["x"][rows].clone().requires_grad_(True)
    y = layer(x)
    loss = (y * data["w"][rows]).sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (hv,) = torch.autograd.grad((gx * data["v"][rows]).sum(), x, retain_graph=True)
    params = [
        p for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)) if p is not None
    ]
    grads = torch.autograd.grad(loss, params) if params else ()
    out.update(y=y.detach(), grad_x=gx.detach(), hvp=hv.detach())
    for name, g in zip(("grad_weight", "grad_bias"), grads, strict=False):
        out[name] = g
    with torch.no_grad():
        layer(data["x2"][rows])  # a second batch for the running statistics
    for name, buf in layer.named_buffers():
        out[f"buffer_{name}"] = buf.clone()
    layer.eval()
    with torch.no_grad():
        out["y_eval"] = layer(data["x_eval"])
    return out


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD
    )
    results: dict[str, Any] = {}
    for case, (_, _, sizes) in CASES.items():
        start = sum(sizes[:rank])
        layer, skipped = convert_sync_norm(make_layer(case))
        assert not skipped
        results[case] = run_layer(layer, make_data(case), slice(start, start + sizes[rank]))
        results[case]["type"] = type(layer).__name__
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD, join=True)
