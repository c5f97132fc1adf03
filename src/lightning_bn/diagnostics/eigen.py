r"""The dominant Hessian eigenvalue from Hessian-vector products: power iteration and Lanczos.

Works on any linear map :math:`v \mapsto Hv` of parameter dicts (e.g. a
:class:`~lightning_bn.diagnostics.hvp.HessianVectorProduct`), so it never evaluates a model itself.
Power iteration keeps two vectors; Lanczos with full reorthogonalisation (:class:`_Basis` holds its
orthonormal vectors) reaches the same tolerance in fewer products at the memory of one stored
vector per product. Plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_bn._validation import check_choice, check_float, check_int
from lightning_bn.diagnostics.hvp import HessianVectorProduct
from lightning_bn.paramvec import FlatLayout, TensorDict, dict_dot, dict_norm, dict_normalise

__all__ = ["EigAlgorithm", "EigResult", "top_hessian_eigenvalue"]

#: How :func:`top_hessian_eigenvalue` iterates.
EigAlgorithm = Literal["power", "lanczos"]
_ALGORITHMS = ("power", "lanczos")
#: Lanczos breakdown: a new residual of norm <= this × eps × max ‖Hq_j‖ spans nothing new.
_BREAKDOWN = 100.0


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
    max_iters: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    like: Mapping[str, Tensor] | None = None,
    algorithm: EigAlgorithm = "power",
) -> EigResult:
    r"""Dominant Hessian eigenvalue from Hessian-vector products (power iteration or Lanczos).

    **Power iteration** (``algorithm="power"``, the default):

    .. math::
        v_0 = \frac{u}{\lVert u \rVert}, \qquad
        \lambda_k = v_{k-1}^\top H v_{k-1}, \qquad
        v_k = \frac{H v_{k-1}}{\lVert H v_{k-1} \rVert},

    stopping at the first :math:`k \ge 2` with
    :math:`|\lambda_k - \lambda_{k-1}| \le \mathrm{tol} \cdot |\lambda_k|`.

    **Lanczos** (``algorithm="lanczos"``) with full reorthogonalisation: from
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
    power iteration; the positive one in a tie), and the stopping rule is the same, on
    :math:`\theta_k`. From the same start, power iteration's :math:`\lambda_k` is the Rayleigh
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
    to ``max_iters`` vectors of the model's size (flattened, in float32 or the parameters' dtype
    if wider, allocated in blocks as the iteration grows, never copied), i.e.
    ``max_iters × n_params × 4`` bytes in float32. **Time**: the reorthogonalisation at product
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
        init: starting vector (a warm start, e.g. the previous call's ``eigenvector``; normalised
            here), or ``None`` for a random Gaussian unit vector.
        max_iters: most Hessian-vector products (``>= 1``); for Lanczos also the most vectors
            kept in memory.
        tol: relative tolerance of the stopping rule (``>= 0``).
        generator: random source for a cold start. ``None`` uses a fresh generator seeded with 0,
            so the global RNG (and therefore training) is never touched.
        like: keys, shapes, dtypes and devices of a cold start; defaults to ``hvp_fn.params``
            when ``hvp_fn`` is a :class:`HessianVectorProduct`.
        algorithm: ``"power"`` (default) or ``"lanczos"``.

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
    if algorithm == "lanczos":
        return _lanczos(hvp_fn, init, max_iters, tol)
    v = dict_normalise(init)

    eigenvalue = math.nan
    previous: float | None = None
    for k in range(1, max_iters + 1):
        hv = hvp_fn(v)
        with torch.no_grad():
            rayleigh = dict_dot(v, hv)
            stats = torch.stack([rayleigh, dict_norm(hv).to(rayleigh.dtype)])
        eigenvalue, hv_norm = (float(s) for s in stats.tolist())
        if not (math.isfinite(eigenvalue) and math.isfinite(hv_norm)):
            return EigResult(math.nan, v, k, False)
        if hv_norm == 0.0:
            return EigResult(0.0, v, k, True)
        v = {key: t / hv_norm for key, t in hv.items()}
        if previous is not None and abs(eigenvalue - previous) <= tol * abs(eigenvalue):
            return EigResult(eigenvalue, v, k, True)
        previous = eigenvalue
    return EigResult(eigenvalue, v, max_iters, False)


class _Basis:
    r"""The orthonormal Lanczos vectors :math:`Q_k` as rows of a few blocks.

    Blocks double the capacity (4, 4, 8, 16, ... rows, capped at ``capacity`` in all), so nothing
    is ever copied, at most ``capacity`` rows are allocated, and a product with :math:`Q_k` or
    :math:`Q_k^\top` is one matrix-vector product per block.
    """

    def __init__(self, n: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.capacity, self.dtype, self.device = n, capacity, dtype, device
        self.size = 0
        self._blocks: list[Tensor] = []
        self._used: list[int] = []

    def append(self, v: Tensor) -> Tensor:
        """Store ``v`` as the next row; return the stored row (a view)."""
        if not self._blocks or self._used[-1] == self._blocks[-1].shape[0]:
            rows = min(max(4, self.size), self.capacity - self.size)
            self._blocks.append(torch.empty(rows, self.n, dtype=self.dtype, device=self.device))
            self._used.append(0)
        row = self._blocks[-1][self._used[-1]]
        row.copy_(v)
        self._used[-1] += 1
        self.size += 1
        return row

    def _views(self) -> list[Tensor]:
        return [b[:u] for b, u in zip(self._blocks, self._used, strict=True)]

    def project_out(self, w: Tensor) -> None:
        r""":math:`w \leftarrow (I - QQ^\top) w` in place (classical Gram-Schmidt)."""
        views = self._views()
        coeffs = [b @ w for b in views]  # all coefficients first, then one update per block
        for b, c in zip(views, coeffs, strict=True):
            w.addmv_(b.T, c, alpha=-1.0)

    def combine(self, s: Tensor) -> Tensor:
        r""":math:`Q s` as a new tensor; ``s`` holds the coefficients of the first ``len(s)``
        rows (the others count as 0)."""
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        s = s.to(device=self.device, dtype=self.dtype)
        start = 0
        for b in self._views():
            part = s[start : start + b.shape[0]]
            if part.numel():
                out.addmv_(b[: part.numel()].T, part)
            start += b.shape[0]
        return out


def _lanczos(
    hvp_fn: Callable[[TensorDict], TensorDict],
    init: Mapping[str, Tensor],
    max_iters: int,
    tol: float,
) -> EigResult:
    """Lanczos with full reorthogonalisation; see :func:`top_hessian_eigenvalue`."""
    layout = FlatLayout(init)
    q = layout.flat(init)
    norm = float(torch.linalg.vector_norm(q))
    if not 0.0 < norm < math.inf:
        raise ValueError(f"Cannot normalise a vector of norm {norm}")
    basis = _Basis(q.numel(), max_iters, q.dtype, q.device)
    q = basis.append(q.div_(norm))
    q_prev: Tensor | None = None
    eps = torch.finfo(q.dtype).eps
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0  # max_j ‖H q_j‖, a lower bound of ‖H‖
    previous: float | None = None
    ritz: Tensor | None = None  # coefficients of the current Ritz vector in the basis
    for k in range(1, max_iters + 1):
        w = layout.flat(hvp_fn(layout.unflat(q)))
        with torch.no_grad():
            hq_norm_t = torch.linalg.vector_norm(w)
            # three-term recurrence, then one classical Gram-Schmidt pass against the whole basis
            # (the recurrence is the first of "twice is enough": what is left along q_1..q_k is
            # rounding, which one more pass removes to working precision)
            if q_prev is not None:
                w.sub_(q_prev, alpha=betas[-1])
            alpha_t = torch.dot(q, w)  # q_kᵀ H q_k, since q_k ⟂ q_{k-1}
            w.addcmul_(q, alpha_t, value=-1.0)
            basis.project_out(w)
            stats = torch.stack([alpha_t, hq_norm_t, torch.linalg.vector_norm(w)])
        alpha, hq_norm, beta = stats.double().tolist()
        if not all(math.isfinite(x) for x in (alpha, hq_norm, beta)):
            # the last finite Ritz vector (the start vector after a first bad product)
            vector = q.clone() if ritz is None else basis.combine(ritz)
            return EigResult(math.nan, layout.unflat(vector / vector.norm()), k, False)
        alphas.append(alpha)
        scale = max(scale, hq_norm)
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:  # eigh reads the lower triangle only
            tri.diagonal(-1).copy_(torch.tensor(betas, dtype=torch.float64))
        values, vectors = torch.linalg.eigh(tri)
        ends = values.tolist()  # ascending: the extremes are at the ends
        low, high = ends[0], ends[-1]
        i = 0 if -low > high else k - 1  # largest magnitude (the positive one in a tie)
        theta = (low if i == 0 else high) + 0.0  # + 0.0: no -0.0
        ritz = vectors[:, i]
        breakdown = beta <= _BREAKDOWN * eps * scale
        settled = previous is not None and abs(theta - previous) <= tol * abs(theta)
        if breakdown or settled or k == max_iters:
            if ritz[0].item() < 0:  # a deterministic sign: q_1ᵀy ≥ 0
                ritz = -ritz
            vector = basis.combine(ritz)
            vector /= torch.linalg.vector_norm(vector)
            return EigResult(theta, layout.unflat(vector), k, breakdown or settled)
        previous = theta
        betas.append(beta)
        q_prev, q = q, basis.append(w.div_(beta))
    raise AssertionError("unreachable")  # pragma: no cover


def _random_like(template: Mapping[str, Tensor], generator: torch.Generator | None) -> TensorDict:
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return {
        k: torch.randn(p.shape, generator=gen, dtype=p.dtype, device=gen.device).to(p.device)
        for k, p in template.items()
    }
