r"""Hessian-vector products of a scalar loss of a parameter dict.

Everything here works on *parameter dicts* (``dict[str, Tensor]``, e.g. a model's
``named_parameters()`` detached; see :mod:`lightning_bn.diagnostics.paramvec`) and on a scalar loss function
of such a dict,

.. math::
    L : \{W_k\}_k \mapsto \mathbb{R}, \qquad H = \nabla^2 L(W),

so a caller decides how the loss is evaluated (typically
:func:`torch.func.functional_call` on copies of the buffers, with the step's RNG state
replayed so that every call sees the same dropout masks and batch statistics). Plain torch.

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
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Literal, Protocol, cast, runtime_checkable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_bn._types import ParamsLossFn, scalar_loss
from lightning_bn._validation import check_bool, check_choice
from lightning_bn.diagnostics.paramvec import FlatLayout, TensorDict
from lightning_bn.probe.flatgrad import backward_into

__all__ = [
    "FlatOperator",
    "HVPMethod",
    "HessianVectorProduct",
    "LossFn",
    "TensorDict",
    "grad_and_loss",
    "hvp",
]

#: A scalar loss of a parameter dict (the package's :data:`~lightning_bn._types.ParamsLossFn`,
#: under the name this module has always used).
LossFn = ParamsLossFn
#: How a Hessian-vector product is taken (see the module docstring).
HVPMethod = Literal["auto", "forward", "reverse"]
_METHODS = ("auto", "forward", "reverse")


@runtime_checkable
class FlatOperator(Protocol):
    r"""A map :math:`v \mapsto Hv` that also takes flat vectors (e.g. :class:`HessianVectorProduct`).

    ``matvec`` takes and returns 1-D tensors in ``layout`` (the parameter dict flattened and
    concatenated in key order, in the layout's working dtype), without the dict bookkeeping and
    checks of ``__call__``; iterative solvers
    (:func:`~lightning_bn.diagnostics.eigen.top_hessian_eigenvalue`) call it once per product.
    """

    layout: FlatLayout

    def __call__(self, vector: Mapping[str, Tensor], /) -> TensorDict: ...

    def matvec(self, vector: Tensor, /) -> Tensor: ...


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
        loss = scalar_loss(loss_fn(leaves), "`loss_fn`")
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return _as_dict(leaves, grads), loss.detach()


class HessianVectorProduct:
    r"""The linear map :math:`v \mapsto H v` at a fixed point, reusing work across products.

    Building it evaluates the loss and its gradient once (available as :attr:`loss` and
    :attr:`grad`, so a caller needs no separate gradient pass). With ``method="reverse"`` (the
    default) the first-order graph is kept and each product is one more backward pass through it
    (a product costs one backward pass through the kept graph, where forward-over-reverse re-runs
    the model every time); the price is the memory of that graph until the object is dropped.
    ``params`` are not copied (detached views): do not modify them in place while the operator
    is in use (autograd then raises). :meth:`matvec` takes the same product on flat vectors, as
    the eigenvalue solvers call it. With ``"forward"``/``"auto"`` each product re-runs the model, and ``"auto"`` settles on the
    first method that works (keeping the graph if that is ``"reverse"``).

    Args:
        loss_fn: ``loss_fn(params) -> Tensor`` returning a scalar; see :func:`hvp`.
        params: the point :math:`W`, ``{name: Tensor}``; not modified.
        method: ``"reverse"`` (default), ``"forward"`` or ``"auto"``.
        keep_grad: keep :attr:`grad` (default ``True``). ``False`` frees the gradient's values
            once the kept graph is built (one parameter copy less for as long as the operator
            lives; a product needs the gradient's graph, not its values): each gradient tensor
            whose memory the graph did not save is emptied, and :attr:`grad` is ``{}``.

    Attributes:
        params: the point, detached.
        loss: :math:`L(W)`, 0-dim, detached.
        grad: :math:`\nabla L(W)`, detached (``{}`` with ``keep_grad=False``).
        method: the method in use (``"auto"`` becomes ``"forward"`` or ``"reverse"`` after the
            first product).
        calls: number of products taken so far.
        layout: the :class:`~lightning_bn.diagnostics.paramvec.FlatLayout` of :attr:`params`, the vectors
            of :meth:`matvec`.

    Example:
        >>> import torch
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> op = HessianVectorProduct(lambda p: 0.5 * p["w"] @ a @ p["w"], {"w": torch.ones(2)})
        >>> op({"w": torch.tensor([1.0, 0.0])})["w"]
        tensor([2., 1.])
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Mapping[str, Tensor],
        *,
        method: HVPMethod = "reverse",
        keep_grad: bool = True,
    ) -> None:
        _check_method(method)
        _check_params(params)
        check_bool("keep_grad", keep_grad)
        self.params: TensorDict = {k: p.detach() for k, p in params.items()}
        self.layout = FlatLayout(self.params)
        self.method: str = method
        self.calls = 0
        self._loss_fn = loss_fn
        self._keep_grad = keep_grad
        self._flat_graph: _FlatGraph | None = None
        if method == "reverse":
            self.loss, self.grad = self._build_graph()
        else:
            self.grad, self.loss = grad_and_loss(loss_fn, self.params)
            if not keep_grad:
                self.grad = {}

    def __call__(self, vector: Mapping[str, Tensor]) -> TensorDict:
        """Return :math:`Hv` (keys and shapes of :attr:`params`, detached)."""
        primals, tangents = _prepare(self.params, vector)
        self.calls += 1
        if self._flat_graph is None and self.method == "auto":
            try:
                out = _hvp_forward(self._loss_fn, primals, tangents)
            except RuntimeError:
                self.method = "reverse"
                self._build_graph()
            else:
                self.method = "forward"
                return out
        if self._flat_graph is not None:
            return self.layout.unflat(self._flat_graph.product(self.layout.flat(tangents)))
        return _hvp_forward(self._loss_fn, primals, tangents)

    def matvec(
        self,
        vector: Tensor,
        out: Tensor | None = None,
        accumulate: bool = False,
        scale: Tensor | None = None,
    ) -> Tensor:
        r""":math:`Hv` on flat vectors: ``vector`` and the result are 1-D in :attr:`layout` (the
        parameters flattened and concatenated in key order, in the layout's dtype); the result is
        a new tensor, or ``out`` (1-D, ``layout.numel`` long, the layout's dtype and device; not
        ``vector``) overwritten with it, or with ``accumulate=True`` ``out`` plus it, in place
        (with the kept graph no second vector: autograd adds into ``out``). ``scale``: a diagonal
        :math:`D` as a flat vector like ``vector``; the product is then :math:`DHDv`, and with the
        kept graph neither :math:`Dv` nor :math:`HDv` exists as a vector (each parameter's part
        is scaled as the backward pass reads it and as its gradient arrives).

        The same product as ``__call__``, without its dict checks and conversions: with the kept
        graph (``"reverse"``) one backward pass whose ``grad_outputs`` are views of ``vector``
        and whose gradients are accumulated straight into the result (one parameter-sized
        vector, no concatenation). ``vector`` is not checked (its length must be
        ``layout.numel``).
        """
        if accumulate and out is None:
            raise ValueError("Expected `out` to add the product into, but got None")
        if self._flat_graph is None:  # forward-over-reverse (or "auto" before its first product)
            vector = vector if scale is None else vector * scale
            flat = self.layout.flat(
                self(self.layout.unflat(vector)), out=None if accumulate else out
            )
            flat = flat if scale is None else flat.mul_(scale)
            return cast(Tensor, out).add_(flat) if accumulate else flat
        self.calls += 1
        return self._flat_graph.product(vector, out, accumulate, scale)

    def _build_graph(self) -> tuple[Tensor, TensorDict]:
        leaves, grads, loss = _first_order_graph(self._loss_fn, self.params, self._keep_grad)
        self._flat_graph = _FlatGraph(self.layout, leaves, grads)
        return loss.detach(), _as_dict(leaves, grads) if self._keep_grad else {}


class _FlatGraph:
    """The kept first-order graph with what a product on flat vectors needs, gathered once.

    One leaf per parameter (measured faster per product than one flat leaf whose views are the
    parameters: the views add nodes to every backward pass, markedly so through BatchNorm).
    """

    def __init__(
        self, layout: FlatLayout, leaves: TensorDict, grads: tuple[Tensor | None, ...]
    ) -> None:
        self.layout = layout
        self.inputs = list(leaves.values())
        # a gradient that does not require grad is constant in W: its block of H is zero
        self.index = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.outputs = [cast(Tensor, grads[i]) for i in self.index]
        self._zeros: list[Tensor | None] = [None] * len(self.inputs)

    def product(
        self,
        vector: Tensor,
        out: Tensor | None = None,
        accumulate: bool = False,
        scale: Tensor | None = None,
    ) -> Tensor:
        layout = self.layout
        uniform = layout.uniform
        if out is None and (uniform or not self.outputs):
            out = torch.empty(layout.numel, dtype=layout.dtype, device=layout.device)
        if not self.outputs:
            return cast(Tensor, out) if accumulate else cast(Tensor, out).zero_()
        parts = torch.split_with_sizes(vector, layout.numels)
        scales = () if scale is None else torch.split_with_sizes(scale, layout.numels)
        grad_outputs = []
        for i in self.index:
            part = parts[i].view(layout.shapes[i])
            if not uniform:  # scaled here (a part's copy is made anyway), else by a hook below
                part = part if scale is None else part * scales[i].view(part.shape)
                part = part.to(dtype=layout.dtypes[i], device=layout.devices[i])
            grad_outputs.append(part)
        if uniform:  # summed straight into `out`: the product exists once
            hooks = [] if scale is None else self._scaling_hooks(scales)
            try:
                return backward_into(
                    self.outputs,
                    self.inputs,
                    cast(Tensor, out),
                    grad_outputs,
                    retain_graph=True,
                    accumulate=accumulate,
                )
            finally:
                for hook in hooks:
                    hook.remove()
        with torch.enable_grad():
            grads = torch.autograd.grad(
                self.outputs,
                self.inputs,
                grad_outputs=grad_outputs,
                retain_graph=True,
                allow_unused=True,
            )
        pieces = [self._piece(i, g, uniform) for i, g in enumerate(grads)]
        if scale is not None:
            pieces = [p * s for p, s in zip(pieces, scales, strict=True)]
        if accumulate:
            return cast(Tensor, out).add_(torch.cat(pieces))
        return torch.cat(pieces) if out is None else torch.cat(pieces, out=out)

    def _scaling_hooks(self, scales: Sequence[Tensor]) -> list[RemovableHandle]:
        """Hooks scaling each seed (a gradient output's part of ``v``) and each parameter's
        incoming gradient by its part of :math:`D`: layer-sized temporaries, no flat one."""
        shapes = self.layout.shapes
        pairs = [(self.outputs[j], i) for j, i in enumerate(self.index)]
        pairs += [(t, i) for i, t in enumerate(self.inputs)]
        return [t.register_hook(partial(torch.mul, scales[i].view(shapes[i]))) for t, i in pairs]

    def _piece(self, i: int, g: Tensor | None, uniform: bool) -> Tensor:
        layout = self.layout
        if g is None:  # the loss does not depend on this parameter
            zeros = self._zeros[i]
            if zeros is None:
                zeros = torch.zeros(layout.numels[i], dtype=layout.dtype, device=layout.device)
                self._zeros[i] = zeros
            return zeros
        g = g.reshape(-1)
        return g if uniform else g.to(dtype=layout.dtype, device=layout.device)


def _hvp_forward(loss_fn: LossFn, primals: TensorDict, tangents: TensorDict) -> TensorDict:
    def loss_at(p: TensorDict) -> Tensor:
        return scalar_loss(loss_fn(p), "`loss_fn`")

    try:
        result = torch.func.jvp(torch.func.grad(loss_at), (primals,), (tangents,))
        return {k: t.detach() for k, t in cast(TensorDict, result[1]).items()}
    except RuntimeError:
        # functorch rejects in-place updates of captured tensors (BatchNorm running statistics
        # when the buffers were cloned outside loss_fn); dual tensors do the same product.
        return _hvp_dual(loss_fn, primals, tangents)


def _hvp_dual(loss_fn: LossFn, primals: TensorDict, tangents: TensorDict) -> TensorDict:
    with torch.enable_grad(), fwAD.dual_level():
        leaves = _leaves(primals)
        duals = {k: fwAD.make_dual(leaves[k], tangents[k]) for k in leaves}
        loss = scalar_loss(loss_fn(duals), "`loss_fn`")
        # The backward pass runs on dual tensors, so each gradient carries d/dε ∇L(W + εv).
        grads = torch.autograd.grad(loss, list(duals.values()), allow_unused=True)
        out = [None if g is None else fwAD.unpack_dual(g).tangent for g in grads]
    return _as_dict(leaves, out)


def _hvp_reverse(loss_fn: LossFn, primals: TensorDict, tangents: TensorDict) -> TensorDict:
    leaves, grads, _ = _first_order_graph(loss_fn, primals)
    return _reverse_product(leaves, grads, tangents, retain_graph=False)


def _first_order_graph(
    loss_fn: LossFn, params: Mapping[str, Tensor], keep_grad: bool = True
) -> tuple[TensorDict, tuple[Tensor | None, ...], Tensor]:
    """The gradient with its graph (``create_graph=True``). ``keep_grad=False`` then empties
    the memory of every gradient tensor that owns all of it and that no node of that graph saved
    (nor a parameter shares): a later backward pass through the graph reads the gradients'
    metadata (shape, dtype, device), not their values."""
    leaves = _leaves(params)
    saved: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        saved.add(t.untyped_storage().data_ptr())
        return t.detach()  # the saved values, shared, without a reference back to the graph

    with torch.enable_grad(), contextlib.ExitStack() as stack:
        loss = scalar_loss(loss_fn(leaves), "`loss_fn`")
        if not keep_grad:  # the hooks see what the graph saves (only then: they replace others)
            try:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, _unpack))
            except RuntimeError:  # saved-tensor hooks disabled by the caller: keep the values
                keep_grad = True
        grads = torch.autograd.grad(
            loss, list(leaves.values()), create_graph=True, allow_unused=True
        )
    if not keep_grad:  # a gradient that is all of its memory, no node saved it, no leaf is it
        saved |= {p.untyped_storage().data_ptr() for p in leaves.values()}
        for g in grads:
            if g is None:
                continue
            storage = g.untyped_storage()
            if storage.data_ptr() not in saved and storage.nbytes() == g.numel() * g.itemsize:
                storage.resize_(0)
    return leaves, grads, loss


def _unpack(t: Tensor) -> Tensor:
    return t


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


# --- Internals -----------------------------------------------------------------------------------
def _check_method(method: object) -> None:
    check_choice("method", method, _METHODS)


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


def _as_dict(
    leaves: TensorDict, values: list[Tensor | None] | tuple[Tensor | None, ...]
) -> TensorDict:
    return {
        k: torch.zeros_like(p) if g is None else g.detach()
        for (k, p), g in zip(leaves.items(), values, strict=True)
    }
