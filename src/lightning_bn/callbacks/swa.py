"""Lightning's StochasticWeightAveraging, recomputing the running statistics of this package's layers."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import StochasticWeightAveraging as _LightningSWA
from torch import nn
from typing_extensions import override

from lightning_bn.layers._base import _BatchStatNorm

__all__ = ["StochasticWeightAveraging"]


class StochasticWeightAveraging(_LightningSWA):
    """:class:`lightning.pytorch.callbacks.StochasticWeightAveraging` that also knows
    lightning-bn's batch-statistics layers.

    Lightning's callback recomputes the running statistics of torch's ``_BatchNorm`` layers after
    the weights are averaged (an extra epoch of forward passes with a cumulative average) and
    leaves :class:`~lightning_bn.BatchNorm` and the ℓp layers with statistics of weights the
    model no longer has. This subclass resets them too (statistics reset, ``momentum=None`` for
    that epoch, momenta restored afterwards), exactly as it does torch's. Same arguments as
    Lightning's; a drop-in replacement.

    Example:
        >>> from lightning_bn import StochasticWeightAveraging
        >>> swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
    """

    @staticmethod
    @override
    def pl_module_contains_batch_norm(pl_module: pl.LightningModule) -> bool:
        return any(
            isinstance(m, (nn.modules.batchnorm._BatchNorm, _BatchStatNorm))
            for m in pl_module.modules()
        )

    @override
    def reset_batch_norm_and_save_state(self, pl_module: pl.LightningModule) -> None:
        super().reset_batch_norm_and_save_state(pl_module)
        for module in pl_module.modules():
            if isinstance(module, _BatchStatNorm) and module.track_running_stats:
                module.reset_running_stats()
                self.momenta[module] = module.momentum  # type: ignore[index]
                module.momentum = None
