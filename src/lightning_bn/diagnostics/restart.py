r"""Lanczos in bounded memory: the top eigenvalue by thick restarts or by two passes of the
three-term recurrence, deflated by the eigenvectors already found. Plain torch.

:func:`restarted_top` keeps at most ``capacity`` basis vectors whatever the number of products:
a cycle that fills the basis without meeting the tolerance restarts from the Ritz vectors of the
``keep`` largest Ritz values and the last residual direction (thick restart, Wu & Simon 2000;
the relation :math:`HQ = QG + \beta q e^\top` holds across restarts with :math:`G` an arrowhead
plus tridiagonal matrix, so the residual of a Ritz pair is still :math:`\beta |s_{\mathrm{last}}|`).
Every product is also projected off ``locked`` orthonormal vectors (eigenvectors found before),
so the run sees :math:`H` on their orthogonal complement: the top-:math:`k` eigenvalues one at a
time (PyHessian's deflation), each to the same residual tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_bn._validation import check_int
from lightning_bn.diagnostics.krylov import Basis, Tridiagonal, recurrence_product
from lightning_bn.diagnostics.paramvec import FlatLayout
from lightning_bn.diagnostics.span import Span, _dot

__all__ = [
    "Block",
    "RitzPair",
    "RitzRule",
    "block_numel",
    "check_basis_size",
    "deflated_top",
    "dominant_rule",
    "restarted_top",
    "settled",
    "top_rule",
    "two_pass_top",
]

#: Chooses :func:`two_pass_top`'s Ritz pair and when it stops:
#: ``(ritz_values, ritz_vectors, beta, steps) -> (value, coefficients, stop)``.
RitzRule = Callable[[Tensor, Tensor, float, int], tuple[float, Tensor, bool]]

#: The flat entries of a diagonal block: a slice, or int64 indices.
Block = Tensor | slice

#: A new residual of norm <= this × eps × max ‖Hq_j‖ spans nothing new (as in ``eigen``).
_BREAKDOWN = 100.0


@dataclass(frozen=True)
class RitzPair:
    """The top Ritz pair of a run: value, residual norm, unit vector (``None`` when the start
    had nothing left outside ``locked``), products taken, whether the residual met the
    tolerance (or the Krylov space became invariant), whether every product was finite."""

    value: float
    residual: float
    vector: Tensor | None
    steps: int
    converged: bool
    finite: bool = True


def _project(w: Tensor, locked: Sequence[Tensor]) -> None:
    if isinstance(locked, Span):  # stored narrower: its exact projector
        locked.project_off(w)
        return
    for y in locked:
        w.addcmul_(y, torch.dot(y, w), value=-1.0)


def top_rule(tol: float, floor: float = 0.0) -> RitzRule:
    r"""The residual rule of :func:`restarted_top` and :func:`two_pass_top`: the largest Ritz
    value; stop after at least 2 products once its residual :math:`\beta |s_{\mathrm{last}}|` is
    at most :math:`\mathrm{tol}\cdot\max(|\theta|, \mathrm{floor}, 10^{-3}\max_j|\theta_j|)`."""

    def rule(theta: Tensor, vectors: Tensor, beta: float, steps: int) -> tuple[float, Tensor, bool]:
        s, top = vectors[:, -1], float(theta[-1])
        bound = tol * max(abs(top), floor, 1e-3 * float(theta.abs().max()))
        return top, s, steps >= 2 and beta * abs(float(s[-1])) <= bound

    return rule


def restarted_top(
    matvec: Callable[[Tensor], Tensor],
    q: Tensor,
    *,
    capacity: int,
    max_steps: int,
    tol: float,
    locked: Sequence[Tensor] = (),
    keep: int = 2,
    floor: float = 0.0,
) -> RitzPair:
    r"""The largest eigenvalue of :math:`H` on the orthogonal complement of ``locked``.

    Lanczos with full reorthogonalisation (two classical Gram-Schmidt passes against the basis,
    one against ``locked``) from ``q`` (projected off ``locked`` and normalised here; not
    modified), at most ``capacity`` (``>= keep + 2``) basis vectors and ``max_steps`` products.
    Stops after at least 2 products once the top Ritz pair's residual is at most
    :math:`\mathrm{tol}\cdot\max(|\theta|, \mathrm{floor}, 10^{-3}\max_j|\theta_j|)`, or on an
    invariant subspace (exact). Memory: ``capacity`` vectors, the product, and one more vector
    while restarting (the basis is rotated in place).
    """
    eps, rule = torch.finfo(q.dtype).eps, top_rule(tol, floor)
    basis = Basis(q.numel(), capacity, q.dtype, q.device)
    start = basis.append(q)
    q_norm = float(torch.linalg.vector_norm(q))
    del q  # copied into the basis: freed here unless the caller keeps it
    _project(start, locked)
    norm = float(torch.linalg.vector_norm(start))
    if not norm > 1e-6 * q_norm:
        return RitzPair(math.nan, math.nan, None, 0, True)
    start.div_(norm)
    g = torch.zeros(capacity, capacity, dtype=torch.float64)
    p, steps, scale = 0, 0, 0.0
    while True:
        w = matvec(basis.row(p))
        with torch.no_grad():
            hq_norm = torch.linalg.vector_norm(w)
            coeffs = basis.project_out(w)
            coeffs = coeffs + basis.project_out(w)  # twice is enough
            _project(w, locked)
            stats = torch.cat([coeffs, torch.stack([hq_norm, torch.linalg.vector_norm(w)])])
        values = stats.to(device="cpu", dtype=torch.float64)
        steps += 1
        if not bool(torch.isfinite(values).all()):
            return RitzPair(math.nan, math.nan, None, steps, False, False)
        c, beta = values[: p + 1], float(values[-1])
        scale = max(scale, float(values[-2]))
        g[: p + 1, p], g[p, : p + 1] = c, c
        p += 1
        theta, s = torch.linalg.eigh(g[:p, :p])
        breakdown = beta <= _BREAKDOWN * eps * scale
        top, coeffs, stop = rule(theta, s, beta, steps)
        residual = 0.0 if breakdown else beta * abs(float(coeffs[-1]))
        ok = breakdown or stop
        if ok or steps >= max_steps:
            vector = basis.combine(coeffs)
            for _ in range(2):  # orthonormal to working precision, whatever the size
                _project(vector, locked)
                vector.div_(math.sqrt(_dot(vector, vector)))
            return RitzPair(top + 0.0, residual, vector, steps, ok)
        if basis.size < capacity:
            basis.append(w, beta)
            g[p, p - 1] = g[p - 1, p] = beta
            continue
        # thick restart: the `keep` top Ritz vectors, then the residual direction
        kept = min(keep, p)
        _rotate(basis, s.flip(1))  # rows 0.. become the Ritz vectors, largest value first
        basis.reset()
        for _ in range(kept):
            basis.append()
        basis.append(w, beta)
        couple = beta * s[-1, p - kept :].flip(0)
        g.zero_()
        g[:kept, :kept] = torch.diag(theta[p - kept :].flip(0))
        g[kept, :kept], g[:kept, kept] = couple, couple
        p = kept


def two_pass_top(
    matvec: Callable[[Tensor], Tensor],
    q: Tensor,
    *,
    max_steps: int,
    tol: float,
    locked: Sequence[Tensor] = (),
    floor: float = 0.0,
    rule: RitzRule | None = None,
) -> RitzPair:
    r"""The largest eigenvalue of :math:`H` on the orthogonal complement of ``locked``, keeping
    no basis: Lanczos by its three-term recurrence, twice.

    Pass 1 runs the recurrence from ``q`` (projected off ``locked`` and normalised; every
    product is projected off ``locked`` too), builds :math:`T_m` and stops, after at least 2
    products, once the top Ritz pair's residual :math:`\beta_m |s_{m}|` is at most
    :math:`\mathrm{tol}\cdot\max(|\theta|, \mathrm{floor}, 10^{-3}\max_j|\theta_j|)` (or on an
    invariant subspace, or once it has taken as many steps as the complement of ``locked`` has
    dimensions, where the Krylov space is the whole of it, or after ``max_steps`` products).
    Without reorthogonalisation the basis loses orthogonality only along converged Ritz
    vectors, which adds copies of converged values to :math:`T_m` but leaves the top Ritz value
    and its residual estimate valid (Paige 1976); stopping at convergence keeps those copies
    out. Pass 2 reruns the recurrence from the same
    start with pass 1's coefficients and sums the Ritz vector :math:`\sum_j s_j q_j` as the
    :math:`q_j` come back: :math:`2m - 1` products in all.

    ``rule`` (``None``: the residual rule above, :func:`top_rule`) chooses another Ritz pair and stopping rule:
    called after every product of pass 1 with the Ritz values of :math:`T_m` (ascending), their
    eigenvectors, :math:`\beta_m` and the products taken, it returns the chosen value, its
    eigenvector's coefficients :math:`s` and whether to stop (an invariant subspace, or
    ``max_steps``, stops anyway).

    Memory: four vectors (the start, kept through pass 1, whose memory then holds the Ritz
    vector's sum in pass 2; the last two Lanczos vectors; the product), besides ``locked``;
    three with a :class:`~lightning_bn.diagnostics.krylov.AddMatvec`, which adds each product
    into :math:`-\beta q_{j-1}` in :math:`q_{j-1}`'s memory
    (:func:`~lightning_bn.diagnostics.krylov.recurrence_product`).
    ``q`` is consumed: its memory becomes the first Lanczos vector, then the returned Ritz
    vector.
    """
    eps = torch.finfo(q.dtype).eps
    with torch.no_grad():
        before = float(torch.linalg.vector_norm(q))
        _project(q, locked)
        q_norm = float(torch.linalg.vector_norm(q))
    if not q_norm > 1e-6 * before:  # nothing left outside ``locked``
        return RitzPair(math.nan, math.nan, None, 0, True)
    q1 = q.div_(q_norm)
    dim = q1.numel() - len(locked)  # the Krylov space spans at most the complement of `locked`
    del q
    rule = rule if rule is not None else top_rule(tol, floor)
    tri = Tridiagonal(max_steps)
    steps, scale, beta = 0, 0.0, 0.0
    prev: Tensor | None = None
    cur = q1
    while True:
        w, hq_norm = recurrence_product(matvec, cur, prev, beta, prev is not q1)
        with torch.no_grad():
            alpha = _dot(cur, w)  # summed in float64, as pass 2 reuses it
            w.sub_(cur, alpha=alpha)
            _project(w, locked)
            stats = torch.stack([hq_norm, torch.linalg.vector_norm(w)])
        values = stats.to(device="cpu", dtype=torch.float64)
        steps += 1
        if not (math.isfinite(alpha) and bool(torch.isfinite(values).all())):
            return RitzPair(math.nan, math.nan, None, steps, False, False)
        tri.append(alpha, beta)
        beta = float(values[1])
        scale = max(scale, float(values[0]))
        theta, vectors = torch.linalg.eigh(tri.matrix())
        breakdown = beta <= _BREAKDOWN * eps * scale or steps >= dim
        top, s, stop = rule(theta, vectors, beta, steps)
        residual = 0.0 if breakdown else beta * abs(float(s[-1]))
        ok = breakdown or stop
        if ok or steps >= max_steps:
            break
        prev, cur = cur, w.div_(beta)
    del w  # pass 2: the same recurrence from q1, summing the Ritz vector into q1's memory
    t = tri.matrix()
    alphas, betas = t.diagonal().tolist(), t.diagonal(-1).tolist()
    prev, cur = None, q1
    del q1
    ritz: Tensor | None = None
    for j in range(1, len(alphas)):
        w = recurrence_product(matvec, cur, prev, betas[j - 2], ritz is not None)[0]
        with torch.no_grad():
            w.sub_(cur, alpha=alphas[j - 1])
            _project(w, locked)
            w.div_(betas[j - 1])
            if ritz is None and prev is not None:  # q1 (prev) is spent: the sum starts there
                ritz = prev.mul_(float(s[0])).add_(cur, alpha=float(s[1]))
            if ritz is not None:
                ritz.add_(w, alpha=float(s[j]))
        prev, cur = cur, w
        steps += 1
    if ritz is None:  # one or two Lanczos vectors: q1 in prev (or cur), q2 in cur
        ritz = cur.mul_(float(s[0])) if prev is None else prev.mul_(float(s[0]))
        if prev is not None:
            ritz.add_(cur, alpha=float(s[1]))
    del prev, cur
    with torch.no_grad():
        for _ in range(2):  # orthonormal to working precision, whatever the size
            _project(ritz, locked)
            ritz.div_(math.sqrt(_dot(ritz, ritz)))
    return RitzPair(top + 0.0, residual, ritz, steps, ok)


#: How many more steps at its last rate the other end of the Ritz spectrum is given to overtake
#: the dominant one before the iteration may stop (see :func:`settled`).
_OVERTAKE_STEPS = 10.0


def settled(
    low: float, high: float, theta: float, previous: tuple[float, float], tol: float
) -> bool:
    """:func:`~lightning_bn.diagnostics.eigen.top_hessian_eigenvalue`'s stopping rule: the dominant end moved by at most ``tol · |θ|`` in the last step,
    and the other end either did too or is too far below ``|θ|`` to overtake it within
    :data:`_OVERTAKE_STEPS` more steps at its last rate of change.

    Checking the dominant end alone is not enough: a negative end that leads early can stop the
    iteration while the positive end, still growing, ends up the larger (seen on a BatchNorm MLP:
    -8.22 returned where the dominant eigenvalue is +8.97). Requiring both ends to settle to
    ``tol · |θ|`` instead would wait for the far end (often a slowly converging cluster of small
    eigenvalues) for many more products.
    """
    change_low, change_high = abs(low - previous[0]), abs(high - previous[1])
    if theta == low:
        change, other, other_change = change_low, high, change_high
    else:
        change, other, other_change = change_high, low, change_low
    bound = tol * abs(theta)
    if change > bound:
        return False
    return other_change <= bound or abs(other) + _OVERTAKE_STEPS * other_change < abs(theta)


def dominant_rule(tol: float) -> RitzRule:
    r""":func:`two_pass_top`'s rule for the Ritz value of largest magnitude (the positive one in a
    tie), stopping by :func:`settled`, its vector's sign such that :math:`q_1^\top Q s \ge 0`:
    the value, rule and vector of
    :func:`~lightning_bn.diagnostics.eigen.top_hessian_eigenvalue`'s Lanczos."""
    previous: list[tuple[float, float]] = []

    def rule(theta: Tensor, vectors: Tensor, beta: float, steps: int) -> tuple[float, Tensor, bool]:
        low, high = float(theta[0]), float(theta[-1])
        end = 0 if -low > high else -1
        value = (low if end == 0 else high) + 0.0
        s = vectors[:, end]
        s = -s if float(s[0]) < 0 else s
        stop = bool(previous) and settled(low, high, value, previous[-1], tol)
        previous.append((low, high))
        return value, s, stop

    return rule


def _rotate(basis: Basis, u: Tensor) -> None:
    r"""Rows :math:`Q \leftarrow U^\top Q` in place (``u`` orthogonal, float64), by the
    Householder reflections of :math:`U^\top = H_1 \cdots H_m D` (``geqrf``): one vector of
    work memory instead of a copy of the rows."""
    m = u.shape[0]
    a, tau = torch.geqrf(u.T.contiguous())
    rows = [basis.row(i) for i in range(m)]
    for i in range(m):
        if float(a[i, i]) < 0:
            rows[i].neg_()
    work = torch.empty_like(rows[0])
    for i in reversed(range(m)):  # H_1 (H_2 (... (H_m D Q)))
        v = torch.zeros(m, dtype=torch.float64)
        v[i], v[i + 1 :] = 1.0, a[i + 1 :, i]
        basis.combine(v, out=work)  # vᵀ Q
        for j in range(i, m):
            rows[j].sub_(work, alpha=float(tau[i] * v[j]))


def deflated_top(
    matvec: Callable[[Tensor], Tensor],
    start: Callable[[], Tensor],
    k: int,
    max_iters: int,
    tol: float,
    capacity: int,
    store: torch.dtype | None = None,
) -> tuple[list[RitzPair], int, bool]:
    """The top ``k`` Ritz pairs one at a time, each by :func:`restarted_top` (keeping half its
    ``capacity`` at a restart; ``capacity=0``: by :func:`two_pass_top`, no basis) from a fresh
    ``start()`` projected off the ones found before (the later ones' tolerance floor is
    1e-3 × the first's magnitude), ``max_iters`` products in all. Returns the pairs (fewer
    when the space runs out; the last not finite when a product was not), the products taken,
    and whether every pair converged within them. ``store``: keep each vector found rounded to
    this dtype (a :class:`~lightning_bn.diagnostics.span.Span`; the later pairs are those of
    :math:`H` off the rounded vectors' span), as the pairs return them."""
    pairs: list[RitzPair] = []
    used, ok, floor = 0, True, 0.0
    span = Span(dtype=store) if store is not None else None
    for _ in range(k):
        if max_iters - used < 2:
            return pairs, used, False
        found = span if span is not None else [p.vector for p in pairs if p.vector is not None]
        if capacity:
            pair = restarted_top(
                matvec, start(), capacity=capacity, max_steps=max_iters - used, tol=tol,
                locked=found, keep=capacity // 2, floor=floor,
            )  # fmt: skip
        else:  # pass 1 may take half the products left, pass 2 one fewer
            steps = (max_iters - used + 1) // 2
            pair = two_pass_top(
                matvec, start(), max_steps=steps, tol=tol, locked=found, floor=floor
            )
        used += pair.steps
        if pair.vector is None and pair.finite:  # nothing left: H has fewer dimensions
            break
        if span is not None and pair.vector is not None and pair.finite:
            span.append(pair.vector)  # the full-precision vector is freed with the old pair
            pair = replace(pair, vector=span[-1])
        pairs.append(pair)
        ok = ok and pair.converged
        if not pair.finite:
            break
        floor = floor or 1e-3 * abs(pair.value)
    return pairs, used, ok


def check_basis_size(name: str, value: int, minimum: int = 4) -> int:
    """Return ``value`` if it is 0 or an int ``>= minimum`` (a Lanczos basis size).

    Raises:
        ValueError, TypeError: another value (named).
    """
    check_int(name, value, minimum=0)
    if 0 < value < minimum:
        raise ValueError(
            f"Expected argument `{name}` to be 0 or an integer >= {minimum}, but got {value}"
        )
    return value


def _rademacher(n: int, layout: FlatLayout, generator: torch.Generator | None) -> Tensor:
    """``n`` independent ±1 in the layout's dtype, drawn in it (no int64 copy: the same draws)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    dtype = layout.dtype if gen.device == torch.device(layout.device) else torch.float32
    signs = torch.randint(0, 2, (n,), generator=gen, device=gen.device, dtype=dtype)
    return signs.mul_(2).sub_(1).to(dtype=layout.dtype, device=layout.device)


def _start(
    layout: FlatLayout, generator: torch.Generator | None, init: Sequence[Tensor] | None
) -> Tensor:
    q = _rademacher(layout.numel, layout, generator).div_(math.sqrt(layout.numel))
    for v in init or ():
        if v.numel() != layout.numel or not bool(torch.isfinite(v).all()):
            continue
        norm = float(torch.linalg.vector_norm(v, dtype=torch.float64))
        if norm > 0:  # added in place, converted a block at a time (v may be narrower)
            for i in range(0, q.numel(), 1 << 20):
                part = v.reshape(-1)[i : i + (1 << 20)]
                q[i : i + part.numel()].add_(part.to(q), alpha=1.0 / norm)
    return q.div_(float(torch.linalg.vector_norm(q)))


def block_numel(block: Block) -> int:
    """How many entries a block of :func:`block_indices` has."""
    if isinstance(block, slice):
        return int(block.stop) - int(block.start)
    return block.numel()


class _SubLayout(FlatLayout):
    """The layout of a block: ``numel`` entries in the parent's dtype and device."""

    def __init__(self, parent: FlatLayout, numel: int) -> None:
        super().__init__({})
        self.dtype, self.device = parent.dtype, parent.device
        self._numel = numel

    @property
    def numel(self) -> int:
        return self._numel
