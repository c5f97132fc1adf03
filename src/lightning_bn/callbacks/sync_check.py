"""The warning for ``Trainer(sync_batchnorm=True)``, which leaves this package's layers alone."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_bn.layers.sync import unsynchronised_norms

__all__ = ["warn_unsynchronised_norms"]


def warn_unsynchronised_norms(trainer: pl.Trainer, model: nn.Module) -> bool:
    """Warn when ``Trainer(sync_batchnorm=True)`` will leave this package's layers unsynchronised.

    Lightning's ``TorchSyncBatchNorm`` converts only torch's ``_BatchNorm`` layers. Called from the
    ``setup`` of lightning-bn's callbacks (the diagnostic ones and ``NoiseInjectionCallback``);
    returns whether it warned.
    """
    layer_sync = getattr(trainer.strategy, "_layer_sync", None)
    if not isinstance(layer_sync, TorchSyncBatchNorm):
        return False
    modules = dict(model.named_modules())
    names = [
        f"{name or '<root>'} ({type(modules[name]).__name__})"
        for name in unsynchronised_norms(model)
        if not isinstance(modules[name], nn.modules.batchnorm._BatchNorm)
    ]
    if not names:
        return False
    rank_zero_warn(
        "Trainer(sync_batchnorm=True) synchronises only torch's BatchNorm layers; these "
        f"lightning-bn layers stay per-process: {', '.join(names)}. Use "
        "`Trainer(plugins=[lightning_bn.SyncNorm()])` instead of `sync_batchnorm=True` to "
        "synchronise them too."
    )
    return True
