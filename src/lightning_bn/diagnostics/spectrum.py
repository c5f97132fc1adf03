r"""The Hessian beyond its dominant eigenvalue: top-k eigenvalues, trace, spectral density, blocks.

Everything works on a linear map :math:`v \mapsto Hv` on flat vectors (``matvec``) with its
:class:`~lightning_bn.diagnostics.paramvec.FlatLayout` (a
:class:`~lightning_bn.diagnostics.hvp.HessianVectorProduct`, or any
:class:`~lightning_bn.diagnostics.hvp.FlatOperator`), so nothing here evaluates a model. Plain
torch; random vectors come from a caller's :class:`torch.Generator` (never the global RNG), so two
processes with the same generator state draw the same vectors (DDP: every rank takes the same
products of the rank-averaged Hessian and gets bitwise the same numbers).

* :func:`top_eigenvalues`: the :math:`k` largest (algebraic) eigenvalues by Lanczos with full
  reorthogonalisation, stopping when every wanted Ritz pair's residual
  :math:`\lVert H y_i - \theta_i y_i\rVert = \beta_m |s_{mi}|` is at most
  :math:`\mathrm{tol}\cdot|\theta_i|` (ARPACK's rule: an eigenvalue of :math:`H` lies within the
  residual of :math:`\theta_i`).
* :func:`hutchinson_trace`: Hutchinson's estimator with Rademacher probes, deflated by a Lanczos
  basis when one is given (the basis part of the trace is exact, the estimator only sees the
  rest), stopping on its own standard error; per-block traces from the same products.
* :func:`~lightning_bn.diagnostics.density.spectral_density` (its own module): the SLQ density.
* :func:`block_top_eigenvalues`: the largest eigenvalue of each diagonal block
  :math:`H_{bb}` (one parameter group, e.g. a layer).

Memory, in flat vectors of the parameters' size: ``max_iters`` (or ``steps``) for a Lanczos run
keeping its basis, ``basis_size`` + :math:`k` with a ``basis_size``, :math:`k` + 3 with ``0``
(:math:`k` + 2 with a :class:`~lightning_bn.diagnostics.krylov.AddMatvec`; :math:`k` in ``store``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_bn._validation import check_float, check_int
from lightning_bn.diagnostics.eigen import _BREAKDOWN, _Basis, _Tridiagonal, warn_unconverged
from lightning_bn.diagnostics.paramvec import FlatLayout
from lightning_bn.diagnostics.restart import (
    Block,
    _rademacher,
    _start,
    _SubLayout,
    block_numel,
    check_basis_size,
    deflated_top,
)
from lightning_bn.diagnostics.span import Span, _dot, deflated_exact_trace

__all__ = [
    "LanczosRun",
    "TopEigResult",
    "TraceResult",
    "block_indices",
    "block_top_eigenvalues",
    "hutchinson_trace",
    "lanczos",
    "top_eigenvalues",
]

Matvec = Callable[[Tensor], Tensor]


@dataclass
class LanczosRun:
    r"""A Lanczos run: :math:`H Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top` (to rounding).

    Attributes:
        basis: the orthonormal vectors :math:`Q_m` (rows).
        tri: :math:`T_m` (float64, CPU).
        beta: :math:`\beta_m`, the norm of the last residual (0 after a breakdown).
        residual: :math:`q_{m+1}` (unit; zeros after a breakdown).
        breakdown: whether the Krylov space became invariant (Ritz values exact).
        finite: whether every product was finite.
    """

    basis: _Basis
    tri: _Tridiagonal
    beta: float
    residual: Tensor
    breakdown: bool
    finite: bool = True

    @property
    def steps(self) -> int:
        return self.tri.size

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending, float64) and the eigenvectors of :math:`T_m` (columns)."""
        return torch.linalg.eigh(self.tri.matrix())


def lanczos(
    matvec: Matvec,
    q: Tensor,
    max_steps: int,
    stop: Callable[[LanczosRun], bool] | None = None,
    reorthogonalize: bool = True,
) -> LanczosRun:
    r"""Lanczos with full reorthogonalisation from the unit vector ``q``, at most ``max_steps``
    products, stopping early when ``stop(run)`` says so (checked after every product) or at a
    breakdown. The recurrence is that of
    :func:`~lightning_bn.diagnostics.eigen.top_hessian_eigenvalue`: three-term step, then one
    classical Gram-Schmidt pass against the whole basis (``reorthogonalize=False``: the
    three-term step alone, the basis stays empty, and three vectors are live at a time: ``q``
    itself is overwritten once the recurrence is past it)."""
    start = q
    basis = _Basis(q.numel(), max_steps + 1 if reorthogonalize else 0, q.dtype, q.device)
    if reorthogonalize:
        q = basis.append(q)
    q_prev: Tensor | None = None
    eps = torch.finfo(q.dtype).eps
    tri = _Tridiagonal(max_steps)
    beta, scale = 0.0, 0.0
    run = LanczosRun(basis, tri, 0.0, q.new_zeros(0), False)
    for _ in range(max_steps):
        w = matvec(q)
        with torch.no_grad():
            hq_norm_t = torch.linalg.vector_norm(w)
            if q_prev is not None:
                w.sub_(q_prev, alpha=beta)
            alpha_t = torch.dot(q, w)
            w.addcmul_(q, alpha_t, value=-1.0)
            if reorthogonalize:
                basis.project_out(w)
            stats = torch.stack([alpha_t, hq_norm_t, torch.linalg.vector_norm(w)])
        alpha, hq_norm, new_beta = stats.tolist()
        if not (math.isfinite(alpha) and math.isfinite(hq_norm) and math.isfinite(new_beta)):
            run.finite = False
            return run
        tri.append(alpha, beta)
        scale = max(scale, hq_norm)
        if new_beta <= _BREAKDOWN * eps * scale:
            run.beta, run.residual, run.breakdown = 0.0, torch.zeros_like(q), True
            return run
        w.div_(new_beta)
        if q_prev is start and not reorthogonalize:  # q_1 is dead: its memory holds q_{j+1}
            w = start.copy_(w)
        run.beta, run.residual = new_beta, w
        if stop is not None and stop(run):
            return run
        if tri.size == max_steps:
            return run
        beta = new_beta
        q_prev, q = q, (basis.append(w) if reorthogonalize else w)
    return run


# --- top-k -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopEigResult:
    r"""Result of :func:`top_eigenvalues`.

    Attributes:
        eigenvalues: the :math:`k` largest Ritz values, descending (``nan``: a product not finite).
        residuals: :math:`\lVert H y_i - \theta_i y_i \rVert` of each (an eigenvalue of
            :math:`H` lies within it of :math:`\theta_i`).
        eigenvectors: their unit Ritz vectors (flat, in the operator's layout); pass them as
            ``init`` to warm-start the next call.
        iterations: Hessian-vector products taken.
        converged: every residual met the tolerance (or the Krylov space became invariant).
        run: the Lanczos run, e.g. to deflate :func:`hutchinson_trace`.
    """

    eigenvalues: list[float]
    residuals: list[float]
    eigenvectors: list[Tensor]
    iterations: int
    converged: bool
    run: LanczosRun | None = field(default=None, repr=False)


def top_eigenvalues(
    matvec: Matvec,
    layout: FlatLayout,
    k: int = 1,
    init: Sequence[Tensor] | None = None,
    *,
    max_iters: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    warn: bool = True,
    basis_size: int | None = None,
    store: torch.dtype | None = None,
) -> TopEigResult:
    r"""The :math:`k` largest eigenvalues of :math:`H` (algebraic, descending) by Lanczos.

    Lanczos with full reorthogonalisation from :math:`q_1`; after product :math:`m`, the Ritz pairs
    :math:`(\theta_i, y_i = Q_m s_i)` of :math:`T_m` have residuals
    :math:`\lVert H y_i - \theta_i y_i\rVert = \beta_m |s_{mi}|`, and the iteration stops when the
    :math:`k` largest satisfy

    .. math::
        \beta_m |s_{mi}| \le \mathrm{tol} \cdot \max(|\theta_i|, 10^{-3} \max_j |\theta_j|),

    so each is within ``tol`` relative of an eigenvalue of :math:`H` (the floor keeps an
    eigenvalue near 0 from asking for an unreachable relative accuracy). Stopping needs
    :math:`m > k` products. A breakdown (invariant Krylov space) stops with exact Ritz values.

    The start: a random Rademacher vector, plus the sum of the warm-start vectors ``init``
    (e.g. the previous call's ``eigenvectors``) when given, with the random part kept at the
    weight of one of them, so that an eigenvalue that has overtaken the previous top :math:`k`
    is still reached (a start inside an invariant subspace would never leave it).

    Args:
        matvec: :math:`v \mapsto Hv` on flat vectors in ``layout``.
        layout: the flat vectors' layout.
        k: how many eigenvalues (``>= 1``).
        init: warm-start vectors (flat), or ``None``.
        max_iters: most products (``> k``), also the most basis vectors kept.
        tol: relative residual tolerance (``> 0``).
        generator: source of the random start (default: a fresh one seeded with 0).
        warn: issue a :class:`~lightning_bn.diagnostics.eigen.ConvergenceWarning` when the
            tolerance was not met within ``max_iters``.
        basis_size: ``None`` (default): one Lanczos run keeping up to ``max_iters`` vectors.
            An int (``>= 4``): bounded memory, one eigenvalue at a time, each by
            :func:`~lightning_bn.diagnostics.restart.deflated_top` (thick restarts in
            ``basis_size`` vectors, projected off the eigenvectors already found; a fresh start
            each, the same ``init``), to the same residual rule; ``max_iters`` counts the
            products of all :math:`k`. Memory: ``basis_size`` + :math:`k` vectors; ``run`` is
            then ``None`` (deflate the trace by ``eigenvectors``). ``0``: each eigenvalue by
            :func:`~lightning_bn.diagnostics.restart.two_pass_top` (no basis; :math:`k` + 3, or
            :math:`k` + 2 with an :class:`~lightning_bn.diagnostics.krylov.AddMatvec`).
        store: with ``basis_size``, keep the eigenvectors found rounded to this dtype (e.g.
            bfloat16: half a copy each; ``eigenvectors`` in it; each later eigenvalue is then
            that of :math:`H` off the rounded vectors' span, exactly projected).

    Returns:
        :class:`TopEigResult` (with fewer than :math:`k` values if :math:`H` has fewer
        dimensions, or the run broke down earlier).
    """
    check_int("k", k, minimum=1)
    check_int("max_iters", max_iters, minimum=k + 1)
    tol = check_float("tol", tol, minimum=0)
    if basis_size is not None:
        check_basis_size("basis_size", basis_size)
        return _top_deflated(
            matvec, layout, k, init, max_iters, tol, generator, warn, basis_size, store
        )
    q = _start(layout, generator, init)

    def converged(run: LanczosRun) -> bool:
        if run.steps <= k:
            return False
        values, vectors = run.eigh()
        return bool(_residual_ok(values, vectors, run.beta, k, tol).all())

    run = lanczos(matvec, q, max_iters, converged)
    if not run.finite:
        if warn:
            warn_unconverged(f"top_eigenvalues (k={k}, a product was not finite)", run.steps)
        return TopEigResult([math.nan] * k, [math.nan] * k, [], run.steps, False, run)
    values, vectors = run.eigh()
    top = min(k, run.steps)
    order = torch.arange(run.steps - 1, run.steps - 1 - top, -1)
    eigenvalues = [float(values[i]) + 0.0 for i in order]
    residuals = [run.beta * abs(float(vectors[-1, i])) for i in order]
    ritz = [_unit(run.basis.combine(vectors[:, i])) for i in order]
    ok = run.breakdown or bool(_residual_ok(values, vectors, run.beta, k, tol).all())
    if warn and not ok:
        warn_unconverged(f"top_eigenvalues (k={k})", run.steps)
    return TopEigResult(eigenvalues, residuals, ritz, run.steps, ok, run)


def _top_deflated(
    matvec: Matvec,
    layout: FlatLayout,
    k: int,
    init: Sequence[Tensor] | None,
    max_iters: int,
    tol: float,
    generator: torch.Generator | None,
    warn: bool,
    basis_size: int,
    store: torch.dtype | None,
) -> TopEigResult:
    """:func:`top_eigenvalues` in ``basis_size`` vectors, one eigenvalue at a time."""
    start = lambda: _start(layout, generator, init)  # noqa: E731
    pairs, used, ok = deflated_top(matvec, start, k, max_iters, tol, basis_size, store)
    if warn and not ok:
        warn_unconverged(f"top_eigenvalues (k={k})", used)
    if any(not p.finite for p in pairs):
        return TopEigResult([math.nan] * k, [math.nan] * k, [], used, False)
    vectors = [p.vector for p in pairs if p.vector is not None]
    return TopEigResult([p.value for p in pairs], [p.residual for p in pairs], vectors, used, ok)


def _residual_ok(values: Tensor, vectors: Tensor, beta: float, k: int, tol: float) -> Tensor:
    top = values[-k:]
    floor = 1e-3 * float(values.abs().max())
    bound = tol * torch.clamp(top.abs(), min=floor)
    return beta * vectors[-1, -k:].abs() <= bound


def _unit(v: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(v)
    return v / norm if float(norm) > 0 else v


# --- trace -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceResult:
    r"""Result of :func:`hutchinson_trace`.

    Attributes:
        trace: the estimate of :math:`\mathrm{tr}(H)`.
        stderr: its standard error (sample standard deviation of the per-probe estimates over
            :math:`\sqrt{N}`).
        samples: probes taken (one Hessian-vector product each).
        converged: whether ``stderr <= rtol * |trace|`` was reached within ``max_samples``.
        blocks: per block, ``(trace, stderr)`` of :math:`\mathrm{tr}(H_{bb})`.
    """

    trace: float
    stderr: float
    samples: int
    converged: bool
    blocks: dict[str, tuple[float, float]]


def hutchinson_trace(
    matvec: Matvec,
    layout: FlatLayout,
    *,
    rtol: float = 1e-2,
    min_samples: int = 10,
    max_samples: int = 200,
    generator: torch.Generator | None = None,
    deflate: LanczosRun | Sequence[Tensor] | None = None,
    blocks: Mapping[str, Block] | None = None,
    warn: bool = True,
) -> TraceResult:
    r"""Hutchinson's trace estimate with Rademacher probes, deflated by a Lanczos basis.

    With an orthonormal :math:`Q` (a Lanczos basis, ``deflate``; :math:`P = QQ^\top`), exactly

    .. math::
        \mathrm{tr}(H) = \mathrm{tr}(Q^\top H Q) + \mathrm{tr}\big((I-P) H (I-P)\big),
        \qquad \mathrm{tr}(Q^\top H Q) = \mathrm{tr}(T_m) = \textstyle\sum_i \alpha_i,

    and the second term is estimated by :math:`w^\top H w`, :math:`w = (I-P)z`, :math:`z` with
    independent :math:`\pm 1` entries (unbiased; variance
    :math:`2\lVert\mathrm{offdiag}((I-P)H(I-P))\rVert_F^2`, which the top eigen-directions no
    longer dominate: Hutch++'s idea with the basis Lanczos already built). Without ``deflate``,
    plain Hutchinson :math:`z^\top H z`. Stops after at least ``min_samples`` probes once the
    standard error is at most ``rtol`` × the estimate's magnitude, or after ``max_samples``.

    Blocks (``blocks``: name → flat indices of the block's entries, disjoint) get
    :math:`\mathrm{tr}(H_{bb})` from the same products: with :math:`E_b` the restriction,

    .. math::
        \mathrm{tr}(E_b H E_b^\top) = \mathrm{tr}(T_m G_b)
        + 2\beta_m \langle E_b q_m, E_b q_{m+1}\rangle
        + \mathbb{E}\,\langle E_b w, E_b H w\rangle, \qquad G_b = Q^\top E_b^\top E_b Q,

    using the Lanczos relation :math:`HQ = QT + \beta_m q_{m+1} e_m^\top` (the two exact terms
    sum to :math:`\mathrm{tr}(T_m)` over a partition).

    ``deflate`` may instead be nearly orthonormal vectors :math:`Y`, in any dtype (e.g.
    ``top_eigenvalues(...).eigenvectors``): :math:`P` is then the exact projector onto their span
    (:class:`~lightning_bn.diagnostics.span.Span`), the exact part :math:`\mathrm{tr}(PHP)` takes
    :math:`k` more products (:func:`~lightning_bn.diagnostics.span.deflated_exact_trace`), and the
    memory is :math:`k` vectors (in their dtype) instead of a whole Lanczos basis.

    Args:
        matvec: :math:`v \mapsto Hv` on flat vectors in ``layout``.
        layout: the flat vectors' layout.
        rtol: the standard error that stops the sampling, relative to the estimate.
        min_samples: fewest probes (the standard error of fewer is itself too noisy to stop on).
        max_samples: most probes (one product each).
        generator: source of the probes (default: a fresh one seeded with 0).
        deflate: a Lanczos run on the same operator (``top_eigenvalues(...).run``), or vectors.
        blocks: name → flat indices of a diagonal block, for per-block traces.
        warn: issue a :class:`~lightning_bn.diagnostics.eigen.ConvergenceWarning` when
            ``max_samples`` was reached first.

    Returns:
        :class:`TraceResult`.
    """
    rtol = check_float("rtol", rtol, minimum=0)
    check_int("min_samples", min_samples, minimum=2)
    check_int("max_samples", max_samples, minimum=min_samples)
    blocks, generator = dict(blocks or {}), generator or torch.Generator().manual_seed(0)
    exact, exact_blocks = 0.0, dict.fromkeys(blocks, 0.0)
    views: list[Tensor] = []
    span: Span | None = None
    if isinstance(deflate, Sequence):
        span = Span(deflate, work=layout.dtype)
        exact, exact_blocks = deflated_exact_trace(matvec, span, blocks)
    elif deflate is not None and deflate.steps:
        views = list(deflate.basis._views)  # the used rows of the basis blocks
        tri = deflate.tri.matrix()
        exact = float(torch.diagonal(tri).sum())
        q_m, q_next = views[-1][-1], deflate.residual
        for name, idx in blocks.items():
            rows = torch.cat([v[:, idx] for v in views])  # (m, |b|)
            gram = (rows @ rows.T).to(torch.float64).cpu()
            tri_full = tri + torch.tril(tri, -1).T
            cross = 2.0 * deflate.beta * float(torch.dot(q_m[idx], q_next[idx]))
            exact_blocks[name] = float((tri_full * gram).sum()) + cross
    samples: list[Tensor] = []
    for n in range(1, max_samples + 1):
        z = _rademacher(layout.numel, layout, generator)
        if span is not None:
            span.project_off(z)
        elif views:
            for v in views:
                z.addmv_(v.T, v @ z, alpha=-1.0)
        hz = matvec(z)
        with torch.no_grad():
            parts = [_dot(z, hz)] + [_dot(z[idx], hz[idx]) for idx in blocks.values()]
            samples.append(torch.tensor(parts, dtype=torch.float64))
        del z, hz
        if n >= min_samples:
            first = torch.stack([t[0] for t in samples])
            total = exact + float(first.mean())
            total_err = float(first.std()) / math.sqrt(n)
            if not math.isfinite(total) or total_err <= rtol * abs(total):
                break
    stacked = torch.stack(samples)
    mean: list[float] = stacked.mean(0).tolist()
    err: list[float] = (stacked.std(0) / math.sqrt(len(samples))).tolist()
    total, total_err = exact + mean[0], err[0]
    per_block = {
        name: (exact_blocks[name] + mean[i + 1], err[i + 1]) for i, name in enumerate(blocks)
    }
    ok = math.isfinite(total) and total_err <= rtol * abs(total)
    if warn and not ok:
        warn_unconverged("hutchinson_trace (standard error above `rtol`)", len(samples))
    return TraceResult(total, total_err, len(samples), ok, per_block)


# --- blocks ----------------------------------------------------------------------------------
def block_indices(layout: FlatLayout, groups: Mapping[str, Sequence[str]]) -> dict[str, Block]:
    """The flat entries of each group of parameter names: a ``slice`` when they are contiguous
    (a layer's parameters usually are; no memory), else their indices (int64, on the layout's
    device)."""
    offsets: dict[str, tuple[int, int]] = {}
    start = 0
    for key, n in zip(layout.keys, layout.numels, strict=True):
        offsets[key] = (start, start + n)
        start += n
    out: dict[str, Block] = {}
    for name, keys in groups.items():
        spans = [offsets[k] for k in keys if k in offsets]
        if not spans:
            continue
        ordered = sorted(spans)
        if all(a[1] == b[0] for a, b in itertools.pairwise(ordered)):
            out[name] = slice(ordered[0][0], ordered[-1][1])
        else:
            out[name] = torch.cat([torch.arange(*span) for span in spans]).to(layout.device)
    return out


def block_top_eigenvalues(
    matvec: Matvec,
    layout: FlatLayout,
    blocks: Mapping[str, Block],
    init: Mapping[str, Tensor] | None = None,
    *,
    max_iters: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    warn: bool = True,
    basis_size: int | None = None,
) -> dict[str, TopEigResult]:
    r"""The largest eigenvalue of each diagonal block :math:`H_{bb} = E_b H E_b^\top`.

    One :func:`top_eigenvalues` run (``k=1``) per block on
    :math:`v_b \mapsto E_b H E_b^\top v_b` (a full Hessian-vector product of the vector that is
    :math:`v_b` on the block and 0 elsewhere, restricted to the block): a block's products cost
    as much as full ones, so :math:`L` blocks cost about :math:`L` times one top eigenvalue (each
    on a smaller, usually better separated spectrum). ``init``: name → the previous call's
    eigenvector of that block (flat, block-sized); ``basis_size`` as in :func:`top_eigenvalues`.
    """
    out: dict[str, TopEigResult] = {}
    for name, idx in blocks.items():
        size = block_numel(idx)
        sub = _SubLayout(layout, size)

        def restricted(v: Tensor, idx: Block = idx) -> Tensor:
            full = torch.zeros(layout.numel, dtype=v.dtype, device=v.device)
            full[idx] = v
            hv = matvec(full)
            del full
            return hv[idx].clone() if isinstance(idx, slice) else hv[idx]

        start = None if init is None or name not in init else [init[name]]
        iters = max_iters if basis_size is not None else min(max_iters, max(2, size + 1))
        out[name] = top_eigenvalues(
            restricted, sub, 1, start, max_iters=iters, tol=tol, generator=generator, warn=False,
            basis_size=basis_size,
        )  # fmt: skip
        if warn and not out[name].converged:
            warn_unconverged(f"block_top_eigenvalues (block {name!r})", out[name].iterations)
    return out
