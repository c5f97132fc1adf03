"""Top Hessian eigenvalue: ours (Probe + HessianVectorProduct + power iteration) vs PyHessian.

Prints, measured side by side in one run:

(1) time to the top eigenvalue at the same tolerance on the same model and batch, ours ÷
    PyHessian's (target: ours at least 2× faster, i.e. a ratio ≤ 0.5). Ours is
    ``HessianVectorProduct(loss through Probe, params)`` (one loss and gradient pass that keeps its
    graph) then :func:`top_hessian_eigenvalue`; PyHessian's is ``hessian(model, criterion,
    data=(x, y), cuda=False)`` (the same kept first-order graph, built by ``loss.backward(
    create_graph=True)``) then ``.eigenvalues(maxIter=..., tol=...)``. Both are timed from the
    model and batch to the number, building the graph included, interleaved over ``--repeats``
    rounds (min and all values printed). Both start from the same random vector (PyHessian draws
    it from the global RNG after seeding; ours is handed the same draw as ``init``), so both do the
    same power iteration and the ratio is the cost of the same work. Each round uses another seed;
    the number of Hessian-vector products is printed for both. Time is process CPU time (one
    thread by default). A further line times ours warm-started as SmoothnessCallback runs it
    (from the eigenvector of an earlier measurement) against PyHessian's cold start.
(2) accuracy on a model small enough to form the full Hessian
    (:func:`torch.autograd.functional.hessian` in float64, then :func:`torch.linalg.eigvalsh`):
    the relative error of both values against the exact dominant (largest-magnitude) eigenvalue,
    over several random starts. Both run on the float32 model, as in training.

BatchNorm: PyHessian calls ``model.eval()``, so a BatchNorm layer normalises with its running
statistics, a different function from the training loss (batch statistics) that our callbacks
measure. The main comparison therefore uses MLPs *without* normalisation layers (and without
dropout), where train and eval mode are the same function. For a BatchNorm MLP the script times
both in eval mode (ours measures whatever mode the module is in: the Probe never changes it), so
that the two compute the same thing, and prints the train-mode eigenvalue next to it to show how
far apart the two functions are.

Run it in the benchmark's own environment (PyHessian is not a dependency of the project)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install -e . pyhessian
    .venv-bench/bin/python benchmarks/hessian_vs_pyhessian.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from pyhessian import hessian as PyHessian
from torch import Tensor, nn

from lightning_bn.diagnostics.curvature import HessianVectorProduct, top_hessian_eigenvalue
from lightning_bn.probe import Probe

CRITERION = nn.CrossEntropyLoss()


def mlp(widths: Sequence[int], batchnorm: bool = False) -> nn.Module:
    layers: list[nn.Module] = []
    *hidden, last = itertools.pairwise(widths)
    for cin, cout in hidden:
        layers += [nn.Linear(cin, cout), *([nn.BatchNorm1d(cout)] if batchnorm else []), nn.Tanh()]
    layers.append(nn.Linear(*last))
    return nn.Sequential(*layers)


def loss_fn(module: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return CRITERION(module(x), y)


def ours(
    model: nn.Module, batch: Any, init: dict[str, Tensor], tol: float, max_iters: int
) -> tuple[float, int]:
    """Our top eigenvalue and the number of Hessian-vector products it took."""
    probe = Probe(model, loss_fn=loss_fn)
    params = probe.parameters()

    def loss_at(point: dict[str, Tensor]) -> Tensor:
        return probe.loss({**params, **point}, batch)

    trainable = {k: params[k] for k in probe.trainable_names()}
    op = HessianVectorProduct(loss_at, trainable, method="reverse")
    res = top_hessian_eigenvalue(op, init, max_iters=max_iters, tol=tol)
    return res.eigenvalue, res.iterations


def pyhessian(
    model: nn.Module, batch: Any, seed: int, tol: float, max_iters: int
) -> tuple[float, int]:
    """PyHessian's top eigenvalue and the number of Hessian-vector products it took."""
    model.zero_grad(set_to_none=True)  # its constructor accumulates into .grad
    h = PyHessian(model, CRITERION, data=batch, cuda=False)
    module = sys.modules[PyHessian.__module__]
    product = getattr(module, "hessian_vector_product")  # noqa: B009
    calls = 0

    def counted(*args: Any) -> Any:  # counts its Hessian-vector products
        nonlocal calls
        calls += 1
        return product(*args)

    setattr(module, "hessian_vector_product", counted)  # noqa: B010
    try:
        torch.manual_seed(seed)  # its start vector: torch.randn per parameter, global RNG
        eigenvalues, _ = h.eigenvalues(maxIter=max_iters, tol=tol)
    finally:
        setattr(module, "hessian_vector_product", product)  # noqa: B010
    model.zero_grad(set_to_none=True)
    return float(eigenvalues[0]), calls


def start_vector(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """PyHessian's start vector for ``seed``: one torch.randn per trainable parameter, in order."""
    torch.manual_seed(seed)
    return {n: torch.randn(p.size()) for n, p in model.named_parameters() if p.requires_grad}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Process CPU time of one call (on a shared machine it leaves out others' time) and its result."""
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def compare_time(
    title: str, model: nn.Module, batch: Any, tol: float, max_iters: int, repeats: int
) -> None:
    """Print (1): both timed from the same start vector, interleaved, one seed per round."""
    model.eval()  # what PyHessian does; the same function for both (see the module docstring)
    ratios, t_ours, t_py, iters = [], [], [], []
    lam_ours = lam_py = float("nan")
    for seed in range(repeats + 1):
        init = start_vector(model, seed)
        a, (lam_ours, k_ours) = timed(partial(ours, model, batch, init, tol, max_iters))
        b, (lam_py, k_py) = timed(partial(pyhessian, model, batch, seed, tol, max_iters))
        if seed == 0:
            continue  # warm-up
        ratios.append(a / b)
        t_ours.append(a)
        t_py.append(b)
        iters.append(f"{k_ours}/{k_py}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {title} ({n_params} parameters), eval mode for both")
    print(
        f"    ours {statistics.median(t_ours) * 1e3:.1f} ms, PyHessian"
        f" {statistics.median(t_py) * 1e3:.1f} ms (medians); Hessian-vector products ours/PyHessian"
        f" per round: {', '.join(iters)}; last values {lam_ours:.6g} / {lam_py:.6g}"
    )
    print(
        f"(1) time ours / PyHessian = {min(ratios):.2f}   (min; median"
        f" {statistics.median(ratios):.2f}, all {fmt(ratios)}; target <= 0.5)"
    )


def compare_warm(
    title: str, model: nn.Module, batch: Any, tol: float, max_iters: int, repeats: int
) -> None:
    """Ours warm-started as SmoothnessCallback does it, against PyHessian's cold start.

    The warm start is the eigenvector found 100 SGD steps earlier (lr 0.05, random batches of
    the same shape), as a callback measuring every 100 steps would have it.
    """
    model.eval()
    earlier = copy.deepcopy(model)
    probe = Probe(earlier, loss_fn=loss_fn)
    params = probe.parameters()
    op = HessianVectorProduct(lambda p: probe.loss({**params, **p}, batch), params)
    warm = top_hessian_eigenvalue(op, start_vector(model, 0), max_iters=max_iters, tol=tol)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x, y = batch
    for _ in range(100):
        xb = torch.randn(x.shape, generator=gen)
        yb = torch.randint(0, 10, y.shape, generator=gen)
        opt.zero_grad()
        loss_fn(model, (xb, yb)).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    ratios, iters = [], []
    lam_warm = float("nan")
    for seed in range(repeats + 1):
        a, (lam_warm, k_ours) = timed(partial(ours, model, batch, warm.eigenvector, tol, max_iters))
        b, (_, k_py) = timed(partial(pyhessian, model, batch, seed, tol, max_iters))
        if seed:
            ratios.append(a / b)
            iters.append(f"{k_ours}/{k_py}")
    converged, _ = ours(model, batch, start_vector(model, 0), 1e-9, 2000)
    print(
        f"    {title}, ours warm-started from the eigenvector of 100 SGD steps earlier (as the"
        f" callback runs it) / PyHessian cold = {min(ratios):.2f}   (min; median"
        f" {statistics.median(ratios):.2f}, all {fmt(ratios)}; products {', '.join(iters)});"
        f" warm value {lam_warm:.6g}, relative error"
        f" {abs(lam_warm - converged) / abs(converged):.1e} against {converged:.6g}"
        " (cold, tol 1e-9)"
    )


def exact_dominant(model: nn.Module, batch: Any) -> float:
    """The largest-magnitude eigenvalue of the full Hessian, in float64."""
    net = copy.deepcopy(model).double()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])
    x, y = batch

    def loss_of(w: Tensor) -> Tensor:
        tensors, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = s.numel()
            tensors[n] = w[offset : offset + k].view(s)
            offset += k
        return CRITERION(torch.func.functional_call(net, tensors, (x.double(),)), y)

    h = torch.autograd.functional.hessian(loss_of, flat)
    eig = torch.linalg.eigvalsh(h)
    return float(eig[eig.abs().argmax()])


def compare_accuracy(
    title: str, model: nn.Module, batch: Any, tol: float, max_iters: int, seeds: int
) -> None:
    exact = exact_dominant(model, batch)
    err_ours, err_py = [], []
    for seed in range(seeds):
        lam_ours, _ = ours(model, batch, start_vector(model, seed), tol, max_iters)
        lam_py, _ = pyhessian(model, batch, seed, tol, max_iters)
        err_ours.append(abs(lam_ours - exact) / abs(exact))
        err_py.append(abs(lam_py - exact) / abs(exact))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {title} ({n_params} parameters), exact dominant eigenvalue"
        f" (float64 eigvalsh) = {exact:.8g}"
    )
    print(
        f"(2) relative error at tol={tol:g}, {seeds} random starts: ours median"
        f" {statistics.median(err_ours):.2e} (max {max(err_ours):.2e}), PyHessian median"
        f" {statistics.median(err_py):.2e} (max {max(err_py):.2e});"
        f" ours closer in {sum(a < b for a, b in zip(err_ours, err_py, strict=True))}/{seeds}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative tolerance (both)")
    parser.add_argument("--max-iters", type=int, default=100, help="most products (both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); tol={args.tol:g},"
        f" at most {args.max_iters} Hessian-vector products for both"
    )
    torch.manual_seed(0)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    batch = (x, y)

    big = mlp([64, 256, 256, 256, 256, 10])
    compare_time(
        "MLP 64-256x4-10, tanh, no BatchNorm", big, batch, args.tol, args.max_iters, args.repeats
    )
    compare_warm("MLP 64-256x4-10", big, batch, args.tol, args.max_iters, args.repeats)
    bn = mlp([64, 256, 256, 256, 256, 10], batchnorm=True)
    bn.train()
    lam_train, _ = ours(bn, batch, start_vector(bn, 0), args.tol, args.max_iters)
    bn.eval()
    compare_time(
        "MLP 64-256x4-10, tanh, BatchNorm", bn, batch, args.tol, args.max_iters, args.repeats
    )
    lam_eval, _ = ours(bn, batch, start_vector(bn, 0), args.tol, args.max_iters)
    print(
        f"    BatchNorm: the eigenvalue in train mode (batch statistics, what the callbacks"
        f" measure) = {lam_train:.6g}; in eval mode (running statistics, what PyHessian"
        f" measures) = {lam_eval:.6g}"
    )
    small = mlp([64, 16, 16, 10])
    compare_time(
        "MLP 64-16-16-10, tanh, no BatchNorm", small, batch, args.tol, args.max_iters, args.repeats
    )
    compare_accuracy(
        "MLP 64-16-16-10, tanh, no BatchNorm", small, batch, args.tol, args.max_iters, 10
    )
    compare_accuracy("MLP 64-16-16-10, tanh, no BatchNorm", small, batch, 1e-6, args.max_iters, 10)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    main()
