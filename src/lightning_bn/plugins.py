"""Lightning plugins: :class:`SyncNorm` synchronises every batch-statistics layer under DDP."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_bn.layers.sync import convert_sync_norm, revert_sync_norm

__all__ = ["SyncNorm"]


class SyncNorm(LayerSync):
    r"""A ``LayerSync`` plugin that synchronises torch's BatchNorm layers *and* this package's.

    Use it in place of ``Trainer(sync_batchnorm=True)`` (Lightning's ``TorchSyncBatchNorm``, which
    converts only torch's ``_BatchNorm`` layers):

    .. code-block:: python

        trainer = pl.Trainer(strategy="ddp", devices=4, plugins=[SyncNorm()])

    At the start of ``fit`` (before DDP wraps the model) every layer is switched in place to its
    synchronised version (:func:`lightning_bn.layers.sync.convert_sync_norm`): ``BatchNorm``,
    ``L1Norm``, ``L2Norm``, ``LinfNorm``, ``LpNorm`` of this package to ``SyncBatchNorm``,
    ``SyncL1Norm``, … (the global batch's mean and ℓp divisor, exact gradients through the
    collectives, running statistics of the global batch, uneven per-rank batches weighted by
    their sizes), and torch's ``BatchNorm1d/2d/3d`` to
    :class:`~lightning_bn.layers.sync.PortableSyncBatchNorm`, a ``torch.nn.SyncBatchNorm`` that
    uses torch's kernel on GPUs and also runs on the CPU (gloo), where torch's refuses. The module
    objects stay the same (the diagnostic callbacks, which resolve layers at setup, keep
    measuring them); ``revert`` switches them back at the end of ``fit``. With one process, or
    outside training, every layer computes exactly what it did before.

    Args:
        process_group: the group to synchronise over (``None``: all processes).
        use_torch_kernel: use torch's synchronised kernel for torch's BatchNorm layers on
            CUDA/HPU/XPU. Its backward uses plain (non-differentiable) all-reduces and GPU-only
            kernels, so Hessian-vector products through it (the
            :class:`~lightning_bn.SmoothnessCallback`'s curvature) are not those of the global
            batch: pass ``False`` to use this package's twice-differentiable implementation there
            as well (not run on a GPU so far).

    Raises:
        TypeError: ``use_torch_kernel`` not a bool.
    """

    def __init__(self, process_group: Any = None, *, use_torch_kernel: bool = True) -> None:
        if not isinstance(use_torch_kernel, bool):
            raise TypeError(
                f"Expected argument `use_torch_kernel` to be a bool, but got {use_torch_kernel!r}"
            )
        self.process_group = process_group
        self.use_torch_kernel = use_torch_kernel

    def apply(self, model: nn.Module) -> nn.Module:
        """Switch every batch-statistics layer of ``model`` to its synchronised version (in place).

        Raises:
            TypeError: ``model`` is not a ``torch.nn.Module``.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected argument `model` of SyncNorm.apply to be a torch.nn.Module, but got"
                f" {model!r}"
            )
        model, skipped = convert_sync_norm(
            model, self.process_group, use_torch_kernel=self.use_torch_kernel
        )
        if skipped:
            rank_zero_warn(
                "SyncNorm leaves these batch-statistics layers unsynchronised (subclasses of "
                f"BatchNorm-like types it does not know): {', '.join(skipped)}"
            )
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        """Switch the layers converted by :meth:`apply` back to their original classes."""
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected argument `model` of SyncNorm.revert to be a torch.nn.Module, but got"
                f" {model!r}"
            )
        return revert_sync_norm(model)
