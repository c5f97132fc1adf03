r"""The dominant Hessian eigenvalue from Hessian-vector products: power iteration and Lanczos.

Works on any linear map :math:`v \mapsto Hv` of parameter dicts (e.g. a
:class:`~lightning_bn.diagnostics.hvp.HessianVectorProduct`), so it never evaluates a model itself.
Power iteration keeps two vectors; Lanczos with full reorthogonalisation (:class:`_Basis` holds its
orthonormal vectors) reaches the same tolerance in fewer products at the memory of one stored
vector per product. Plain torch.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_bn._validation import check_choice, check_float, check_int
from lightning_bn.diagnostics.hvp import FlatOperator, HessianVectorProduct
from lightning_bn.diagnostics.krylov import Basis as _Basis
from lightning_bn.diagnostics.krylov import Tridiagonal as _Tridiagonal
from lightning_bn.diagnostics.paramvec import FlatLayout, TensorDict
from lightning_bn.diagnostics.restart import check_basis_size, dominant_rule, two_pass_top
from lightning_bn.diagnostics.restart import settled as _settled

__all__ = ["ConvergenceWarning", "EigAlgorithm", "EigResult", "top_hessian_eigenvalue"]

#: How :func:`top_hessian_eigenvalue` iterates.
EigAlgorithm = Literal["power", "lanczos"]
_ALGORITHMS = ("power", "lanczos")
#: Lanczos breakdown: a new residual of norm <= this × eps × max ‖Hq_j‖ spans nothing new.
_BREAKDOWN = 100.0


class ConvergenceWarning(UserWarning):
    """An iterative estimate stopped at its iteration cap before meeting its tolerance: the value
    returned is the last iterate, not a converged answer."""


def warn_unconverged(what: str, iterations: int, stacklevel: int = 3) -> None:
    """Warn (:class:`ConvergenceWarning`) that ``what`` did not converge in ``iterations``."""
    warnings.warn(
        f"{what} did not converge within {iterations} Hessian-vector products; the value is the"
        " last iterate (raise `max_iters`, loosen `tol`, or check the result's `converged`)",
        ConvergenceWarning,
        stacklevel=stacklevel,
    )


@dataclass(frozen=True)
class EigResult:
    r"""Result of :func:`top_hessian_eigenvalue`.

    Attributes:
        eigenvalue: the estimate of the dominant (largest-magnitude) eigenvalue, signed: with
            ``"power"`` the Rayleigh quotient :math:`v^\top H v` of the last iterate, with
            ``"lanczos"`` the Ritz value of largest magnitude (``nan`` if a product was not
            finite).
        eigenvector: a unit vector approximating its eigenvector; pass it as ``init`` to
            warm-start the next call. With ``"power"``: :math:`Hv / \lVert Hv \rVert` from the last
            product (one power step past the Rayleigh quotient); with ``"lanczos"``: the Ritz
            vector :math:`Q_m s` of the returned Ritz value (a fresh tensor, not a view of the
            Lanczos basis).
        iterations: Hessian-vector products taken.
        converged: whether the stopping rule was met (or, for Lanczos, an invariant subspace was
            found) within ``max_iters``.
    """

    eigenvalue: float
    eigenvector: TensorDict
    iterations: int
    converged: bool


def top_hessian_eigenvalue(
    hvp_fn: Callable[[TensorDict], TensorDict],
    init: Mapping[str, Tensor] | None,
    *,
    max_iters: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    like: Mapping[str, Tensor] | None = None,
    algorithm: EigAlgorithm = "lanczos",
    warn: bool = True,
    basis_size: int | None = None,
    reuse_init: bool = False,
) -> EigResult:
    r"""Dominant Hessian eigenvalue from Hessian-vector products (Lanczos or power iteration).

    The default, Lanczos, is the algorithm of every callback of this package (one default
    everywhere). A result that did not converge within ``max_iters`` products says so: its
    ``converged`` is ``False`` and, with ``warn`` (default), a :class:`ConvergenceWarning` is
    issued.

    **Power iteration** (``algorithm="power"``):

    .. math::
        v_0 = \frac{u}{\lVert u \rVert}, \qquad
        \lambda_k = v_{k-1}^\top H v_{k-1}, \qquad
        v_k = \frac{H v_{k-1}}{\lVert H v_{k-1} \rVert},

    stopping at the first :math:`k \ge 2` with
    :math:`|\lambda_k - \lambda_{k-1}| \le \mathrm{tol} \cdot |\lambda_k|`.

    **Lanczos** (``algorithm="lanczos"``, the default) with full reorthogonalisation: from
    :math:`q_1 = u / \lVert u \rVert`, product :math:`k` is :math:`H q_k`, then

    .. math::
        \alpha_k = q_k^\top H q_k, \qquad
        r_k = (I - Q_k Q_k^\top)\,(H q_k - \alpha_k q_k - \beta_{k-1} q_{k-1}), \qquad
        \beta_k = \lVert r_k \rVert, \qquad q_{k+1} = r_k / \beta_k,

    with :math:`Q_k = [q_1, \dots, q_k]`: the three-term recurrence, then one classical
    Gram-Schmidt pass against the whole basis (the recurrence acts as the first pass of "twice is
    enough"), so the basis stays orthonormal to working precision and no spurious copies of
    converged eigenvalues appear. :math:`Q_k^\top H Q_k = T_k`, the symmetric tridiagonal matrix
    with diagonal :math:`\alpha_1..\alpha_k` and off-diagonal :math:`\beta_1..\beta_{k-1}`; its
    eigenvalues (Ritz values, :func:`torch.linalg.eigh` in float64) are the best estimates of
    :math:`H`'s eigenvalues from the Krylov space
    :math:`\mathcal{K}_k = \mathrm{span}\{u, Hu, \dots, H^{k-1}u\}`. The estimate
    :math:`\theta_k` is the Ritz value of largest magnitude (with its sign: the same quantity as
    power iteration; the positive one in a tie). The stopping rule is the same on
    :math:`\theta_k`, plus a guard on the other end :math:`\theta'_k` of the Ritz spectrum: it
    too moved by at most :math:`\mathrm{tol} \cdot |\theta_k|`, or
    :math:`|\theta'_k| + 10\,|\theta'_k - \theta'_{k-1}| < |\theta_k|` (it cannot overtake
    within ten more steps at its last rate), so that an end that leads early does not stop the
    iteration while the other, still growing, is about to become the larger. From the same start, power iteration's :math:`\lambda_k` is the Rayleigh
    quotient of one vector of :math:`\mathcal{K}_k`, so it lies between the extreme Ritz values:
    the Ritz value on the dominant eigenvalue's side is at least as close at every :math:`k`, and
    it converges much faster (its error falls like a Chebyshev polynomial in the spectral gap, not
    like :math:`|\lambda_2/\lambda_1|^{2k}`). If :math:`\beta_k \approx 0` (at most
    :math:`100\,\epsilon \max_j \lVert Hq_j \rVert`, :math:`\epsilon` the working precision),
    :math:`\mathcal{K}_k` is an invariant subspace: its Ritz values are exact eigenvalues and the
    iteration stops as converged (after at most :math:`n` products on an :math:`n`-dimensional
    problem; a zero Hessian stops after one, with eigenvalue 0). As with power iteration, a start
    with no component along the dominant eigenvector cannot find it: the result is then exact for
    the part of the spectrum the start reaches. **Memory**: Lanczos keeps every basis vector, up
    to ``basis_size`` (default ``max_iters``) vectors of the model's size (flattened, in float32
    or the parameters' dtype if wider, allocated in blocks as the iteration grows, never
    copied), i.e. ``basis_size × n_params × 4`` bytes in float32, plus one working vector that
    every product is written into (with ``reuse_init``, the warm start's memory). **Time**: the reorthogonalisation at product
    :math:`k` is :math:`4kn` flops reading the :math:`k` stored vectors twice, small against a
    Hessian-vector product (a backward pass through the model) for any model of interest, so
    Lanczos pays off whenever it saves a product (``benchmarks/hessian_vs_pyhessian.py`` measures
    both). Power iteration keeps two vectors.

    Power iteration (and Lanczos) converge to the eigenvalue of largest *magnitude*, with its
    sign: on a Hessian whose most negative eigenvalue outweighs the largest positive one (a
    saddle, early training) the result is negative and is not :math:`\lambda_{\max}`. Its
    absolute value is the spectral norm :math:`\lVert H \rVert_2`, i.e. the local β-smoothness
    (Lipschitz constant of the gradient), which is the quantity the paper's smoothness argument is
    about. PyHessian (``hessian.eigenvalues``) runs power iteration (and reports the signed value
    as "top eigenvalue"); it compares consecutive estimates relative to
    :math:`|\lambda_{k-1}| + 10^{-6}`, draws its start from the global RNG (which this function
    never touches) and puts the model in eval mode, so for a BatchNorm network it measures the
    Hessian of a different function (running statistics) than the training loss with batch
    statistics that a caller passes here. Power iteration converges geometrically in
    :math:`|\lambda_2 / \lambda_1|`; for both algorithms the stopping rule measures progress, not
    the error, so a small spectral gap can stop early with a value below the true one (or hit
    ``max_iters``).

    Args:
        hvp_fn: :math:`v \mapsto Hv` on parameter dicts, e.g. a :class:`HessianVectorProduct`.
            A :class:`~lightning_bn.diagnostics.hvp.FlatOperator` (one with ``layout`` and
            ``matvec``, as :class:`HessianVectorProduct`) whose layout is that of the start
            vector (same keys in the same order, shapes, dtypes, devices) is called through
            ``matvec`` on flat vectors, without dict bookkeeping per product; any other callable
            on dict views of the flat iterates.
        init: starting vector (a warm start, e.g. the previous call's ``eigenvector``; normalised
            here), or ``None`` for a random Gaussian unit vector.
        max_iters: most Hessian-vector products (``>= 1``; default 100, where Lanczos reaches
            ``tol=1e-3`` on every model of ``benchmarks/hessian_vs_pyhessian.py``); for Lanczos
            also the most vectors kept in memory (allocated as the iteration grows).
        tol: relative tolerance of the stopping rule (``>= 0``).
        generator: random source for a cold start. ``None`` uses a fresh generator seeded with 0,
            so the global RNG (and therefore training) is never touched.
        like: keys, shapes, dtypes and devices of a cold start; defaults to ``hvp_fn.params``
            when ``hvp_fn`` is a :class:`HessianVectorProduct`.
        algorithm: ``"lanczos"`` (default) or ``"power"`` (two vectors of memory, many more
            products, and a stopping rule that can stop far from the answer on a small gap).
        warn: issue a :class:`ConvergenceWarning` when the iteration hits ``max_iters`` (the
            callbacks log a converged flag instead).
        basis_size: most Lanczos vectors kept (0 or ``>= 2``); ``None`` (default): ``max_iters``. A
            cycle that fills the basis without meeting the stopping rule restarts, in the same
            basis, from the normalised sum of the Ritz vectors of both ends of its spectrum (so
            an end that leads early cannot shut out the other one), so memory stays at
            ``basis_size`` vectors; the stopping rule and ``tol`` are the same, at the cost of
            more products on a small gap. ``0``: no basis, the three-term recurrence run twice
            (:func:`~lightning_bn.diagnostics.restart.two_pass_top`: the same Ritz value,
            stopping rule and Ritz vector as the full basis, found in ``2m - 1`` products where
            it takes ``m``, so at most ``(max_iters + 1) // 2`` Lanczos steps) at three vectors
            of memory besides the product's own, whatever the number of products.
        reuse_init: Lanczos may overwrite ``init`` once it is read, using its memory as the
            working vector, when ``init`` is views of one flat tensor in the layout (as the
            ``eigenvector`` of a previous result is): a warm start then costs no memory of its
            own. ``init`` then holds the returned eigenvector (with ``basis_size=0``, its
            memory is the start vector, then the eigenvector's sum).

    Returns:
        :class:`EigResult`. If :math:`Hv = 0` (a zero Hessian, or a start in its null space) the
        eigenvalue is 0 and ``converged`` is ``True``; a non-finite product stops the iteration
        with ``nan`` and ``converged=False``.

    Raises:
        ValueError: bad ``max_iters``/``tol``/``algorithm``, an ``init`` of zero norm, or a cold
            start with no shapes to draw from.

    Example:
        >>> import torch
        >>> a = torch.diag(torch.tensor([3.0, -5.0, 1.0, 2.0], dtype=torch.float64))
        >>> op = HessianVectorProduct(lambda p: 0.5 * p["w"] @ a @ p["w"], {"w": a.new_ones(4)})
        >>> res = top_hessian_eigenvalue(op, None, tol=0.0, algorithm="lanczos")
        >>> round(res.eigenvalue, 12), res.iterations, res.converged
        (-5.0, 4, True)
    """
    check_int("max_iters", max_iters, minimum=1)
    size = max_iters if basis_size is None else check_basis_size("basis_size", basis_size, 2)
    tol = check_float("tol", tol, minimum=0)
    check_choice("algorithm", algorithm, _ALGORITHMS)
    if init is None:
        if like is None and isinstance(hvp_fn, HessianVectorProduct):
            like = hvp_fn.params
        if like is None:
            raise ValueError(
                "Expected argument `init` or `like` (the parameter shapes of a random start), "
                "but got neither (pass `like=params` or a HessianVectorProduct as `hvp_fn`)"
            )
        init = _random_like(like, generator)
    layout, matvec = _flat_operator(hvp_fn, init)
    if algorithm == "lanczos" and size == 0:
        result = _two_pass(matvec, layout, init, max_iters, tol, reuse_init)
        if warn and not result.converged:
            warn_unconverged("top_hessian_eigenvalue (lanczos)", result.iterations)
        return result
    # Lanczos: the start is written straight into the basis's first row (no copy of its own)
    basis = None
    if algorithm == "lanczos":
        basis = _Basis(layout.numel, min(size, max_iters), layout.dtype, layout.device)
    q = layout.flat(init, out=None if basis is None else basis.append())
    w = _flat_storage(init, layout) if reuse_init and basis is not None else None
    del init  # a cold start's random vector is not kept past here
    norm = float(torch.linalg.vector_norm(q))
    if not 0.0 < norm < math.inf:
        raise ValueError(f"Cannot normalise a vector of norm {norm}")
    q.div_(norm)
    if basis is not None:
        result = _restarted(matvec, layout, basis, q, max_iters, tol, w)
    else:
        result = _power(matvec, layout, q, max_iters, tol)
    if warn and not result.converged:
        warn_unconverged(f"top_hessian_eigenvalue ({algorithm})", result.iterations)
    return result


def _flat_operator(
    hvp_fn: Callable[[TensorDict], TensorDict], init: Mapping[str, Tensor]
) -> tuple[FlatLayout, _Matvec]:
    r"""The layout of ``init`` and :math:`v \mapsto Hv` on flat vectors in it.

    ``hvp_fn.matvec`` when ``hvp_fn`` is a :class:`FlatOperator` whose layout is that of
    ``init`` (keys in the same order, shapes, dtypes, devices), else ``hvp_fn`` on dict views.
    The returned map takes ``(v, out)``: the product is written into ``out`` when ``hvp_fn``'s
    ``matvec`` takes an ``out`` (as :class:`HessianVectorProduct`'s does), else it is a new
    tensor.
    """
    layout = FlatLayout(init)
    if isinstance(hvp_fn, FlatOperator) and _same_layout(hvp_fn.layout, layout):
        flat_matvec = hvp_fn.matvec
        if "out" in inspect.signature(flat_matvec).parameters:
            return hvp_fn.layout, _Matvec(lambda v, out: flat_matvec(v, out=out), True)  # type: ignore[call-arg]
        return hvp_fn.layout, _Matvec(lambda v, out: flat_matvec(v), False)

    def matvec(v: Tensor, out: Tensor | None) -> Tensor:
        return layout.flat(hvp_fn(layout.unflat(v)))

    return layout, _Matvec(matvec, False)


@dataclass(frozen=True)
class _Matvec:
    """A product on flat vectors, ``(v, out) -> Hv``, and whether it writes into ``out``."""

    product: Callable[[Tensor, Tensor | None], Tensor]
    takes_out: bool

    def __call__(self, v: Tensor, out: Tensor | None = None) -> Tensor:
        return self.product(v, out if self.takes_out else None)


def _flat_storage(d: Mapping[str, Tensor], layout: FlatLayout) -> Tensor | None:
    """The flat tensor in ``layout`` whose views ``d``'s values are, in order, or ``None``."""
    values = [d[k] for k in layout.keys]
    base = values[0]._base if values and layout.uniform else None
    if base is None or base.shape != (layout.numel,) or base.dtype != layout.dtype:
        return None
    offset = base.data_ptr()
    for v, n in zip(values, layout.numels, strict=True):
        if v._base is not base or not v.is_contiguous() or v.data_ptr() != offset:
            return None
        offset += n * base.element_size()
    return base


def _same_layout(a: FlatLayout, b: FlatLayout) -> bool:
    return (a.keys, a.shapes, a.dtypes, a.devices) == (b.keys, b.shapes, b.dtypes, b.devices)


def _power(matvec: _Matvec, layout: FlatLayout, v: Tensor, max_iters: int, tol: float) -> EigResult:
    """Power iteration on flat vectors from the unit vector ``v``; see :func:`top_hessian_eigenvalue`."""
    eigenvalue = math.nan
    previous: float | None = None
    for k in range(1, max_iters + 1):
        hv = matvec(v)
        with torch.no_grad():
            stats = torch.stack([torch.dot(v, hv), torch.linalg.vector_norm(hv)])
        eigenvalue, hv_norm = stats.tolist()  # the one host transfer per product
        if not (math.isfinite(eigenvalue) and math.isfinite(hv_norm)):
            return EigResult(math.nan, layout.unflat(v), k, False)
        if hv_norm == 0.0:
            return EigResult(0.0, layout.unflat(v), k, True)
        v = hv.div_(hv_norm)
        if previous is not None and abs(eigenvalue - previous) <= tol * abs(eigenvalue):
            return EigResult(eigenvalue, layout.unflat(v), k, True)
        previous = eigenvalue
    return EigResult(eigenvalue, layout.unflat(v), max_iters, False)


def _restarted(
    matvec: _Matvec,
    layout: FlatLayout,
    basis: _Basis,
    q: Tensor,
    max_iters: int,
    tol: float,
    w: Tensor | None = None,
) -> EigResult:
    """Lanczos cycles of at most ``basis.capacity`` products, each started from the last one's
    Ritz vector, until one meets the stopping rule or ``max_iters`` products are spent.

    ``q`` is the unit start, the basis's first row. Every cycle uses the same basis and one
    working vector ``w`` (``None``: allocated at the first product): the products are written
    into it, and the Ritz vector at the end."""
    used = 0
    while True:
        steps = min(basis.capacity, max_iters - used)
        restart = used + steps < max_iters
        result, w = _lanczos(matvec, layout, basis, q, w, steps, tol, restart)
        used += result.iterations
        if result.converged or used >= max_iters or not math.isfinite(result.eigenvalue):
            return EigResult(result.eigenvalue, result.eigenvector, used, result.converged)
        basis.reset()
        q = basis.append(w)  # the Ritz vector, a unit vector: the next cycle's start


def _two_pass(
    matvec: _Matvec,
    layout: FlatLayout,
    init: Mapping[str, Tensor],
    max_iters: int,
    tol: float,
    reuse_init: bool,
) -> EigResult:
    """Lanczos without a basis (:func:`~lightning_bn.diagnostics.restart.two_pass_top`) with
    :func:`_lanczos`'s Ritz value (largest magnitude), stopping rule (:func:`_settled`) and
    Ritz vector sign; pass 1 takes at most half of ``max_iters``, pass 2 one product fewer.
    With ``reuse_init``, ``init``'s memory is the start and then holds the Ritz vector (as in
    :func:`two_pass_top`, which sums it into its start's memory)."""
    storage = _flat_storage(init, layout) if reuse_init else None
    # the start, in a list so that no name here holds it once two_pass_top consumes it
    start = [layout.flat(init) if storage is None else storage]
    del init
    norm = float(torch.linalg.vector_norm(start[0]))
    if not 0.0 < norm < math.inf:
        raise ValueError(f"Cannot normalise a vector of norm {norm}")
    steps = (max_iters + 1) // 2
    pair = two_pass_top(matvec, start.pop(), max_steps=steps, tol=tol, rule=dominant_rule(tol))
    vector = pair.vector
    if vector is None:  # a product was not finite and the start is spent: a cold start's vector
        like = torch.empty(layout.numel, dtype=layout.dtype, device=layout.device)
        vector = layout.flat(_random_like(layout.unflat(like), None))
        vector.div_(torch.linalg.vector_norm(vector))
    if storage is not None and vector.data_ptr() != storage.data_ptr():
        vector = storage.copy_(vector)  # (a non-finite product: the start's memory is unused)
    return EigResult(pair.value, layout.unflat(vector), pair.steps, pair.converged)


def _lanczos(
    matvec: _Matvec,
    layout: FlatLayout,
    basis: _Basis,
    q: Tensor,
    w: Tensor | None,
    max_iters: int,
    tol: float,
    restart: bool = False,
) -> tuple[EigResult, Tensor]:
    r"""Lanczos with full reorthogonalisation from the unit vector ``q`` (the only row of
    ``basis``); see :func:`top_hessian_eigenvalue`. ``w``: a working vector to write the
    products into (``None``: allocated at the first). Returns the result and the flat Ritz vector
    (in the working vector).

    Per product: a handful of vector operations, one host transfer (the new
    :math:`\alpha_k`, :math:`\lVert Hq_k \rVert`, :math:`\beta_k`) and the eigenvalues of the
    small :math:`T_k`; the eigenvectors of :math:`T_k` only once, for the returned Ritz vector.
    """
    q_prev: Tensor | None = None
    eps = torch.finfo(q.dtype).eps
    tri = _Tridiagonal(max_iters)
    beta = 0.0
    scale = 0.0  # max_j ‖H q_j‖, a lower bound of ‖H‖
    previous: tuple[float, float] | None = None
    for k in range(1, max_iters + 1):
        if not matvec.takes_out:
            w = None  # already copied into the basis: not kept through the next product
        w = matvec(q, w)
        with torch.no_grad():
            hq_norm_t = torch.linalg.vector_norm(w)
            # three-term recurrence, then one classical Gram-Schmidt pass against the whole basis
            # (the recurrence is the first of "twice is enough": what is left along q_1..q_k is
            # rounding, which one more pass removes to working precision)
            if q_prev is not None:
                w.sub_(q_prev, alpha=beta)
            alpha_t = torch.dot(q, w)  # q_kᵀ H q_k, since q_k ⟂ q_{k-1}
            w.addcmul_(q, alpha_t, value=-1.0)
            basis.project_out(w)
            stats = torch.stack([alpha_t, hq_norm_t, torch.linalg.vector_norm(w)])
        alpha, hq_norm, new_beta = stats.tolist()  # the one host transfer per product
        if not (math.isfinite(alpha) and math.isfinite(hq_norm) and math.isfinite(new_beta)):
            # the last finite Ritz vector (the start vector after a first bad product)
            vector = q.clone() if k == 1 else _ritz_vector(tri, basis)
            vector = vector / vector.norm()
            return EigResult(math.nan, layout.unflat(vector), k, False), vector
        tri.append(alpha, beta)
        scale = max(scale, hq_norm)
        ends = tri.eigvalsh()  # ascending: the extremes are at the ends
        low, high = ends[0], ends[-1]
        # largest magnitude (the positive one in a tie); + 0.0: no -0.0
        theta = (low if -low > high else high) + 0.0
        breakdown = new_beta <= _BREAKDOWN * eps * scale
        settled = previous is not None and _settled(low, high, theta, previous, tol)
        if breakdown or settled or k == max_iters:
            both = restart and not (breakdown or settled)
            vector = _ritz_vector(tri, basis, out=w, both=both)  # w is spent: the vector goes there
            return EigResult(theta, layout.unflat(vector), k, breakdown or settled), vector
        previous, beta = (low, high), new_beta
        q_prev, q = q, basis.append(w, beta)
    raise AssertionError("unreachable")  # pragma: no cover


def _ritz_vector(
    tri: _Tridiagonal, basis: _Basis, out: Tensor | None = None, both: bool = False
) -> Tensor:
    r"""The unit Ritz vector :math:`Q_k s` of the dominant Ritz value of :math:`T_k` (an end of
    its spectrum: the lowest if it is below 0 and larger in magnitude than the highest), with
    :math:`q_1^\top Q_k s = s_1 \ge 0`; ``both``: the normalised sum of the Ritz vectors of both
    ends (a restart that keeps either end able to win)."""
    values, vectors = torch.linalg.eigh(tri.matrix())
    low, high = float(values[0]), float(values[-1])
    ends = [0, -1] if both else [0 if -low > high else -1]
    ritz = torch.zeros_like(vectors[:, 0])
    for end in ends:
        part = vectors[:, end]
        ritz += -part if part[0].item() < 0 else part  # a deterministic sign
    vector = basis.combine(ritz, out=out)
    return vector.div_(torch.linalg.vector_norm(vector))


def _random_like(template: Mapping[str, Tensor], generator: torch.Generator | None) -> TensorDict:
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return {
        k: torch.randn(p.shape, generator=gen, dtype=p.dtype, device=gen.device).to(p.device)
        for k, p in template.items()
    }
