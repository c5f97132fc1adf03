r"""Synchronised batch statistics: the global batch's mean and ℓp divisor over all processes.

Under data parallelism each process sees a slice :math:`y^{(r)}` of the global batch. A
synchronised layer normalises every slice with the statistics of the union (:math:`M = \sum_r m_r`
entries per channel, uneven :math:`m_r` allowed):

.. math::
    \mu = \frac1M \sum_r \sum_i y^{(r)}_i, \qquad
    s_p = \Big(\frac1M \sum_r \sum_i |y^{(r)}_i - \mu|^p\Big)^{1/p}, \qquad
    s_\infty = \max_r \max_i |y^{(r)}_i - \mu|,

with one collective per forward for BatchNorm and :math:`p = 2` (an all-gather of each
process's count, mean and variance, merged with the parallel-variance formula, as torch's
``SyncBatchNorm`` does) and two for :math:`p = 1, \infty` (an all-reduce of :math:`[\sum y, m]`,
then an all-reduce of :math:`\sum |y - \mu|` or an all-gather of the per-process maxima of
:math:`|y - \mu|`); each is a ``(C,)``-sized message and its backward one all-reduce. The collectives are autograd functions whose backward
is again a collective (an all-reduce of the gradients), so the gradient a process gets for its
slice is exactly the gradient of the unsynchronised layer applied to the concatenated batch, to
every order (Hessian-vector products work). Running statistics are updated with the global
statistics (unbiased variance with :math:`M/(M-1)`), as one process on the global batch does.

Synchronisation happens only in training mode, with ``torch.distributed`` initialised and more
than one process in the group; otherwise every layer here computes exactly what its
unsynchronised parent computes. Every process must run the same forward and backward passes in
the same order (as DDP training does).

Plain torch; :class:`lightning_bn.SyncNorm` converts a model's layers to these in place.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from lightning_bn._validation import check_bool
from lightning_bn.layers._base import check_dtype, check_eps, check_momentum, check_num_features
from lightning_bn.layers.agreement import check_peers
from lightning_bn.layers.batch_norm import BatchNorm
from lightning_bn.layers.lp_norm import L1Norm, L2Norm, LinfNorm, LpNorm

__all__ = [
    "SYNC_TYPES",
    "PortableSyncBatchNorm",
    "SyncBatchNorm",
    "SyncL1Norm",
    "SyncL2Norm",
    "SyncLinfNorm",
    "SyncLpNorm",
    "all_gather_stack",
    "all_reduce_sum",
    "convert_sync_norm",
    "global_moments",
    "revert_sync_norm",
    "sync_group",
    "unsynchronised_norms",
]

#: Device types on which :class:`torch.nn.SyncBatchNorm` runs its own kernel.
_TORCH_SYNC_DEVICES = ("cuda", "hpu", "xpu")


# --- differentiable collectives ----------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """``y = Σ_r x_r`` on every rank; backward ``∂L/∂x_r = Σ_r' ∂L_r'/∂y`` (again this function)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: Any) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        check_peers(group, x)  # inside a diagnostic pass: no rank failed before this collective
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        # the loss is the sum of the ranks' losses, each of which depends on y
        return _AllReduceSum.apply(grad, ctx.group), None  # type: ignore[attr-defined]


class _AllGatherStack(torch.autograd.Function):
    """``Y = stack(x_0, …, x_{N-1})`` on every rank; backward: this rank's row of ``Σ_r' ∂L_r'/∂Y``."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: Any) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        ctx.rank = dist.get_rank(group)  # type: ignore[attr-defined]
        check_peers(group, x)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        total = _AllReduceSum.apply(grad, ctx.group)  # type: ignore[attr-defined]
        return total[ctx.rank], None  # type: ignore[attr-defined]


def all_reduce_sum(x: Tensor, group: Any = None) -> Tensor:
    r"""Differentiable all-reduce (sum): :math:`y = \sum_r x_r` on every rank.

    Its backward all-reduces the incoming gradients, so with per-rank losses :math:`L_r` the
    gradient reaching :math:`x_r` is :math:`\sum_{r'} \partial L_{r'} / \partial y`; it is twice
    differentiable (the backward is this function again). Every rank must call it in the same
    order, forward and backward.
    """
    out: Tensor = _AllReduceSum.apply(x, group)
    return out


def all_gather_stack(x: Tensor, group: Any = None) -> Tensor:
    """Differentiable all-gather: ``(world_size, *x.shape)``, row r from rank r (equal shapes)."""
    out: Tensor = _AllGatherStack.apply(x, group)
    return out


def sync_group(module: nn.Module) -> Any:
    """The process group a synchronised ``module`` reduces over now, or ``None`` when it would not
    synchronise (eval mode, ``torch.distributed`` not initialised, or a single process)."""
    if not module.training or not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(module, "process_group", None) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


# --- the statistics ------------------------------------------------------------------------------
def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _global_centre(x: Tensor, dims: list[int], group: Any) -> tuple[Tensor, Tensor]:
    """Global per-channel mean ``(C,)`` and entry count ``M`` (0-dim) of a channel-first ``x``."""
    xa = x.to(_acc_dtype(x))
    m = x.numel() // x.shape[1]
    local = torch.cat([xa.sum(dim=dims), xa.new_full((1,), float(m))])
    total = all_reduce_sum(local, group)
    count = total[-1].detach()
    if count <= 1:
        raise ValueError(
            "Expected more than 1 value per channel over all processes when training, "
            f"got {int(count)} (input size here {torch.Size(x.shape)})"
        )
    return total[:-1] / count, count


def _global_mean_power(dev: Tensor, dims: list[int], p: float, count: Tensor, group: Any) -> Tensor:
    """``(1/M) Σ_r Σ_i |dev|^p`` per channel (``p`` = 1 or 2)."""
    local = dev.square().sum(dim=dims) if p == 2 else dev.abs().sum(dim=dims)
    return all_reduce_sum(local, group) / count


def _view(t: Tensor, x: Tensor) -> Tensor:
    return t.view([1, x.shape[1]] + [1] * (x.dim() - 2))


def global_moments(x: Tensor, dims: list[int], group: Any) -> tuple[Tensor, Tensor, Tensor]:
    r"""Global mean, biased variance (both ``(C,)``, float32 or wider) and entry count ``M``.

    One differentiable all-gather of each process's count :math:`m_r`, mean :math:`\mu_r` and
    biased variance :math:`\sigma_r^2` (two-pass, ``torch.var_mean``), merged as

    .. math::
        \mu = \frac1M \sum_r m_r \mu_r, \qquad
        \sigma^2 = \frac1M \sum_r m_r \bigl(\sigma_r^2 + (\mu_r - \mu)^2\bigr)

    (the parallel-variance formula torch's ``SyncBatchNorm`` uses too: as accurate as
    ``torch.var_mean`` on the concatenated batch, no cancellation). Its backward is one all-reduce.
    """
    xa = x.to(_acc_dtype(x))
    m = x.numel() // x.shape[1]
    if m > 0:
        var_r, mean_r = torch.var_mean(xa, dim=dims, correction=0)
    else:  # a process without samples in this step contributes nothing (and no nan)
        var_r = mean_r = xa.sum(dim=dims)
    local = torch.stack([torch.full_like(mean_r, float(m)), mean_r, var_r])
    gathered = all_gather_stack(local, group)  # (world, 3, C)
    counts, means, variances = gathered.unbind(dim=1)
    total = counts.sum(dim=0).detach()
    if total[0] <= 1:
        raise ValueError(
            "Expected more than 1 value per channel over all processes when training, "
            f"got {int(total[0])} (input size here {torch.Size(x.shape)})"
        )
    mean = (counts * means).sum(dim=0) / total
    var = (counts * (variances + (means - mean).square())).sum(dim=0) / total
    return mean, var, total[0]


class _GlobalBatch(nn.Module):
    """What each synchronised layer here adds to its layer: the ``process_group`` argument
    (``None``: the whole world) and the statistics of the global batch while it synchronises.

    A subclass puts this first among its bases and implements :meth:`_global_stats`; the
    layer's own ``_batch_stats`` serves outside DDP training, so the two agree there exactly.
    """

    process_group: Any = None

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _synchronises(self) -> bool:
        return sync_group(self) is not None

    def _batch_stats(self, x: Tensor, dims: list[int], m: int) -> tuple[Tensor, Tensor, Tensor]:
        group = sync_group(self)
        if group is None:
            return super()._batch_stats(x, dims, m)  # type: ignore[misc]
        return self._global_stats(x, dims, m, group)

    def _global_stats(
        self, x: Tensor, dims: list[int], m: int, group: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Centre, divisor and running-statistic update of the global batch over ``group``."""
        raise NotImplementedError


class SyncBatchNorm(_GlobalBatch, BatchNorm):
    r""":class:`~lightning_bn.BatchNorm` with the statistics of the global batch over all processes.

    .. math::
        \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        \mu, \sigma^2 \text{ over the } M = \sum_r m_r \text{ entries of every process},

    running variance updated with the unbiased :math:`\frac{M}{M-1}\sigma^2`. Same arguments and
    ``state_dict`` keys as :class:`~lightning_bn.BatchNorm`, plus ``process_group`` (``None``: the
    whole world). Equal to :class:`~lightning_bn.BatchNorm` outside DDP training; see
    :mod:`lightning_bn.layers.sync`.
    """

    def _global_stats(
        self, x: Tensor, dims: list[int], m: int, group: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean, var, count = global_moments(x, dims, group)
        divisor = torch.sqrt(var + self.eps)
        unbiased = var.detach() * (count / (count - 1))
        return mean.to(x.dtype), divisor.to(x.dtype), unbiased.to(x.dtype)


class SyncLpNorm(_GlobalBatch, LpNorm):
    r""":class:`~lightning_bn.LpNorm` with the centre and divisor of the global batch.

    .. math::
        \mu = \frac1M \sum_{r,i} y^{(r)}_i, \qquad
        s_p = \Big(\frac1M \sum_{r,i} |y^{(r)}_i - \mu|^p\Big)^{1/p}, \qquad
        s_\infty = \max_{r,i} |y^{(r)}_i - \mu|

    (before centring with ``centered_divisor=False``). For :math:`p = \infty` the gradient of the
    maximum goes to the entry that attains it; an exact tie *between processes* is split evenly
    between them rather than between the tied entries (ties have probability zero for continuous
    inputs). Same arguments and ``state_dict`` keys as :class:`~lightning_bn.LpNorm`, plus
    ``process_group``.
    """

    def _global_stats(
        self, x: Tensor, dims: list[int], m: int, group: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self.p == 2 and self.centered_divisor:  # one collective: the merged moments
            centre, var, _ = global_moments(x, dims, group)
            divisor, update = torch.sqrt(var + self.eps), torch.sqrt(var.detach())
            return centre.to(x.dtype), divisor.to(x.dtype), update.to(x.dtype)
        centre, count = _global_centre(x, dims, group)
        xa = x.to(centre.dtype)
        dev = xa - _view(centre, x) if self.centered_divisor else xa
        if math.isinf(self.p):
            local_max = dev.abs().amax(dim=dims) if m > 0 else dev.sum(dim=dims)  # 0: no entry
            s = all_gather_stack(local_max, group).amax(dim=0)
            divisor, update = s + self.eps, s.detach()
        else:
            mean_p = _global_mean_power(dev, dims, self.p, count, group)
            if self.p == 2:
                divisor, update = torch.sqrt(mean_p + self.eps), torch.sqrt(mean_p.detach())
            else:
                divisor, update = mean_p + self.eps, mean_p.detach()
        return centre.to(x.dtype), divisor.to(x.dtype), update.to(x.dtype)


class SyncL1Norm(SyncLpNorm, L1Norm):
    """:class:`SyncLpNorm` with ``p = 1`` (an :class:`~lightning_bn.L1Norm`)."""


class SyncL2Norm(SyncLpNorm, L2Norm):
    """:class:`SyncLpNorm` with ``p = 2`` (an :class:`~lightning_bn.L2Norm`)."""


class SyncLinfNorm(SyncLpNorm, LinfNorm):
    """:class:`SyncLpNorm` with ``p = inf`` (an :class:`~lightning_bn.LinfNorm`)."""


class PortableSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""A synchronised torch BatchNorm that also runs on the CPU (gloo) and is twice differentiable.

    Torch's :class:`torch.nn.SyncBatchNorm` refuses CPU inputs when it would synchronise (and
    DDP refuses a CPU model that contains one). This layer computes the same function (global
    mean and biased variance for the output, unbiased variance with :math:`M/(M-1)` for
    ``running_var``, ``momentum=None`` a cumulative average) with the differentiable collectives of
    this module; on CUDA/HPU/XPU inputs it runs torch's ``SyncBatchNorm`` kernel unless
    ``use_torch_kernel=False`` (torch's backward uses plain all-reduces, so Hessian-vector products
    through it are not those of the global batch). Outside DDP training it is :func:`torch.nn.functional.batch_norm`, as
    torch's BatchNorm. Same parameters, buffers and ``state_dict`` keys as
    :class:`torch.nn.BatchNorm1d` / ``2d`` / ``3d``; it is a ``_BatchNorm``, so torch's tools
    (``torch.optim.swa_utils.update_bn``) see it.

    Args:
        num_features: number of channels ``C``.
        eps, momentum, affine, track_running_stats, process_group, device, dtype: as
            :class:`torch.nn.SyncBatchNorm`.
        use_torch_kernel: on CUDA/HPU/XPU inputs use torch's own synchronised kernel.
    """

    process_group: Any = None
    use_torch_kernel: bool = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        use_torch_kernel: bool = True,
    ) -> None:
        # our messages (argument, value, what is allowed), not torch's from deep inside
        super().__init__(
            check_num_features(num_features),
            check_eps(eps),
            check_momentum(momentum),
            check_bool("affine", affine),
            check_bool("track_running_stats", track_running_stats),
            device=device,
            dtype=check_dtype(dtype),
        )
        self.process_group = process_group
        self.use_torch_kernel = check_bool("use_torch_kernel", use_torch_kernel)

    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def _check_input_dim(self, input: Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        group = sync_group(self)
        if group is None:
            # exactly torch's unsynchronised path (also eval mode and a single process)
            return nn.modules.batchnorm._BatchNorm.forward(self, input)
        if self.use_torch_kernel and input.device.type in _TORCH_SYNC_DEVICES:
            return nn.SyncBatchNorm.forward(self, input)  # type: ignore[arg-type]
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, input.dim())]
        mean, var, count = global_moments(input, dims, group)
        y = (input - _view(mean.to(input.dtype), input)) / _view(
            torch.sqrt(var + self.eps).to(input.dtype), input
        )
        if self.affine:
            y = y * _view(self.weight, input) + _view(self.bias, input)
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                unbiased = var.detach() * (count / (count - 1))
                self.running_mean.mul_(1 - factor).add_(
                    mean.detach().to(self.running_mean), alpha=factor
                )
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var), alpha=factor)
        return y


# --- conversion ----------------------------------------------------------------------------------
#: Unsynchronised type -> synchronised type that :func:`convert_sync_norm` swaps in (exact types).
SYNC_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    BatchNorm: SyncBatchNorm,
    LpNorm: SyncLpNorm,
    L1Norm: SyncL1Norm,
    L2Norm: SyncL2Norm,
    LinfNorm: SyncLinfNorm,
    nn.BatchNorm1d: PortableSyncBatchNorm,
    nn.BatchNorm2d: PortableSyncBatchNorm,
    nn.BatchNorm3d: PortableSyncBatchNorm,
    nn.SyncBatchNorm: PortableSyncBatchNorm,
}

_ORIGINAL = "_lbn_unsync_class"


def _is_unknown_subclass(module: nn.Module) -> bool:
    """A subclass of a convertible type that is not itself one (a user's layer), not converted."""
    known = (*SYNC_TYPES, nn.modules.batchnorm._BatchNorm)
    done = (*SYNC_TYPES.values(), nn.modules.lazy.LazyModuleMixin)
    return isinstance(module, known) and not isinstance(module, done)


def unsynchronised_norms(model: nn.Module) -> list[str]:
    """Qualified names (``""`` for the root) of batch-statistics layers that
    :func:`convert_sync_norm` would convert and that are not synchronised yet: this package's
    layers, and torch's BatchNorm layers except :class:`torch.nn.SyncBatchNorm`."""
    return [
        name
        for name, m in model.named_modules()
        if type(m) in SYNC_TYPES and type(m) is not nn.SyncBatchNorm
    ]


def convert_sync_norm(
    model: nn.Module, process_group: Any = None, *, use_torch_kernel: bool = True
) -> tuple[nn.Module, list[str]]:
    """Make every batch-statistics layer of ``model`` synchronised, in place.

    Each layer's class is switched to its synchronised version (:data:`SYNC_TYPES`): the module
    object, its parameters, buffers, hooks and ``state_dict`` keys stay the same, so optimisers,
    callbacks and anything else holding a reference to it keep working, and
    :func:`revert_sync_norm` switches it back. torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``
    become :class:`PortableSyncBatchNorm` (torch's kernel on GPUs, and it also runs on the CPU),
    this package's layers their ``Sync*`` versions. Subclasses of these types (user-defined
    layers) are left alone and returned by name.

    Args:
        model: the model (or a single layer).
        process_group: the group to synchronise over (``None``: the whole world); a
            ``torch.nn.SyncBatchNorm`` keeps its own group.
        use_torch_kernel: see :class:`PortableSyncBatchNorm`.

    Returns:
        ``(model, skipped)``: the same object, and the qualified names of batch-statistics layers
        (subclasses of the known types) that were not converted.
    """
    skipped: list[str] = []
    for name, module in model.named_modules():
        cls = type(module)
        target = SYNC_TYPES.get(cls)
        if target is None:
            if _is_unknown_subclass(module):
                skipped.append(name)
            continue
        group = module.process_group if cls is nn.SyncBatchNorm else process_group
        module.__class__ = target
        setattr(module, _ORIGINAL, cls)
        module.process_group = group
        if target is PortableSyncBatchNorm:
            module.use_torch_kernel = bool(use_torch_kernel)
    return model, skipped


def revert_sync_norm(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_norm` in place: every converted layer gets its original class back
    (same module objects, parameters and buffers). Returns ``model``."""
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL, None)
        if original is None:
            continue
        module.__class__ = original
        module.__dict__.pop("use_torch_kernel", None)
        if original is not nn.SyncBatchNorm:
            module.__dict__.pop("process_group", None)
    return model
