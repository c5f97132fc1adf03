"""One spelling of Lightning's ``on_train_batch_end`` for the callbacks that need three of its args."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

__all__ = ["AfterTrainBatch"]


class AfterTrainBatch(pl.Callback):
    """A callback acting after each training batch on the trainer, the module and the step's
    ``outputs``.

    Lightning calls ``on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)``; the
    package's callbacks that act there use neither the batch nor its index, so they implement
    :meth:`after_train_batch` and the hook's signature is written here once.
    """

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.after_train_batch(trainer, pl_module, outputs)

    def after_train_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any
    ) -> None:
        """What to do once the optimiser has stepped on a batch (``outputs``: the step's return)."""
        raise NotImplementedError
