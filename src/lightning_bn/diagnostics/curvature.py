r"""Curvature of the loss at a parameter point: Hessian-vector products, top eigenvalue, gᵀHg.

Everything here works on *parameter dicts* (``dict[str, Tensor]``, e.g. a model's
``named_parameters()`` detached) and on a scalar loss function of such a dict,

.. math::
    L : \{W_k\}_k \mapsto \mathbb{R}, \qquad H = \nabla^2 L(W),

so a caller decides how the loss is evaluated (typically
:func:`torch.func.functional_call` on copies of the buffers, with the step's RNG state
replayed so that every call sees the same dropout masks and batch statistics). This module
imports no Lightning.

Three ways to get :math:`Hv` (all exact up to rounding):

* ``"forward"`` (forward-over-reverse): :math:`Hv = \partial_\epsilon \nabla L(W + \epsilon v)|_0`,
  with ``torch.func.jvp(torch.func.grad(loss_fn), (params,), (vector,))``. When functorch refuses
  the loss function because it mutates a tensor it did not receive as an input (the in-place
  running-statistics update of a train-mode BatchNorm whose buffers were cloned *outside*
  ``loss_fn``), the same product is taken with dual tensors (:mod:`torch.autograd.forward_ad`)
  through a plain :func:`torch.autograd.grad`, which does not mind such updates.
* ``"reverse"`` (reverse-over-reverse): :math:`Hv = \nabla_W \langle \nabla L(W), v\rangle`, i.e.
  :func:`torch.autograd.grad` with ``create_graph=True`` and a second ``grad`` along ``v``.
  :class:`HessianVectorProduct` builds the first-order graph once and reuses it for every product.
* ``"auto"``: ``"forward"``, falling back to ``"reverse"`` when forward-mode AD raises (an op with
  no forward derivative, e.g. ``grid_sampler_2d``, or a custom :class:`torch.autograd.Function`
  without ``jvp``).

The dominant eigenvalue (:func:`top_hessian_eigenvalue`) is found from such products by power
iteration (``algorithm="power"``) or by Lanczos with full reorthogonalisation
(``algorithm="lanczos"``: fewer products to the same tolerance, at the memory of one stored
vector per product).

The helpers at the end (:func:`dict_dot`, :func:`dict_norm`, :func:`dict_axpy`,
:func:`dict_normalise`) treat a parameter dict as one flat vector and are meant for reuse by
other diagnostics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "EigAlgorithm",
    "EigResult",
    "HVPMethod",
    "HessianVectorProduct",
    "LossFn",
    "TensorDict",
    "dict_axpy",
    "dict_dot",
    "dict_norm",
    "dict_normalise",
    "grad_and_loss",
    "gradient_curvature",
    "hvp",
    "top_hessian_eigenvalue",
]

TensorDict = dict[str, Tensor]
#: A scalar loss of a parameter dict.
LossFn = Callable[[TensorDict], Tensor]
#: How a Hessian-vector product is taken (see the module docstring).
HVPMethod = Literal["auto", "forward", "reverse"]
_METHODS = ("auto", "forward", "reverse")
#: How :func:`top_hessian_eigenvalue` iterates.
EigAlgorithm = Literal["power", "lanczos"]
_ALGORITHMS = ("power", "lanczos")
#: Lanczos breakdown: a new residual of norm <= this × eps × max ‖Hq_j‖ spans nothing new.
_BREAKDOWN = 100.0


# --- Hessian-vector products --------------------------------------------------------------------
def hvp(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
    *,
    method: HVPMethod = "auto",
) -> TensorDict:
    r"""Hessian-vector product :math:`H v` of a scalar loss at ``params``.

    .. math::
        (Hv)_k = \sum_l \frac{\partial^2 L}{\partial W_k \, \partial W_l}(W) \, v_l .

    Args:
        loss_fn: ``loss_fn(params) -> Tensor`` returning a scalar. It is called once when the
            first attempt works, and up to three times otherwise (torch.func, dual tensors,
            reverse mode), so every call must see the same data, dropout masks and batch
            statistics; in-place updates of running statistics inside it are harmless (train-mode
            BatchNorm), as long as they do not change the output.
        params: the point :math:`W`, ``{name: Tensor}``; not modified, detached internally.
        vector: the direction :math:`v`, same keys and shapes as ``params``.
        method: ``"forward"``, ``"reverse"`` or ``"auto"`` (forward, reverse if forward-mode AD
            raises); see the module docstring.

    Returns:
        ``{name: Tensor}`` with the shapes of ``params``, detached.

    Raises:
        ValueError: an unknown ``method``, mismatched keys or shapes, or a non-scalar loss.
        RuntimeError: the product cannot be taken with the chosen method (for ``"auto"``: the error
            of the reverse-mode attempt, chained to the forward-mode one).
    """
    _check_method(method)
    primals, tangents = _prepare(params, vector)
    if method == "reverse":
        return _hvp_reverse(loss_fn, primals, tangents)
    try:
        return _hvp_forward(loss_fn, primals, tangents)
    except RuntimeError as forward_error:
        if method == "forward":
            raise
        try:
            return _hvp_reverse(loss_fn, primals, tangents)
        except RuntimeError as reverse_error:
            raise reverse_error from forward_error


def grad_and_loss(loss_fn: LossFn, params: Mapping[str, Tensor]) -> tuple[TensorDict, Tensor]:
    r"""Gradient :math:`\nabla L(W)` and loss :math:`L(W)` by one plain backward pass.

    Args:
        loss_fn: ``loss_fn(params) -> Tensor`` returning a scalar.
        params: the point :math:`W`, ``{name: Tensor}``; not modified.

    Returns:
        ``(grad, loss)``: ``grad`` has the keys and shapes of ``params`` (zeros for a parameter the
        loss does not depend on), ``loss`` is a 0-dim tensor; both detached.
    """
    leaves = _leaves(params)
    with torch.enable_grad():
        loss = _scalar(loss_fn(leaves))
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return _as_dict(leaves, grads), loss.detach()


class HessianVectorProduct:
    r"""The linear map :math:`v \mapsto H v` at a fixed point, reusing work across products.

    Building it evaluates the loss and its gradient once (available as :attr:`loss` and
    :attr:`grad`, so a caller needs no separate gradient pass). With ``method="reverse"`` (the
    default) the first-order graph is kept and each product is one more backward pass through it
    (about 1-2 gradient passes per product in our CPU measurements on small BatchNorm MLPs and
    CNNs, against 2.4-4.2 for forward-over-reverse, which re-runs the model every time); the price
    is the memory of that graph until the object is dropped. ``params`` are not copied (detached
    views): do not modify them in place while the operator is in use (autograd then raises).
    With ``"forward"``/``"auto"`` each product re-runs the model, and ``"auto"`` settles on the
    first method that works (keeping the graph if that is ``"reverse"``).

    Args:
        loss_fn: ``loss_fn(params) -> Tensor`` returning a scalar; see :func:`hvp`.
        params: the point :math:`W`, ``{name: Tensor}``; not modified.
        method: ``"reverse"`` (default), ``"forward"`` or ``"auto"``.

    Attributes:
        params: the point, detached.
        loss: :math:`L(W)`, 0-dim, detached.
        grad: :math:`\nabla L(W)`, detached.
        method: the method in use (``"auto"`` becomes ``"forward"`` or ``"reverse"`` after the
            first product).
        calls: number of products taken so far.

    Example:
        >>> import torch
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> op = HessianVectorProduct(lambda p: 0.5 * p["w"] @ a @ p["w"], {"w": torch.ones(2)})
        >>> op({"w": torch.tensor([1.0, 0.0])})["w"]
        tensor([2., 1.])
    """

    def __init__(
        self, loss_fn: LossFn, params: Mapping[str, Tensor], *, method: HVPMethod = "reverse"
    ) -> None:
        _check_method(method)
        _check_params(params)
        self.params: TensorDict = {k: p.detach() for k, p in params.items()}
        self.method: str = method
        self.calls = 0
        self._loss_fn = loss_fn
        self._graph: tuple[TensorDict, tuple[Tensor | None, ...]] | None = None
        if method == "reverse":
            self.loss, self.grad = self._build_graph()
        else:
            self.grad, self.loss = grad_and_loss(loss_fn, self.params)

    def __call__(self, vector: Mapping[str, Tensor]) -> TensorDict:
        """Return :math:`Hv` (keys and shapes of :attr:`params`, detached)."""
        primals, tangents = _prepare(self.params, vector)
        self.calls += 1
        if self._graph is None and self.method == "auto":
            try:
                out = _hvp_forward(self._loss_fn, primals, tangents)
            except RuntimeError:
                self.method = "reverse"
                self._build_graph()
            else:
                self.method = "forward"
                return out
        if self._graph is not None:
            leaves, grads = self._graph
            return _reverse_product(leaves, grads, tangents)
        return _hvp_forward(self._loss_fn, primals, tangents)

    def _build_graph(self) -> tuple[Tensor, TensorDict]:
        leaves, grads, loss = _first_order_graph(self._loss_fn, self.params)
        self._graph = (leaves, grads)
        return loss.detach(), _as_dict(leaves, grads)


def _hvp_forward(loss_fn: LossFn, primals: TensorDict, tangents: TensorDict) -> TensorDict:
    def scalar_loss(p: TensorDict) -> Tensor:
        return _scalar(loss_fn(p))

    try:
        result = torch.func.jvp(torch.func.grad(scalar_loss), (primals,), (tangents,))
        return {k: t.detach() for k, t in cast(TensorDict, result[1]).items()}
    except RuntimeError:
        # functorch rejects in-place updates of captured tensors (BatchNorm running statistics
        # when the buffers were cloned outside loss_fn); dual tensors do the same product.
        return _hvp_dual(loss_fn, primals, tangents)


def _hvp_dual(loss_fn: LossFn, primals: TensorDict, tangents: TensorDict) -> TensorDict:
    with torch.enable_grad(), fwAD.dual_level():
        leaves = _leaves(primals)
        duals = {k: fwAD.make_dual(leaves[k], tangents[k]) for k in leaves}
        loss = _scalar(loss_fn(duals))
        # The backward pass runs on dual tensors, so each gradient carries d/dε ∇L(W + εv).
        grads = torch.autograd.grad(loss, list(duals.values()), allow_unused=True)
        out = [None if g is None else fwAD.unpack_dual(g).tangent for g in grads]
    return _as_dict(leaves, out)


def _hvp_reverse(loss_fn: LossFn, primals: TensorDict, tangents: TensorDict) -> TensorDict:
    leaves, grads, _ = _first_order_graph(loss_fn, primals)
    return _reverse_product(leaves, grads, tangents, retain_graph=False)


def _first_order_graph(
    loss_fn: LossFn, params: Mapping[str, Tensor]
) -> tuple[TensorDict, tuple[Tensor | None, ...], Tensor]:
    leaves = _leaves(params)
    with torch.enable_grad():
        loss = _scalar(loss_fn(leaves))
        grads = torch.autograd.grad(
            loss, list(leaves.values()), create_graph=True, allow_unused=True
        )
    return leaves, grads, loss


def _reverse_product(
    leaves: TensorDict,
    grads: tuple[Tensor | None, ...],
    tangents: TensorDict,
    *,
    retain_graph: bool = True,
) -> TensorDict:
    # A gradient that does not require grad is constant in W: its block of H is zero.
    pairs = [
        (g, tangents[k])
        for k, g in zip(leaves, grads, strict=True)
        if g is not None and g.requires_grad
    ]
    if not pairs:
        return {k: torch.zeros_like(p) for k, p in leaves.items()}
    with torch.enable_grad():
        out = torch.autograd.grad(
            [g for g, _ in pairs],
            list(leaves.values()),
            grad_outputs=[v for _, v in pairs],
            retain_graph=retain_graph,
            allow_unused=True,
        )
    return _as_dict(leaves, out)


# --- Dominant eigenvalue (power iteration, Lanczos) and curvature along the gradient ------------
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
    ``max_iters × n_params × 4`` bytes in float32 (20 products on 11.7 M parameters: 0.94 GB).
    **Time**: the reorthogonalisation at product :math:`k` is :math:`4kn` flops reading the
    :math:`k` stored vectors twice (memory-bound); on one CPU thread, for a 217k-parameter MLP and
    a batch of 64, about 0.1 ms per stored vector against 2.6 ms per product, so Lanczos pays
    off whenever it saves more than a few products, which it does at every tolerance we measured
    (``benchmarks/hessian_vs_pyhessian.py``). Power iteration keeps two vectors.

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
    ``max_iters``: on small BatchNorm MLPs we saw 10-110 power products to reach 1e-10).

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
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(
            f"Expected argument `max_iters` to be an integer >= 1, but got {max_iters!r}"
        )
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ValueError(f"Expected argument `tol` to be a finite number >= 0, but got {tol!r}")
    if algorithm not in _ALGORITHMS:
        raise ValueError(
            f"Expected argument `algorithm` to be one of {', '.join(map(repr, _ALGORITHMS))}, "
            f"but got {algorithm!r}"
        )
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
        return _lanczos(hvp_fn, init, max_iters, float(tol))
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


class _FlatLayout:
    """A parameter dict as one flat vector (working dtype: float32 or wider) and back."""

    def __init__(self, template: Mapping[str, Tensor]) -> None:
        self.keys = list(template)
        self.shapes = [t.shape for t in template.values()]
        self.numels = [t.numel() for t in template.values()]
        self.dtypes = [t.dtype for t in template.values()]
        self.devices = [t.device for t in template.values()]
        self.dtype = functools.reduce(torch.promote_types, self.dtypes, torch.float32)
        self.device = self.devices[0] if self.devices else torch.device("cpu")
        # the common case: no conversion either way (saves two dispatches per tensor and step)
        self._same = all(d == self.dtype for d in self.dtypes) and all(
            d == self.device for d in self.devices
        )

    def flat(self, d: Mapping[str, Tensor]) -> Tensor:
        """A new flat tensor (``torch.cat`` copies: never a view of ``d``), without autograd."""
        if d.keys() != set(self.keys):
            raise ValueError(
                f"Expected a dict with the keys {sorted(self.keys)}, but got {sorted(d)}"
            )
        with torch.no_grad():
            if self._same:
                return torch.cat([d[k].reshape(-1) for k in self.keys])
            return torch.cat(
                [d[k].reshape(-1).to(device=self.device, dtype=self.dtype) for k in self.keys]
            )

    def unflat(self, v: Tensor) -> TensorDict:
        """Views of ``v`` (copies only where a parameter's dtype or device differs)."""
        parts = v.split(self.numels)
        if self._same:
            return {
                k: t.view(shape) for k, t, shape in zip(self.keys, parts, self.shapes, strict=True)
            }
        return {
            k: t.view(shape).to(device=device, dtype=dtype)
            for k, t, shape, dtype, device in zip(
                self.keys, parts, self.shapes, self.dtypes, self.devices, strict=True
            )
        }


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
    layout = _FlatLayout(init)
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


def gradient_curvature(
    hvp_fn: Callable[[TensorDict], TensorDict], grad: Mapping[str, Tensor]
) -> float:
    r"""Curvature of the loss along the gradient.

    .. math::
        \kappa = \frac{g^\top H g}{\lVert g \rVert^2} = u^\top H u, \quad u = g / \lVert g \rVert,

    computed with the unit vector :math:`u` (one Hessian-vector product) so that large gradients
    do not overflow in low precision. A quadratic model predicts the loss decrease of a step
    :math:`-\eta g` as :math:`\eta \lVert g\rVert^2 (1 - \eta\kappa/2)`.

    Args:
        hvp_fn: :math:`v \mapsto Hv`, e.g. a :class:`HessianVectorProduct`.
        grad: the gradient :math:`g`, ``{name: Tensor}``.

    Returns:
        :math:`\kappa` as a float; ``nan`` when :math:`g = 0` (the ratio is undefined).
    """
    norm = float(dict_norm(grad))
    if norm == 0.0:
        return math.nan
    u = {k: t.detach() / norm for k, t in grad.items()}
    return float(dict_dot(u, hvp_fn(u)))


# --- Parameter dicts as flat vectors -------------------------------------------------------------
# Small helpers reusable by other diagnostics: a dict {name: Tensor} is one vector, the
# concatenation of its flattened values in key order. Keys must match exactly.
def dict_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    r"""Inner product :math:`\langle a, b \rangle = \sum_k \sum_i a_{k,i} b_{k,i}` (0-dim tensor).

    Raises:
        ValueError: the keys of ``a`` and ``b`` differ.
    """
    _check_keys(a, b)
    terms = [torch.sum(a[k] * b[k]) for k in a]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.to(terms[0].dtype) for t in terms]).sum()


def dict_norm(a: Mapping[str, Tensor]) -> Tensor:
    r"""Euclidean norm :math:`\lVert a \rVert_2` over all entries (0-dim tensor).

    Taken as the norm of the per-tensor norms, which avoids overflow in half precision.
    """
    norms = [torch.linalg.vector_norm(t) for t in a.values()]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))


def dict_axpy(
    alpha: float | Tensor, x: Mapping[str, Tensor], y: Mapping[str, Tensor]
) -> TensorDict:
    r""":math:`\alpha x + y`, key by key (a new dict; ``x`` and ``y`` are not modified).

    Raises:
        ValueError: the keys of ``x`` and ``y`` differ.
    """
    _check_keys(x, y)
    return {k: y[k] + alpha * x[k] for k in x}


def dict_normalise(a: Mapping[str, Tensor]) -> TensorDict:
    r""":math:`a / \lVert a \rVert_2` (a new dict).

    Raises:
        ValueError: ``a`` has zero (or non-finite) norm.
    """
    norm = float(dict_norm(a))
    if not 0.0 < norm < math.inf:
        raise ValueError(f"Cannot normalise a vector of norm {norm}")
    return {k: t / norm for k, t in a.items()}


# --- Internals -----------------------------------------------------------------------------------
def _check_method(method: object) -> None:
    if method not in _METHODS:
        raise ValueError(
            f"Expected argument `method` to be one of {', '.join(map(repr, _METHODS))}, "
            f"but got {method!r}"
        )


def _check_params(params: Mapping[str, Tensor]) -> None:
    if not isinstance(params, Mapping) or not params:
        raise ValueError(
            f"Expected argument `params` to be a non-empty dict of tensors, but got {params!r}"
        )
    for k, p in params.items():
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise ValueError(
                f"Expected argument `params` to hold floating-point tensors, but `{k}` is {p!r}"
            )


def _check_keys(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    if a.keys() != b.keys():
        raise ValueError(f"Expected dicts with the same keys, but got {sorted(a)} and {sorted(b)}")


def _prepare(
    params: Mapping[str, Tensor], vector: Mapping[str, Tensor]
) -> tuple[TensorDict, TensorDict]:
    _check_params(params)
    if not isinstance(vector, Mapping) or vector.keys() != params.keys():
        got = sorted(vector) if isinstance(vector, Mapping) else repr(vector)
        raise ValueError(
            f"Expected argument `vector` to have the keys of `params` {sorted(params)}, "
            f"but got {got}"
        )
    primals = {k: p.detach() for k, p in params.items()}
    tangents: TensorDict = {}
    for k, p in primals.items():
        v = vector[k]
        if v.shape != p.shape:
            raise ValueError(
                f"Expected `vector[{k!r}]` to have shape {tuple(p.shape)}, but got {tuple(v.shape)}"
            )
        tangents[k] = v.detach().to(dtype=p.dtype, device=p.device)
    return primals, tangents


def _leaves(params: Mapping[str, Tensor]) -> TensorDict:
    # detach() shares storage: no copy, and the caller's tensors keep their autograd state.
    return {k: p.detach().requires_grad_(True) for k, p in params.items()}


def _scalar(loss: object) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"Expected `loss_fn` to return a scalar tensor, but got {shape}")
    return loss.reshape(())


def _as_dict(
    leaves: TensorDict, values: list[Tensor | None] | tuple[Tensor | None, ...]
) -> TensorDict:
    return {
        k: torch.zeros_like(p) if g is None else g.detach()
        for (k, p), g in zip(leaves.items(), values, strict=True)
    }


def _random_like(template: Mapping[str, Tensor], generator: torch.Generator | None) -> TensorDict:
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return {
        k: torch.randn(p.shape, generator=gen, dtype=p.dtype, device=gen.device).to(p.device)
        for k, p in template.items()
    }
