"""Top Hessian eigenvalue: ours (Probe + HessianVectorProduct + power iteration or Lanczos) vs PyHessian.

Prints, measured side by side in one run, for both of our algorithms
(:func:`top_hessian_eigenvalue` with ``algorithm="power"`` and ``algorithm="lanczos"``):

(1) time to the top eigenvalue at the same tolerance on the same model and batch, ours ÷
    PyHessian's (target: ours at least 2× faster, i.e. a ratio ≤ 0.5). Ours is
    ``HessianVectorProduct(loss through Probe, params)`` (one loss and gradient pass that keeps its
    graph) then :func:`top_hessian_eigenvalue`; PyHessian's is ``hessian(model, criterion,
    data=(x, y), cuda=False)`` (the same kept first-order graph, built by ``loss.backward(
    create_graph=True)``) then ``.eigenvalues(maxIter=..., tol=...)`` (power iteration). All three
    are timed from the model and batch to the number, building the graph included, interleaved
    over ``--repeats`` rounds (min and all values printed). All start from the same random vector
    (PyHessian draws it from the global RNG after seeding; ours is handed the same draw as
    ``init``): ours with power iteration does the same work as PyHessian, so that ratio is the
    cost of the same products; ours with Lanczos needs fewer products to the same tolerance. Each
    round uses another seed; the number of Hessian-vector products is printed for all three. Time
    is process CPU time (one thread by default). A further line per algorithm times ours
    warm-started as SmoothnessCallback runs it (from the eigenvector that algorithm found at an
    earlier measurement) against PyHessian's cold start.
(2) accuracy on a model small enough to form the full Hessian
    (:func:`torch.autograd.functional.hessian` in float64, then :func:`torch.linalg.eigvalsh`):
    the relative error of all three values against the exact dominant (largest-magnitude)
    eigenvalue, over several random starts. All run on the float32 model, as in training.

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

from lightning_bn.diagnostics.eigen import EigAlgorithm, top_hessian_eigenvalue
from lightning_bn.diagnostics.hvp import HessianVectorProduct
from lightning_bn.probe import Probe

CRITERION = nn.CrossEntropyLoss()
ALGORITHMS: tuple[EigAlgorithm, ...] = ("power", "lanczos")


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
    model: nn.Module,
    batch: Any,
    init: dict[str, Tensor],
    tol: float,
    max_iters: int,
    algorithm: EigAlgorithm = "power",
) -> tuple[float, int]:
    """Our top eigenvalue and the number of Hessian-vector products it took."""
    probe = Probe(model, loss_fn=loss_fn)
    params = probe.parameters()

    def loss_at(point: dict[str, Tensor]) -> Tensor:
        return probe.loss({**params, **point}, batch)

    trainable = {k: params[k] for k in probe.trainable_names()}
    op = HessianVectorProduct(loss_at, trainable, method="reverse")
    res = top_hessian_eigenvalue(op, init, max_iters=max_iters, tol=tol, algorithm=algorithm)
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
    """Print (1): all timed from the same start vector, interleaved, one seed per round."""
    model.eval()  # what PyHessian does; the same function for all (see the module docstring)
    times: dict[str, list[float]] = {name: [] for name in (*ALGORITHMS, "pyhessian")}
    products: dict[str, list[int]] = {name: [] for name in times}
    values: dict[str, float] = {}
    for seed in range(repeats + 1):
        init = start_vector(model, seed)
        round_times: dict[str, float] = {}
        for algorithm in ALGORITHMS:
            run = partial(ours, model, batch, init, tol, max_iters, algorithm)
            round_times[algorithm], (values[algorithm], k) = timed(run)
            products[algorithm].append(k)
        run_py = partial(pyhessian, model, batch, seed, tol, max_iters)
        round_times["pyhessian"], (values["pyhessian"], k_py) = timed(run_py)
        products["pyhessian"].append(k_py)
        if seed == 0:  # warm-up
            for name in products:
                products[name].pop()
            continue
        for name, t in round_times.items():
            times[name].append(t)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {title} ({n_params} parameters), eval mode for all")
    medians = ", ".join(f"{name} {statistics.median(t) * 1e3:.1f} ms" for name, t in times.items())
    rounds = ", ".join(
        "/".join(str(products[name][i]) for name in products) for i in range(repeats)
    )
    last = " / ".join(f"{values[name]:.6g}" for name in products)
    print(
        f"    medians: {medians}; Hessian-vector products power/Lanczos/PyHessian per round:"
        f" {rounds}; last values {last}"
    )
    for algorithm in ALGORITHMS:
        ratios = [a / b for a, b in zip(times[algorithm], times["pyhessian"], strict=True)]
        print(
            f"(1) time ours ({algorithm}) / PyHessian = {min(ratios):.2f}   (min; median"
            f" {statistics.median(ratios):.2f}, all {fmt(ratios)}; target <= 0.5)"
        )


def compare_warm(
    title: str, model: nn.Module, batch: Any, tol: float, max_iters: int, repeats: int
) -> None:
    """Ours warm-started as SmoothnessCallback does it, against PyHessian's cold start.

    The warm start is the eigenvector that the same algorithm found 100 SGD steps earlier (lr
    0.05, random batches of the same shape), as a callback measuring every 100 steps would have it.
    The cold power iteration (the eigenvector before the steps, and the value after) is the
    reference of the relative error.
    """
    model.eval()
    earlier = copy.deepcopy(model)
    probe = Probe(earlier, loss_fn=loss_fn)
    params = probe.parameters()
    op = HessianVectorProduct(lambda p: probe.loss({**params, **p}, batch), params)
    warm = {
        algorithm: top_hessian_eigenvalue(
            op, start_vector(model, 0), max_iters=max_iters, tol=tol, algorithm=algorithm
        ).eigenvector
        for algorithm in ALGORITHMS
    }
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
    converged, _ = ours(model, batch, start_vector(model, 0), 1e-9, 2000, "lanczos")
    ratios: dict[str, list[float]] = {algorithm: [] for algorithm in ALGORITHMS}
    iters: dict[str, list[str]] = {algorithm: [] for algorithm in ALGORITHMS}
    lam_warm: dict[str, float] = {}
    for seed in range(repeats + 1):
        round_times: dict[str, float] = {}
        round_iters: dict[str, int] = {}
        for algorithm in ALGORITHMS:
            run = partial(ours, model, batch, warm[algorithm], tol, max_iters, algorithm)
            round_times[algorithm], (lam_warm[algorithm], round_iters[algorithm]) = timed(run)
        b, (_, k_py) = timed(partial(pyhessian, model, batch, seed, tol, max_iters))
        if seed:
            for algorithm in ALGORITHMS:
                ratios[algorithm].append(round_times[algorithm] / b)
                iters[algorithm].append(f"{round_iters[algorithm]}/{k_py}")
    for algorithm in ALGORITHMS:
        r = ratios[algorithm]
        print(
            f"    {title}, ours ({algorithm}) warm-started from its eigenvector of 100 SGD steps"
            f" earlier (as the callback runs it) / PyHessian cold = {min(r):.2f}   (min; median"
            f" {statistics.median(r):.2f}, all {fmt(r)}; products {', '.join(iters[algorithm])});"
            f" warm value {lam_warm[algorithm]:.6g}, relative error"
            f" {abs(lam_warm[algorithm] - converged) / abs(converged):.1e} against"
            f" {converged:.6g} (cold Lanczos, tol 1e-9)"
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
    errors: dict[str, list[float]] = {name: [] for name in (*ALGORITHMS, "pyhessian")}
    products: dict[str, list[int]] = {name: [] for name in errors}
    for seed in range(seeds):
        for algorithm in ALGORITHMS:
            lam, k = ours(model, batch, start_vector(model, seed), tol, max_iters, algorithm)
            errors[algorithm].append(abs(lam - exact) / abs(exact))
            products[algorithm].append(k)
        lam_py, k_py = pyhessian(model, batch, seed, tol, max_iters)
        errors["pyhessian"].append(abs(lam_py - exact) / abs(exact))
        products["pyhessian"].append(k_py)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {title} ({n_params} parameters), exact dominant eigenvalue"
        f" (float64 eigvalsh) = {exact:.8g}"
    )
    summary = "; ".join(
        f"{name} median {statistics.median(e):.2e} (max {max(e):.2e},"
        f" products median {statistics.median(products[name]):g})"
        for name, e in errors.items()
    )
    closer = ", ".join(
        f"{algorithm} {sum(a < b for a, b in zip(errors[algorithm], errors['pyhessian'], strict=True))}"
        f"/{seeds}"
        for algorithm in ALGORITHMS
    )
    print(f"(2) relative error at tol={tol:g}, {seeds} random starts: {summary}")
    print(f"    ours closer to exact than PyHessian: {closer}")


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
        f" at most {args.max_iters} Hessian-vector products for all"
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
    lam_train, _ = ours(bn, batch, start_vector(bn, 0), 1e-9, 2000, "lanczos")
    bn.eval()
    compare_time(
        "MLP 64-256x4-10, tanh, BatchNorm", bn, batch, args.tol, args.max_iters, args.repeats
    )
    lam_eval, _ = ours(bn, batch, start_vector(bn, 0), 1e-9, 2000, "lanczos")
    print(
        f"    BatchNorm: the eigenvalue in train mode (batch statistics, what the callbacks"
        f" measure) = {lam_train:.6g}; in eval mode (running statistics, what PyHessian"
        f" measures) = {lam_eval:.6g} (both converged: Lanczos, tol 1e-9)"
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
