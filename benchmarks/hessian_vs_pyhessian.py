"""Top Hessian eigenvalue: ours (Probe + HessianVectorProduct + Lanczos or power iteration) vs PyHessian.

Both measure the same function: the **training** loss, BatchNorm in train mode (batch
statistics). PyHessian's ``hessian(...)`` constructor calls ``model.eval()``; here it runs with
that call switched off (:func:`train_mode_pyhessian`: ``model.eval`` is a no-op on the instance
for the duration of the constructor, so the model stays in train mode and its
``loss.backward(create_graph=True)`` and every product see batch statistics). The running
statistics its forward pass updates do not enter the train-mode loss. Ours never changes the
mode: the Probe evaluates the module in the mode it is in, on copies of the buffers.

Prints, measured side by side in one run, for every model (MLPs of about 1.5k, 3.5k, 19k and 217k
parameters, each without and with BatchNorm; tanh, no dropout):

(1) time to the top eigenvalue at the same tolerance (``--tol``, default 1e-3) on the same batch,
    ours ÷ PyHessian's (target: ours with Lanczos ≤ 0.5×). Ours is ``HessianVectorProduct(loss
    through Probe, params)`` (one loss and gradient pass that keeps its graph) then
    :func:`top_hessian_eigenvalue` with ``algorithm="lanczos"`` (and, for the cost of the same
    products, ``"power"``); PyHessian's is ``hessian(model, criterion, data=(x, y), cuda=False)``
    (the same kept first-order graph, built by ``loss.backward(create_graph=True)``) then
    ``.eigenvalues(maxIter=..., tol=...)`` (power iteration). All are timed from the model and
    batch to the number, building the graph included, interleaved over ``--repeats`` rounds after
    one warm-up round (median, min and all ratios printed). In each round all start from the same
    random vector (PyHessian draws it from the global RNG after seeding; ours is handed the same
    draw as ``init``), another seed per round; ours with power iteration then does the same work
    as PyHessian (the ratio is the cost of the same products), ours with Lanczos needs fewer
    products to the same tolerance. Time is process CPU time, one thread by default.
(2) accuracy on models small enough to form the full Hessian
    (:func:`torch.autograd.functional.hessian` in float64 of the same train-mode loss, then
    :func:`torch.linalg.eigvalsh`): the relative error of all three values against the exact
    dominant (largest-magnitude) eigenvalue, over several random starts, at tol 1e-3 and 1e-6. All
    run on the float32 model, as in training.
(3) ours warm-started as SmoothnessCallback runs it (from the eigenvector that algorithm found 100
    SGD steps earlier) against PyHessian's cold start, on the largest model.

(4) trace and spectral density (``--spectrum``, or ``--spectrum-only`` for this part alone), on
    models small enough for the full float64 Hessian (MLP 64-16-16-10 without and with
    BatchNorm, a BatchNorm CNN), over ``--seeds`` random seeds, time and error against the exact
    spectrum:

    - trace: ours is a 20-step Lanczos basis then Hutchinson deflated by it
      (:func:`~lightning_bn.diagnostics.spectrum.hutchinson_trace`, Rademacher probes, stopping
      at a standard error of 2% of the trace or 100 probes), PyHessian's ``trace()`` at its
      defaults (Rademacher probes, stops when the running mean changes by less than 1e-3
      relative, at most 100 probes); error ``|estimate - tr H| / |tr H|``;
    - trace at the same budget: ours with 20 Lanczos steps and 80 probes, PyHessian with 100
      probes (``tol=0``);
    - density: ours is :func:`~lightning_bn.diagnostics.density.spectral_density` at the
      callback's defaults (2 starts × 50 Lanczos steps) and at PyHessian's (1 × 100),
      PyHessian's ``density()`` at its defaults (1 start × 100 steps; its ``torch.eig`` call, gone from torch, is served by
      ``torch.linalg.eigh``); errors: the Wasserstein-1 distance between the quadrature measure
      and the exact eigenvalue distribution, relative to the spectrum's width, and the relative
      errors of the first two moments (``tr H / n``, ``tr H² / n``).

A last table summarises (1) and (2) in the README's form; (4) prints its own.

Run it in the benchmark's own environment (PyHessian is not a dependency of the project)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install -e . pyhessian
    .venv-bench/bin/python benchmarks/hessian_vs_pyhessian.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from pyhessian import hessian as PyHessian
from torch import Tensor, nn

from lightning_bn.diagnostics.density import spectral_density
from lightning_bn.diagnostics.eigen import EigAlgorithm, top_hessian_eigenvalue
from lightning_bn.diagnostics.hvp import HessianVectorProduct
from lightning_bn.diagnostics.spectrum import hutchinson_trace, lanczos
from lightning_bn.probe import Probe

CRITERION = nn.CrossEntropyLoss()
ALGORITHMS: tuple[EigAlgorithm, ...] = ("lanczos", "power")
NAMES = (*ALGORITHMS, "pyhessian")
#: (title, widths): about 1.5k, 3.5k, 19k and 217k parameters without BatchNorm.
SIZES: tuple[tuple[str, list[int]], ...] = (
    ("MLP 64-16-16-10", [64, 16, 16, 10]),
    ("MLP 64-32-32-10", [64, 32, 32, 10]),
    ("MLP 64-128-80-10", [64, 128, 80, 10]),
    ("MLP 64-256x4-10", [64, 256, 256, 256, 256, 10]),
)


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
    algorithm: EigAlgorithm = "lanczos",
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


@contextlib.contextmanager
def train_mode_pyhessian(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` is a no-op (returns the model, mode unchanged) inside the block."""
    model.eval = lambda: model  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.eval


def pyhessian(
    model: nn.Module, batch: Any, seed: int, tol: float, max_iters: int
) -> tuple[float, int]:
    """PyHessian's top eigenvalue (model kept in train mode) and the products it took."""
    model.zero_grad(set_to_none=True)  # its constructor accumulates into .grad
    with train_mode_pyhessian(model):
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


def span(values: Sequence[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


@dataclass
class Row:
    """One line of the summary table."""

    title: str
    n_params: int
    ratios: dict[str, list[float]] = field(default_factory=dict)
    products: dict[str, list[int]] = field(default_factory=dict)
    ms: dict[str, float] = field(default_factory=dict)


def compare_time(
    title: str, model: nn.Module, batch: Any, tol: float, max_iters: int, repeats: int
) -> Row:
    """Print (1): all timed from the same start vector, interleaved, one seed per round."""
    model.train()
    times: dict[str, list[float]] = {name: [] for name in NAMES}
    products: dict[str, list[int]] = {name: [] for name in NAMES}
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
    row = Row(title, sum(p.numel() for p in model.parameters()))
    print(f"model: {title} ({row.n_params} parameters), train mode for all")
    row.ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    medians = ", ".join(f"{name} {ms:.1f} ms" for name, ms in row.ms.items())
    rounds = ", ".join("/".join(str(products[name][i]) for name in NAMES) for i in range(repeats))
    last = " / ".join(f"{values[name]:.6g}" for name in NAMES)
    print(
        f"    medians: {medians}; Hessian-vector products Lanczos/power/PyHessian per round:"
        f" {rounds}; last values {last}"
    )
    row.products = products
    for algorithm in ALGORITHMS:
        ratios = [a / b for a, b in zip(times[algorithm], times["pyhessian"], strict=True)]
        row.ratios[algorithm] = ratios
        print(
            f"(1) time ours ({algorithm}) / PyHessian = {statistics.median(ratios):.2f}   (median;"
            f" min {min(ratios):.2f}, all {fmt(ratios)}; target for Lanczos <= 0.5)"
        )
    return row


def compare_warm(
    title: str, model: nn.Module, batch: Any, tol: float, max_iters: int, repeats: int
) -> None:
    """Ours warm-started as SmoothnessCallback does it, against PyHessian's cold start.

    The warm start is the eigenvector that the same algorithm found 100 SGD steps earlier (lr
    0.05, random batches of the same shape), as a callback measuring every 100 steps would have it.
    A cold Lanczos at tol 1e-9 is the reference of the relative error.
    """
    model = copy.deepcopy(model).train()
    probe = Probe(copy.deepcopy(model), loss_fn=loss_fn)
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
            f"(3) {title}, ours ({algorithm}) warm-started from its eigenvector of 100 SGD steps"
            f" earlier (as the callback runs it) / PyHessian cold = {statistics.median(r):.2f}"
            f"   (median; min {min(r):.2f}, all {fmt(r)}; products {', '.join(iters[algorithm])});"
            f" warm value {lam_warm[algorithm]:.6g}, relative error"
            f" {abs(lam_warm[algorithm] - converged) / abs(converged):.1e} against"
            f" {converged:.6g} (cold Lanczos, tol 1e-9)"
        )


def exact_dominant(model: nn.Module, batch: Any) -> float:
    """The largest-magnitude eigenvalue of the full Hessian of the train-mode loss, in float64."""
    eig = exact_spectrum(model, batch)
    return float(eig[eig.abs().argmax()])


def exact_spectrum(model: nn.Module, batch: Any) -> Tensor:
    """Every eigenvalue of the full Hessian of the train-mode loss, in float64, ascending."""
    net = copy.deepcopy(model).double().train()
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
    return torch.linalg.eigvalsh(h)


def compare_accuracy(
    title: str, model: nn.Module, batch: Any, tols: Sequence[float], max_iters: int, seeds: int
) -> dict[float, dict[str, float]]:
    """Print (2); return the median relative error per tolerance and name."""
    model.train()
    exact = exact_dominant(model, batch)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {title} ({n_params} parameters), train mode, exact dominant eigenvalue"
        f" (float64 eigvalsh) = {exact:.8g}"
    )
    out: dict[float, dict[str, float]] = {}
    for tol in tols:
        errors: dict[str, list[float]] = {name: [] for name in NAMES}
        products: dict[str, list[int]] = {name: [] for name in NAMES}
        for seed in range(seeds):
            for algorithm in ALGORITHMS:
                lam, k = ours(model, batch, start_vector(model, seed), tol, max_iters, algorithm)
                errors[algorithm].append(abs(lam - exact) / abs(exact))
                products[algorithm].append(k)
            lam_py, k_py = pyhessian(model, batch, seed, tol, max_iters)
            errors["pyhessian"].append(abs(lam_py - exact) / abs(exact))
            products["pyhessian"].append(k_py)
        summary = "; ".join(
            f"{name} median {statistics.median(e):.2e} (max {max(e):.2e},"
            f" products median {statistics.median(products[name]):g})"
            for name, e in errors.items()
        )
        closer = ", ".join(
            f"{a} {sum(x < y for x, y in zip(errors[a], errors['pyhessian'], strict=True))}/{seeds}"
            for a in ALGORITHMS
        )
        out[tol] = {name: statistics.median(e) for name, e in errors.items()}
        advantage = out[tol]["pyhessian"] / max(out[tol]["lanczos"], 1e-300)
        print(f"(2) relative error at tol={tol:g}, {seeds} random starts: {summary}")
        print(
            f"    ours closer to exact than PyHessian: {closer}; PyHessian's median error"
            f" / Lanczos's = {advantage:.1f}"
        )
    return out


def cnn_bn() -> nn.Module:
    """A small BatchNorm CNN on 8×8 one-channel images (about 1.1k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.BatchNorm2d(8),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _operator(model: nn.Module, batch: Any) -> HessianVectorProduct:
    probe = Probe(model, loss_fn=loss_fn)
    params = probe.parameters()
    trainable = {k: params[k] for k in probe.trainable_names()}
    return HessianVectorProduct(lambda p: probe.loss({**params, **p}, batch), trainable)


def ours_trace(
    model: nn.Module, batch: Any, seed: int, rtol: float = 0.02, probes: int = 100
) -> tuple[float, int]:
    """Our trace: a 20-step Lanczos basis, then Hutchinson deflated by it; products taken."""
    op = _operator(model, batch)
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(op.layout.numel, generator=gen, dtype=op.layout.dtype)
    run = lanczos(op.matvec, start / start.norm(), 20)
    tr = hutchinson_trace(
        op.matvec, op.layout, rtol=rtol, max_samples=probes, generator=gen, deflate=run, warn=False
    )
    return tr.trace, run.steps + tr.samples


def pyhessian_object(model: nn.Module, batch: Any) -> Any:
    model.zero_grad(set_to_none=True)
    with train_mode_pyhessian(model):
        h = PyHessian(model, CRITERION, data=batch, cuda=False)
    return h


def pyhessian_trace(
    model: nn.Module, batch: Any, seed: int, tol: float = 1e-3
) -> tuple[float, int]:
    h = pyhessian_object(model, batch)
    torch.manual_seed(seed)
    samples = h.trace(maxIter=100, tol=tol)
    model.zero_grad(set_to_none=True)
    return float(statistics.fmean(samples)), len(samples)


def ours_density(
    model: nn.Module, batch: Any, seed: int, starts: int = 2, steps: int = 50
) -> tuple[list[Tensor], list[Tensor]]:
    op = _operator(model, batch)
    gen = torch.Generator().manual_seed(seed)
    dens = spectral_density(op.matvec, op.layout, starts=starts, steps=steps, generator=gen)
    return dens.nodes, dens.weights


def _eig_shim(matrix: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.eig`` (removed from torch) for PyHessian's symmetric tridiagonal matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    return torch.stack([values, torch.zeros_like(values)], 1), vectors


def pyhessian_density(model: nn.Module, batch: Any, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    h = pyhessian_object(model, batch)
    torch.manual_seed(seed)
    torch.eig = _eig_shim  # type: ignore[attr-defined]
    try:
        nodes, weights = h.density()
    finally:
        del torch.eig  # type: ignore[attr-defined]
    model.zero_grad(set_to_none=True)
    return (
        [torch.tensor(x, dtype=torch.float64) for x in nodes],
        [torch.tensor(w, dtype=torch.float64) for w in weights],
    )


def density_errors(
    nodes: Sequence[Tensor], weights: Sequence[Tensor], exact: Tensor
) -> tuple[float, float, float]:
    """Wasserstein-1 distance to the exact eigenvalue distribution (relative to its width) and the
    relative errors of the first two moments."""
    x = torch.cat(list(nodes))
    w = torch.cat([wt / wt.sum() for wt in weights]) / len(weights)
    points = torch.cat([x, exact])
    mass = torch.cat([w, -torch.full_like(exact, 1.0 / exact.numel())])
    order = points.argsort()
    points, mass = points[order], mass[order]
    cdf_gap = mass.cumsum(0)[:-1].abs()
    w1 = float((cdf_gap * points.diff()).sum()) / float(exact.max() - exact.min())
    moments = []
    for p in (1, 2):
        want = float((exact**p).mean())
        moments.append(abs(float((w * x**p).sum()) - want) / abs(want))
    return w1, moments[0], moments[1]


@dataclass
class SpectrumRow:
    title: str
    n_params: int
    ms: dict[str, float]
    errors: dict[str, list[float]]
    products: dict[str, list[int]]


def compare_spectrum(title: str, model: nn.Module, batch: Any, seeds: int) -> SpectrumRow:
    """Print (4): trace and density, ours and PyHessian's, interleaved over seeds."""
    model.train()
    exact = exact_spectrum(model, batch)
    trace = float(exact.sum())
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {title} ({n_params} parameters), train mode; exact trace {trace:.6g},"
        f" eigenvalues in [{float(exact.min()):.4g}, {float(exact.max()):.4g}]"
    )
    runs: dict[str, Callable[[int], Any]] = {
        "trace": partial(ours_trace, model, batch),
        "py_trace": partial(pyhessian_trace, model, batch),
        "trace100": partial(ours_trace, model, batch, rtol=0.0, probes=80),
        "py_trace100": partial(pyhessian_trace, model, batch, tol=0.0),
        "dens": partial(ours_density, model, batch),
        "dens1x100": partial(ours_density, model, batch, starts=1, steps=100),
        "py_dens": partial(pyhessian_density, model, batch),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    errors: dict[str, list[float]] = {}
    products: dict[str, list[int]] = {k: [] for k in runs if "trace" in k}
    for seed in range(seeds + 1):
        for key, fn in runs.items():
            t, out = timed(partial(fn, seed))
            if seed == 0:  # warm-up
                continue
            times[key].append(t)
            if "trace" in key:
                value, k = out
                errors.setdefault(key, []).append(abs(value - trace) / abs(trace))
                products[key].append(k)
            else:
                for name, e in zip(("w1", "m1", "m2"), density_errors(*out, exact), strict=True):
                    errors.setdefault(f"{key}/{name}", []).append(e)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in errors.items()}
    for ours, py, label in (
        ("trace", "py_trace", "trace, defaults"),
        ("trace100", "py_trace100", "trace, 100 products each"),
    ):
        print(
            f"(4) {label}: ours {ms[ours]:.1f} ms, products {span(products[ours])}, median"
            f" relative error {med[ours]:.2e}; PyHessian {ms[py]:.1f} ms, products"
            f" {span(products[py])}, median relative error {med[py]:.2e};"
            f" time ratio {ms[ours] / ms[py]:.2f}"
        )
    for ours, label in (("dens", "ours 2×50"), ("dens1x100", "ours 1×100")):
        print(
            f"(4) density: {label} {ms[ours]:.1f} ms, W1/width {med[ours + '/w1']:.2e}, moment"
            f" errors {med[ours + '/m1']:.2e} / {med[ours + '/m2']:.2e}; PyHessian (1×100)"
            f" {ms['py_dens']:.1f} ms, W1/width {med['py_dens/w1']:.2e}, moment errors"
            f" {med['py_dens/m1']:.2e} / {med['py_dens/m2']:.2e};"
            f" time ratio {ms[ours] / ms['py_dens']:.2f}"
        )
    return SpectrumRow(title, n_params, ms, errors, products)


def spectrum_summary(rows: Sequence[SpectrumRow]) -> None:
    print()
    print(
        "| model | quantity | ours ms | PyHessian ms | ours ÷ PyHessian |"
        " ours error (median) | PyHessian error (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        e = {k: statistics.median(v) for k, v in r.errors.items()}
        ms = r.ms
        model = f"{r.title} ({r.n_params})"
        for ours, py, label in (
            ("trace", "py_trace", "trace, defaults"),
            ("trace100", "py_trace100", "trace, 100 products each"),
        ):
            print(
                f"| {model} | {label} ({span(r.products[ours])} / {span(r.products[py])}"
                f" products) | {ms[ours]:.1f} | {ms[py]:.1f} | {ms[ours] / ms[py]:.2f} |"
                f" {e[ours]:.1e} | {e[py]:.1e} |"
            )
            model = ""
        for ours, label in (("dens", "2×50 (default)"), ("dens1x100", "1×100")):
            print(
                f"| | density, ours {label} vs 1×100: W1/width; moments 1, 2 | {ms[ours]:.1f} |"
                f" {ms['py_dens']:.1f} | {ms[ours] / ms['py_dens']:.2f} |"
                f" {e[ours + '/w1']:.1e}; {e[ours + '/m1']:.1e}, {e[ours + '/m2']:.1e} |"
                f" {e['py_dens/w1']:.1e}; {e['py_dens/m1']:.1e}, {e['py_dens/m2']:.1e} |"
            )


def run_spectrum(seeds: int) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    rows = []
    title, widths = SIZES[0]
    for bn in (False, True):
        torch.manual_seed(1)
        full = f"{title}, tanh, {'BatchNorm' if bn else 'no BatchNorm'}"
        rows.append(compare_spectrum(full, mlp(widths, batchnorm=bn), (x, y), seeds))
    torch.manual_seed(1)
    images = (torch.randn(64, 1, 8, 8), y)
    rows.append(compare_spectrum("CNN 2 conv, BatchNorm, tanh", cnn_bn(), images, seeds))
    spectrum_summary(rows)


def summary(rows: Sequence[Row], accuracy: dict[str, dict[float, dict[str, float]]]) -> None:
    print()
    print(
        "| model | parameters | ours (Lanczos) ÷ PyHessian, median (min) | products Lanczos /"
        " PyHessian | ours (power) ÷ PyHessian, median | ms Lanczos / PyHessian |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        lz = r.ratios["lanczos"]
        print(
            f"| {r.title} | {r.n_params} | {statistics.median(lz):.2f} ({min(lz):.2f}) |"
            f" {span(r.products['lanczos'])} / {span(r.products['pyhessian'])} |"
            f" {statistics.median(r.ratios['power']):.2f} |"
            f" {r.ms['lanczos']:.1f} / {r.ms['pyhessian']:.1f} |"
        )
    for title, by_tol in accuracy.items():
        parts = ", ".join(
            f"tol {tol:g}: Lanczos {e['lanczos']:.1e} vs PyHessian {e['pyhessian']:.1e}"
            f" ({e['pyhessian'] / max(e['lanczos'], 1e-300):.0f}x)"
            for tol, e in by_tol.items()
        )
        print(f"accuracy, {title}, median relative error against eigvalsh: {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative tolerance (both)")
    parser.add_argument("--max-iters", type=int, default=100, help="most products (both)")
    parser.add_argument("--seeds", type=int, default=10, help="random starts of (2)")
    parser.add_argument(
        "--only", default="", help="run only the models whose title contains this (no (2), (3))"
    )
    parser.add_argument("--spectrum", action="store_true", help="also run (4): trace, density")
    parser.add_argument("--spectrum-only", action="store_true", help="run (4) alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.spectrum_only:
        run_spectrum(args.seeds)
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); tol={args.tol:g},"
        f" at most {args.max_iters} Hessian-vector products for all; BatchNorm in train mode"
        " for all (PyHessian's model.eval() switched off)"
    )
    torch.manual_seed(0)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    batch = (x, y)
    rows: list[Row] = []
    for (title, widths), bn in itertools.product(SIZES, (False, True)):
        full = f"{title}, tanh, {'BatchNorm' if bn else 'no BatchNorm'}"
        if args.only not in full:
            continue
        torch.manual_seed(1)
        model = mlp(widths, batchnorm=bn)
        rows.append(compare_time(full, model, batch, args.tol, args.max_iters, args.repeats))
    accuracy: dict[str, dict[float, dict[str, float]]] = {}
    if not args.only:
        title, widths = SIZES[-1]
        torch.manual_seed(1)
        compare_warm(title, mlp(widths), batch, args.tol, args.max_iters, args.repeats)
        title, widths = SIZES[0]
        for bn in (False, True):
            full = f"{title}, tanh, {'BatchNorm' if bn else 'no BatchNorm'}"
            torch.manual_seed(1)
            model = mlp(widths, batchnorm=bn)
            accuracy[full] = compare_accuracy(
                full, model, batch, (args.tol, 1e-6), args.max_iters, args.seeds
            )
    summary(rows, accuracy)
    if args.spectrum:
        run_spectrum(args.seeds)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    main()
