r"""The loss landscape along the gradient (Santurkar et al. 2018, Fig. 4) and Theorem 4.1 per layer.

Plain torch. At the weights :math:`W^t` of a training step, with :math:`g_t = \nabla L(W^t)` on the
step's batch and a grid of step sizes :math:`\eta`:

- variation of the loss (Fig. 4a): :math:`L(W^t - \eta g_t)` over the grid;
- gradient predictiveness (Fig. 4b): :math:`\lVert g_t - \nabla L(W^t - \eta g_t) \rVert_2`;
- effective β-smoothness (Fig. 4c):
  :math:`\beta_t = \max_\eta \lVert g_t - \nabla L(W^t - \eta g_t)\rVert_2 / \lVert \eta g_t\rVert_2`;
- curvature: the dominant Hessian eigenvalue and :math:`g^\top H g / \lVert g\rVert^2`;
- per normalisation layer, :math:`\lVert \nabla_y L\rVert` for its input y, and for BatchNorm the
  ratio of the two sides of Theorem 4.1 (:func:`lightning_bn.diagnostics.bounds.theorem41_bound`).

Every evaluation goes through :class:`~lightning_bn.probe.Probe` (the model is never touched) and
every gradient is averaged over ranks before it is used (:class:`~lightning_bn.probe.Collective`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bn._validation import check_int
from lightning_bn.diagnostics.bounds import theorem41_bound
from lightning_bn.diagnostics.curvature import hessian_metrics
from lightning_bn.diagnostics.global_bounds import theorem41_shares
from lightning_bn.diagnostics.hvp import HessianVectorProduct
from lightning_bn.diagnostics.paramvec import dict_norm, dict_sub_
from lightning_bn.layers import NORM_TYPES, is_batchnorm, is_norm_layer
from lightning_bn.layers.agreement import check_peers
from lightning_bn.layers.fused import register_norm_output_hook
from lightning_bn.layers.sync import sync_group
from lightning_bn.probe import Collective, Params, Probe, StepRecord, accepts_batch_triple

__all__ = [
    "DEFAULT_STEP_SIZES",
    "NORM_LAYER_TYPES",
    "LayerCapture",
    "SmoothnessResult",
    "compute_lipschitz",
    "compute_smoothness",
    "norm_layers",
    "resolve_max_iters",
    "resolve_step_sizes",
    "resolve_steps",
    "scaled_direction",
]

#: The default grid, relative to the learning rate: 0.5, 0.8, ..., 3.8 and 4.0 (13 values).
DEFAULT_STEP_SIZES: tuple[float, ...] = (*(round(0.5 + 0.3 * k, 10) for k in range(12)), 4.0)

#: Layers whose input-gradient norm the Lipschitz diagnostic logs: every normalisation layer
#: (the registry's :data:`~lightning_bn.layers.NORM_TYPES`).
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = NORM_TYPES


def resolve_step_sizes(
    lr: float, step_sizes: Sequence[float] | None, relative_to_lr: bool
) -> list[float]:
    """Absolute step sizes η: the grid times ``lr`` when ``relative_to_lr``, else the grid itself."""
    grid = list(step_sizes) if step_sizes is not None else list(DEFAULT_STEP_SIZES)
    if step_sizes is None or relative_to_lr:
        return [float(lr) * s for s in grid]
    return [float(s) for s in grid]


def resolve_steps(
    param_lrs: Mapping[str, float], step_sizes: Sequence[float] | None, relative_to_lr: bool
) -> tuple[list[float], dict[str, float] | None]:
    r"""Step sizes and per-parameter scales for :func:`compute_lipschitz`/:func:`compute_smoothness`.

    The probe points are :math:`W - c\,(s \odot g)`: with relative step sizes (the default grid,
    or ``relative_to_lr``) parameter p of an optimiser group with learning rate
    :math:`\mathrm{lr}_p` moves by :math:`c\,\mathrm{lr}_p\,g_p` (a group with lr 0 stays
    put); with absolute ones every parameter moves by :math:`\eta\, g_p`.

    Args:
        param_lrs: each trainable parameter's group learning rate, by name.
        step_sizes: the grid (``None``: :data:`DEFAULT_STEP_SIZES`, relative).
        relative_to_lr: whether the grid is relative to the learning rates.

    Returns:
        ``(steps, scales)``: ``scales`` is ``None`` when every parameter moves alike (absolute
        steps, or one learning rate for all, folded into ``steps`` as :math:`c\,\mathrm{lr}`),
        else ``param_lrs`` with ``steps`` the relative :math:`c`.
    """
    grid = list(step_sizes) if step_sizes is not None else list(DEFAULT_STEP_SIZES)
    if step_sizes is not None and not relative_to_lr:
        return [float(s) for s in grid], None
    lrs = set(param_lrs.values())
    if len(lrs) <= 1:
        return resolve_step_sizes(next(iter(lrs), 0.0), grid, True), None
    return [float(s) for s in grid], dict(param_lrs)


def scaled_direction(grad: Mapping[str, Tensor], scales: Mapping[str, float] | None) -> Params:
    r""":math:`s \odot g` (the gradient itself when ``scales`` is ``None``; 0 for a parameter
    without a scale)."""
    if scales is None:
        return dict(grad)
    return {n: g * scales.get(n, 0.0) for n, g in grad.items()}


def norm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Qualified names and modules of every normalisation layer (ours, torch's and RMS norms
    libraries write themselves: :func:`lightning_bn.layers.is_norm_layer`)."""
    return [(n, m) for n, m in module.named_modules() if n and is_norm_layer(m)]


def _is_batchnorm(module: nn.Module) -> bool:
    return is_batchnorm(module) and module.training


@dataclass
class _Captured:
    y: Tensor | None = None
    z: Tensor | None = None
    grad_y: Tensor | None = None
    grad_z: Tensor | None = None
    weight: Tensor | None = None


def _store_grad(grads: dict[str, Tensor], key: str) -> Any:
    """A tensor hook that writes the gradient into ``grads[key]``.

    The closure holds only the plain dict of gradients, never the record or the tensor it is
    registered on: a hook stored on a tensor that (through a closure) holds an object holding that
    tensor is a reference cycle through autograd, which Python's collector cannot see, and kept
    every captured activation (and its graph) alive for the rest of the process.
    """

    def hook(grad: Tensor) -> None:
        grads[key] = grad.detach()

    return hook


@dataclass
class LayerCapture:
    """Forward hooks that keep, per layer, its input y, output z and (after backward) their
    gradients. Register with :meth:`attach` around one probe pass and :meth:`detach` after;
    :meth:`clear` drops what was captured."""

    layers: Sequence[tuple[str, nn.Module]]
    store: dict[str, _Captured] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)
    # gradients written by the tensor hooks, keyed "<layer>/y" and "<layer>/z": kept apart from
    # ``store`` so that no hook closure refers to an object that holds the hooked tensor
    _grads: dict[str, Tensor] = field(default_factory=dict)

    def attach(self) -> None:
        # prepend: see the layer's own output, before hooks of others (e.g. injected noise)
        # replace it, so that the gradient is taken with respect to the layer's output; in a
        # layer that applies an activation after normalising, z is the normalisation's output
        for name, module in self.layers:
            hook = self._hook(name)
            self._handles.append(register_norm_output_hook(module, hook, name=name, prepend=True))

    def detach(self) -> None:
        """Remove the module and tensor hooks and move the gradients into the records."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, rec in self.store.items():
            rec.grad_y = self._grads.pop(f"{name}/y", rec.grad_y)
            rec.grad_z = self._grads.pop(f"{name}/z", rec.grad_z)
        self._grads.clear()

    def clear(self) -> None:
        """Forget every captured tensor (the activations hold the probe's autograd graph)."""
        self.store.clear()
        self._grads.clear()

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in self.store or not args or not isinstance(args[0], Tensor):
                return
            rec = _Captured(y=args[0], z=output if isinstance(output, Tensor) else None)
            weight = getattr(module, "weight", None)
            rec.weight = weight.detach() if isinstance(weight, Tensor) else None
            self.store[name] = rec
            # the tensor hooks' handles are removed in detach(), after the backward
            if rec.y is not None and rec.y.requires_grad:
                self._handles.append(rec.y.register_hook(_store_grad(self._grads, f"{name}/y")))
            if rec.z is not None and rec.z.requires_grad:
                self._handles.append(rec.z.register_hook(_store_grad(self._grads, f"{name}/z")))

        return hook


def _layer_metrics(
    layers: Sequence[tuple[str, nn.Module]], capture: LayerCapture, coll: Collective
) -> dict[str, float]:
    """Activation-gradient norms and Theorem 4.1 ratios, reduced over ranks.

    With N ranks the global loss is the mean of the ranks' losses, so the gradient w.r.t. one
    rank's activations is that rank's gradient divided by N, and the squared norm over the global
    batch is the sum over ranks: :math:`\\lVert\\nabla_y L\\rVert^2 = \\frac{1}{N^2}\\sum_r
    \\lVert\\nabla_{y_r} L_r\\rVert^2`. Theorem 4.1 holds per rank (each rank normalises with its
    own batch statistics), so its two sides are summed over ranks before the ratio; a synchronised
    layer normalises with the global batch's statistics, and its sides are those of the global
    batch (:func:`~lightning_bn.diagnostics.global_bounds.theorem41_shares`).
    """
    names: list[str] = []
    values: list[Tensor] = []
    for name, module in layers:
        rec = capture.store.get(name)
        if rec is None or rec.grad_y is None:
            continue
        sq = rec.grad_y.double().square().sum()
        lhs = rhs = torch.zeros((), dtype=torch.float64)
        if _is_batchnorm(module) and rec.y is not None and rec.grad_z is not None:
            channel_dim = -1 if getattr(module, "channels_last", False) else 1
            eps = float(getattr(module, "eps", 0.0))
            if sync_group(module) is not None:  # normalised with the global batch's statistics
                shares = theorem41_shares(
                    rec.y.detach(),
                    rec.grad_y,
                    rec.grad_z,
                    rec.weight,
                    eps,
                    all_reduce_sum=lambda t: coll.mean(t) * coll.world_size,
                    world_size=coll.world_size,
                    channel_dim=channel_dim,
                )
                lhs, rhs = shares[0].double().sum(), shares[1].double().sum()
            else:
                res = theorem41_bound(
                    rec.y.detach(), rec.grad_y, rec.grad_z, rec.weight, eps, channel_dim=channel_dim
                )
                lhs, rhs = res.lhs.double().sum(), res.rhs.double().sum()
        names.append(name)
        values.append(torch.stack([sq, lhs, rhs, torch.tensor(float(_is_batchnorm(module)))]))
    if not values:
        return {}
    stacked = coll.mean(torch.stack(values).to(dtype=torch.float64)) * coll.world_size
    out: dict[str, float] = {}
    n2 = float(coll.world_size) ** 2
    for name, (sq, lhs, rhs, is_bn) in zip(names, stacked.tolist(), strict=True):
        out[f"{name}/act_grad_norm"] = math.sqrt(sq / n2)
        if is_bn:
            out[f"{name}/thm41_ratio"] = lhs / rhs if rhs > 0 else math.nan
    return out


def _norm(tensors: Mapping[str, Tensor]) -> float:
    """Euclidean norm of all entries: per-tensor norms in the tensors' dtype (a float32 norm is
    accurate to about 1e-7 relative, float64 copies of every tensor would cost a sizeable part of
    a gradient pass), combined in float64."""
    return float(dict_norm(tensors, dtype=torch.float64))


@accepts_batch_triple(2)
def compute_lipschitz(
    probe: Probe,
    params: Params,
    step: StepRecord,
    step_sizes: Sequence[float],
    layers: Sequence[tuple[str, nn.Module]] = (),
    collective: Collective | None = None,
    *,
    scales: Mapping[str, float] | None = None,
) -> dict[str, float]:
    r"""Loss variation along the gradient, gradient norm and per-layer Theorem 4.1 quantities.

    Args:
        probe: evaluates the model at a parameter point.
        params: :math:`W^t` (all parameters of the model).
        step: the measured step (batch, batch index, random state); the older form
            ``batch, batch_idx, rng`` in its place still works.
        step_sizes: absolute step sizes :math:`\eta` (with ``scales``: the relative :math:`c`).
        layers: normalisation layers to report (``(name, module)``).
        collective: cross-rank averaging (DDP semantics).
        scales: per-parameter step scales :math:`s_p` (the learning rate of each parameter's
            optimiser group, :func:`resolve_steps`): the grid points are then
            :math:`W - c\,(s \odot g_t)`; ``None`` moves every parameter by :math:`\eta g_t`.

    Returns:
        ``loss`` (:math:`L(W^t)`), ``loss_min``, ``loss_max``, ``loss_range`` of
        :math:`L(W^t - \eta g_t)` over the grid, ``grad_norm`` (:math:`\lVert g_t\rVert_2`), and
        per layer ``<name>/act_grad_norm`` (:math:`\lVert\nabla_y L\rVert_2`) and, for a
        BatchNorm layer in training mode, ``<name>/thm41_ratio`` (:math:`\sum_j \mathrm{lhs}_j /
        \sum_j \mathrm{rhs}_j`).
    """
    coll = collective if collective is not None else Collective()
    names = probe.trainable_names()
    capture = LayerCapture(layers)

    def gradient_pass() -> tuple[Tensor, Params]:
        capture.attach()
        try:
            return probe.loss_and_grad(params, step, wrt=names)
        finally:
            capture.detach()

    try:
        loss, grad_local = coll.guard(gradient_pass)
        layer_values = _layer_metrics(layers, capture, coll)
    finally:
        capture.clear()  # the activations and their gradients: nothing outlives the measurement
    grad = coll.mean_dict(grad_local)
    loss = coll.mean(loss)

    direction = scaled_direction(grad, scales)

    def grid_pass() -> Tensor:
        return probe.losses_along(params, direction, step_sizes, step)

    losses = coll.mean(coll.guard(grid_pass)).double()
    lo, hi = losses.min(), losses.max()
    values = torch.stack(
        [loss.double(), lo, hi, hi - lo, dict_norm(grad, dtype=torch.float64)]
    ).tolist()  # one transfer to the host
    out = dict(
        zip(("loss", "loss_min", "loss_max", "loss_range", "grad_norm"), values, strict=True)
    )
    out.update(layer_values)
    return out


def resolve_max_iters(
    max_iters: int | None, power_iters: int | None, *, stacklevel: int = 2, default: int = 20
) -> int:
    """The cap on Hessian-vector products, from ``max_iters`` or its deprecated name.

    ``power_iters`` capped Lanczos too, so the argument is now ``max_iters``; the old name still
    works with a :class:`DeprecationWarning` (and is checked under its own name).

    Raises:
        TypeError: both names given.
        ValueError: not an integer >= 1 (the message names the argument that was passed).
    """
    if power_iters is not None:
        if max_iters is not None:
            raise TypeError("Expected one of `max_iters` and `power_iters` (deprecated), got both")
        warnings.warn(
            "`power_iters` is deprecated (it caps Lanczos too): use `max_iters`",
            DeprecationWarning,
            stacklevel=stacklevel + 1,
        )
        return check_int("power_iters", power_iters, minimum=1)
    if max_iters is None:
        return default
    return check_int("max_iters", max_iters, minimum=1)


class _AveragedProduct:
    """A :class:`HessianVectorProduct` averaged over ranks, every product guarded (DDP semantics).

    A :class:`~lightning_bn.diagnostics.hvp.FlatOperator` (one all-reduce per product)."""

    def __init__(self, op: HessianVectorProduct, collective: Collective) -> None:
        self.op, self.collective, self.layout = op, collective, op.layout

    def __call__(self, vector: Mapping[str, Tensor]) -> Params:
        return self.collective.mean_dict(self.collective.guard(lambda: self.op(vector)))

    def matvec(self, vector: Tensor, out: Tensor | None = None) -> Tensor:
        return self.collective.mean_(self.collective.guard(lambda: self.op.matvec(vector, out)))


@dataclass
class SmoothnessResult:
    """Metrics of one smoothness measurement and the eigenvector for the next warm start."""

    metrics: dict[str, float]
    eigenvector: Params | None


@accepts_batch_triple(2)
def compute_smoothness(
    probe: Probe,
    params: Params,
    step: StepRecord,
    step_sizes: Sequence[float],
    *,
    hessian: bool = True,
    max_iters: int | None = None,
    tol: float = 1e-3,
    init: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    hvp_method: str = "reverse",
    eig_algorithm: str = "lanczos",
    collective: Collective | None = None,
    power_iters: int | None = None,
    scales: Mapping[str, float] | None = None,
    basis_size: int | None = None,
    reuse_init: bool = False,
) -> SmoothnessResult:
    r"""Gradient predictiveness, effective β-smoothness and Hessian curvature at :math:`W^t`.

    Args:
        probe: evaluates the model at a parameter point.
        params: :math:`W^t` (all parameters of the model).
        step: the measured step (batch, batch index, random state); the older form
            ``batch, batch_idx, rng`` in its place still works.
        step_sizes: absolute step sizes :math:`\eta`.
        hessian: also compute the Hessian quantities.
        max_iters: most Hessian-vector products of the eigenvalue iteration, either algorithm
            (for Lanczos also the most parameter-sized vectors kept in memory); default 20.
        tol: relative change of the eigenvalue estimate that stops the iteration.
        init: warm start (the previous measurement's eigenvector) or ``None``.
        generator: random source of a cold start (never the global RNG).
        hvp_method: ``"reverse"`` (keeps the first-order graph: each product is one backward),
            ``"forward"`` or ``"auto"`` (forward-over-reverse, reverse fallback).
        eig_algorithm: ``"lanczos"`` (default, as in ``SmoothnessCallback``: Lanczos with full
            reorthogonalisation, the same quantity in fewer products) or ``"power"`` (power
            iteration, two vectors of memory); see
            :func:`~lightning_bn.diagnostics.eigen.top_hessian_eigenvalue`.
        collective: cross-rank averaging (DDP semantics); Hessian-vector products are averaged
            like gradients.
        power_iters: deprecated name of ``max_iters`` (a :class:`DeprecationWarning`).
        scales: per-parameter step scales :math:`s_p` (each parameter's group learning rate,
            :func:`resolve_steps`): the grid points are :math:`W^t - c\,(s \odot g_t)` and the
            step length in ``beta_eff`` is :math:`\lVert c\,(s \odot g_t)\rVert_2`; ``None``
            moves every parameter by :math:`\eta g_t`.
        basis_size: most Lanczos vectors kept (restarted beyond; ``None``: ``max_iters``; 0: no
            basis, the recurrence run twice).
        reuse_init: Lanczos may use ``init``'s memory once read (see ``top_hessian_eigenvalue``).

    Returns:
        :class:`SmoothnessResult` with ``grad_diff_min``, ``grad_diff_max`` (of
        :math:`\lVert g_t - \nabla L(W^t - \eta g_t)\rVert_2` over the grid), ``beta_eff``
        (:math:`\max_\eta` of that norm over the step's length :math:`\lVert \eta g_t
        \rVert_2`), and with
        ``hessian``: ``hessian_top_eig`` (dominant, i.e. largest-magnitude, eigenvalue with its
        sign), ``hessian_iters`` (Hessian-vector products it took), ``hessian_converged`` (1.0 if
        the iteration met ``tol`` within ``max_iters``, else 0.0), ``grad_curvature`` (:math:`g^\top H g / \lVert g\rVert^2`).
    """
    max_iters = resolve_max_iters(max_iters, power_iters, stacklevel=3)
    coll = collective if collective is not None else Collective()
    names = probe.trainable_names()
    trainable = {k: params[k] for k in names}

    def loss_fn(point: Mapping[str, Tensor]) -> Tensor:
        return probe.loss({**params, **point}, step)

    op: HessianVectorProduct | None = None

    def gradient_pass() -> Params:
        nonlocal op
        if hessian:
            op = HessianVectorProduct(loss_fn, trainable, method=hvp_method)  # type: ignore[arg-type]
            return op.grad
        return probe.loss_and_grad(params, step, wrt=names)[1]

    grad = coll.mean_dict(coll.guard(gradient_pass))
    g_norm = _norm(grad)
    direction = scaled_direction(grad, scales)
    d_norm = g_norm if scales is None else _norm(direction)

    # Each point reduced as it comes (one gradient held); under DDP all ranks agree no pass
    # failed, then average: the same collectives in the same order everywhere (in place).
    def distance(g_local: Params) -> Tensor:
        if coll.world_size > 1:
            check_peers(coll.group, next(iter(g_local.values())))
        return dict_norm(dict_sub_(coll.mean_dict(g_local), grad), dtype=torch.float64)

    def grid_pass() -> list[tuple[Tensor, Tensor]]:
        return probe.loss_and_grad_along(params, direction, step_sizes, step, names, distance)

    norms = [g for _, g in coll.guard(grid_pass)]
    diffs = torch.stack(norms).tolist() if norms else []
    betas = [
        diff / (abs(eta) * d_norm) if eta != 0 and d_norm > 0 else math.nan
        for eta, diff in zip(step_sizes, diffs, strict=True)
    ]
    metrics = {
        "grad_diff_min": min(diffs),
        "grad_diff_max": max(diffs),
        "beta_eff": max((b for b in betas if not math.isnan(b)), default=math.nan),
    }
    eigenvector: Params | None = None
    if hessian:
        assert op is not None
        hvp_fn = _AveragedProduct(op, coll)
        same = init is not None and init.keys() == trainable.keys()
        start = {k: init[k].to(trainable[k]) for k in trainable} if init and same else None
        hessian_part, eigenvector = hessian_metrics(
            hvp_fn,
            grad,
            start,
            max_iters=max_iters,
            tol=tol,
            generator=generator,
            like=trainable,
            algorithm=eig_algorithm,
            warn=False,  # logged as hessian_converged instead
            basis_size=basis_size,
            reuse_init=reuse_init,
        )
        metrics.update(hessian_part)
    return SmoothnessResult(metrics=metrics, eigenvector=eigenvector)
