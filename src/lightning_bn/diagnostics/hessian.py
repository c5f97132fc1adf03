r"""One measurement of the Hessian's spectrum at a training step (what ``HessianCallback`` logs).

Plain torch: the Hessian-vector products of the step's training loss (through a
:class:`~lightning_bn.probe.Probe`, the step's batch and RNG replayed), averaged over ranks as DDP
averages gradients, then :mod:`~lightning_bn.diagnostics.spectrum`,
:mod:`~lightning_bn.diagnostics.density` and :mod:`~lightning_bn.diagnostics.preconditioned` on
them. Every rank draws the same random vectors (one generator, the same seed and history), so
every rank computes the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypedDict

import torch
from torch import Tensor, nn

from lightning_bn._validation import check_bool, check_choice, check_float, check_int
from lightning_bn.diagnostics.density import spectral_density
from lightning_bn.diagnostics.hvp import HessianVectorProduct
from lightning_bn.diagnostics.ics import measured_layers
from lightning_bn.diagnostics.krylov import AddMatvec
from lightning_bn.diagnostics.paramvec import FlatLayout
from lightning_bn.diagnostics.preconditioned import optimizer_preconditioner
from lightning_bn.diagnostics.restart import check_basis_size
from lightning_bn.diagnostics.spectrum import (
    Matvec,
    block_indices,
    block_top_eigenvalues,
    hutchinson_trace,
    top_eigenvalues,
)
from lightning_bn.probe import Collective, Params, Probe, StepRecord

__all__ = ["HessianSettings", "HessianState", "compute_hessian", "module_layers"]


@dataclass(frozen=True)
class HessianSettings:
    """What one measurement computes; see :class:`~lightning_bn.callbacks.hessian.HessianCallback`
    for each argument's meaning and default.

    Raises:
        ValueError, TypeError: an argument out of range or of the wrong type (named).
    """

    top_k: int = 3
    max_iters: int = 300
    lanczos_basis: int | None = 0
    tol: float = 1e-3
    trace: bool = True
    trace_rtol: float = 0.02
    trace_max_samples: int = 100
    density: bool = True
    density_starts: int = 2
    density_steps: int = 50
    density_bins: int = 32
    density_sigma: float = 0.01
    density_reorth: bool = False
    per_layer: bool = True
    preconditioned: bool = True
    hvp_method: str = "reverse"

    def __post_init__(self) -> None:
        check_int("top_k", self.top_k, minimum=1)
        check_int("max_iters", self.max_iters, minimum=self.top_k + 1)
        check_int("trace_max_samples", self.trace_max_samples, minimum=2)
        if self.lanczos_basis is not None:
            check_basis_size("lanczos_basis", self.lanczos_basis)
        for name in ("density_starts", "density_steps", "density_bins"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("tol", "trace_rtol", "density_sigma"):
            object.__setattr__(self, name, check_float(name, getattr(self, name), minimum=0))
        for name in ("trace", "density", "density_reorth", "per_layer", "preconditioned"):
            check_bool(name, getattr(self, name))
        check_choice("hvp_method", self.hvp_method, ("reverse", "forward", "auto"))


@dataclass
class HessianState:
    """Warm starts between measurements (flat vectors in the trainable parameters' layout), kept
    in bfloat16: half a copy each; a start needs the direction only roughly (its rounding costs
    a product or two, and every start has a random part anyway). The per-layer blocks keep none:
    each starts from its part of the measurement's own top-k eigenvectors, which on an 8.7M MLP
    took a fifth fewer products than the block's eigenvector of the previous measurement."""

    top: list[Tensor] = field(default_factory=list)
    precond: list[Tensor] = field(default_factory=list)

    def to(self, device: torch.device | str) -> HessianState:
        return HessianState([t.to(device) for t in self.top], [t.to(device) for t in self.precond])


def compute_hessian(
    probe: Probe,
    params: Params,
    step: StepRecord,
    settings: HessianSettings,
    *,
    layers: Mapping[str, Sequence[str]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    state: HessianState | None = None,
    generator: torch.Generator | None = None,
    collective: Collective | None = None,
) -> tuple[dict[str, float], HessianState]:
    r"""Trace, top-k eigenvalues, density, per-layer blocks and preconditioned sharpness of
    :math:`H = \nabla^2 L(W^t)` on the step's batch (the trainable parameters).

    Args:
        probe: evaluates the model at a parameter point.
        params: :math:`W^t` (all parameters).
        step: the measured step (batch, RNG state).
        settings: what to compute.
        layers: layer name → its parameters' names (the diagonal blocks).
        optimizer: the optimiser whose state makes the preconditioner (``None``: none).
        state: warm starts from the previous measurement (handed over: each of its fields is
            emptied once read, so that those vectors need no memory during the measurement).
        generator: random source (the same state on every rank).
        collective: cross-rank averaging of the products (DDP semantics).

    Returns:
        ``(metrics, state)``: metric keys without the callback's prefix (see the callback's
        "Logged metrics"), and the warm starts for the next measurement.
    """
    coll = collective if collective is not None else Collective()
    state = state if state is not None else HessianState()
    names = probe.trainable_names()
    trainable = {k: params[k] for k in names}

    def loss_fn(point: Mapping[str, Tensor]) -> Tensor:
        return probe.loss({**params, **point}, step)

    op = coll.guard(
        lambda: HessianVectorProduct(  # products only: the gradient's values are not kept
            loss_fn,
            trainable,
            method=settings.hvp_method,  # type: ignore[arg-type]
            keep_grad=False,
        )
    )
    layout = op.layout

    def product(v: Tensor, into: Tensor | None, scale: Tensor | None = None) -> Tensor:
        """:math:`Hv` (:math:`DHDv` with ``scale`` :math:`D`), added into ``into`` if given."""
        if into is not None and coll.world_size == 1:  # added in place: no second vector
            return coll.guard(lambda: op.matvec(v, into, accumulate=True, scale=scale))
        hv = coll.mean(coll.guard(lambda: op.matvec(v, scale=scale)))
        return hv if into is None else into.add_(hv)

    matvec = AddMatvec(product)

    metrics: dict[str, float] = {}
    solver = _Solver(
        tol=settings.tol, generator=generator, warn=False, basis_size=settings.lanczos_basis
    )
    sampled = _Sampled(matvec=matvec, layout=layout, generator=generator)
    new = HessianState()
    k = settings.top_k
    warm = _summed(state.top, layout.numel)
    state.top = []  # one vector from here on: the old ones are freed (``state`` is handed over)
    top = top_eigenvalues(
        matvec,
        layout,
        k,
        warm,
        max_iters=max(settings.max_iters, k + 1),
        store=_eigenvector_dtype(layout),
        **solver,
    )
    for i in range(k):
        metrics[f"eig_{i + 1}"] = top.eigenvalues[i] if i < len(top.eigenvalues) else math.nan
    metrics["eig_converged"] = float(top.converged)
    metrics["eig_iters"] = float(top.iterations)
    new.top = [v.detach() for v in top.eigenvectors]
    del warm

    blocks = block_indices(layout, layers) if layers and settings.per_layer else {}
    if settings.trace:
        tr = hutchinson_trace(
            **sampled,
            rtol=settings.trace_rtol,
            max_samples=settings.trace_max_samples,
            min_samples=min(10, settings.trace_max_samples),
            deflate=top.run if settings.lanczos_basis is None else new.top,
            blocks=blocks,
            warn=False,
        )
        metrics |= {
            "trace": tr.trace,
            "trace_stderr": tr.stderr,
            "trace_converged": float(tr.converged),
            "trace_samples": float(tr.samples),
        }
        for name, (value, err) in tr.blocks.items():
            metrics[f"{name}/trace"] = value
            metrics[f"{name}/trace_stderr"] = err
    del top  # the full Lanczos basis (lanczos_basis=None) is not needed beyond the trace
    new.top = [_kept(v) for v in _summed(new.top, layout.numel) or []]  # one vector

    if blocks:
        # each block starts from its part of the top-k eigenvectors just found (views: no memory)
        init = {name: new.top[0][idx] for name, idx in blocks.items()} if new.top else None
        per_block = block_top_eigenvalues(
            matvec, layout, blocks, init, max_iters=settings.max_iters, **solver
        )
        for name, res in per_block.items():
            metrics[f"{name}/eig_max"] = res.eigenvalues[0] if res.eigenvalues else math.nan
            metrics[f"{name}/eig_converged"] = float(res.converged)
        del per_block, init
    if settings.preconditioned and optimizer is not None:
        named = dict(probe.module.named_parameters())
        pre = optimizer_preconditioner(optimizer, {n: named[n] for n in names}, layout)
        if pre is not None:
            metrics["stability_threshold"] = pre.threshold
            if pre.identity:
                metrics["precond_eig_max"] = metrics["eig_1"]
                metrics["precond_converged"] = metrics["eig_converged"]
            else:
                root = pre.inverse.sqrt_()  # S^(1/2) in S's memory: S is not needed after
                res = top_eigenvalues(  # S^(1/2) H S^(1/2), with no scaled copy of a vector
                    AddMatvec(partial(product, scale=root)),
                    layout,
                    1,
                    state.precond or None,
                    max_iters=max(settings.max_iters, 2),
                    **solver,
                )
                metrics["precond_eig_max"] = res.eigenvalues[0] if res.eigenvalues else math.nan
                metrics["precond_converged"] = float(res.converged)
                new.precond = [_kept(v) for v in res.eigenvectors]
                del res, root
        del pre  # the preconditioner's copy of the parameters' size
    state.precond = []

    if settings.density:
        dens = spectral_density(
            **sampled,
            starts=settings.density_starts,
            steps=settings.density_steps,
            reorthogonalize=settings.density_reorth,
        )
        masses, lo, hi = dens.histogram(settings.density_bins, settings.density_sigma)
        metrics["density/lo"], metrics["density/hi"] = lo, hi
        width = len(str(settings.density_bins - 1))
        for j, mass in enumerate(masses.tolist()):
            metrics[f"density/bin_{j:0{width}d}"] = mass
    return metrics, new


class _Solver(TypedDict):
    """The options every eigenvalue run of one measurement shares."""

    tol: float
    generator: torch.Generator | None
    warn: bool
    basis_size: int | None


class _Sampled(TypedDict):
    """What the two estimates from random vectors (trace, density) share: the operator and the
    random source."""

    matvec: Matvec
    layout: FlatLayout
    generator: torch.Generator | None


#: From this many float32 parameters on, the top-k eigenvectors are kept in bfloat16 as they
#: are found (half a copy each, through the top-k and the trace): rounding turns each vector by
#: about 1e-3, which shifts a later eigenvalue by about 1e-6 of the first (the size of the
#: tolerance floor later eigenvalues have anyway); below, the memory is small.
_ROUNDED_FROM = 1 << 20


def _eigenvector_dtype(layout: FlatLayout) -> torch.dtype | None:
    big = layout.numel >= _ROUNDED_FROM and layout.dtype == torch.float32
    return torch.bfloat16 if big else None


def _kept(v: Tensor) -> Tensor:
    return v.detach().to(torch.bfloat16)


def _summed(vectors: Sequence[Tensor], numel: int) -> list[Tensor] | None:
    """The sum of the unit vectors along ``vectors`` (those finite and of ``numel`` entries),
    as a one-vector warm start, or ``None``."""
    total: Tensor | None = None
    for v in vectors:
        norm = float(torch.linalg.vector_norm(v))
        if v.numel() == numel and 0.0 < norm < math.inf:
            total = v / norm if total is None else total.add_(v, alpha=1.0 / norm)
    return None if total is None else [total]


def module_layers(
    module: nn.Module, selectors: Sequence[str | type[nn.Module]] | None
) -> dict[str, list[str]]:
    """The layers as ICS names them (:func:`~lightning_bn.diagnostics.ics.measured_layers`):
    layer name → its trainable parameters' qualified names."""
    return {layer.name: list(layer.params) for layer in measured_layers(module, selectors)}
