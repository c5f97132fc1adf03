"""Evaluate a model's loss and gradients at any parameter point, without touching the model.

Plain torch (no Lightning import); every diagnostic goes through :class:`Probe`.

- :mod:`~lightning_bn.probe.record`: what a probe needs of one training step
  (:class:`StepRecord`, :class:`RNGState`, :func:`copy_batch`) and :func:`in_probe`;
- :mod:`~lightning_bn.probe.layout`: putting a parameter point into the module and keeping the
  evaluation from leaving traces (``self.log``, torchmetrics metrics, running statistics);
- :mod:`~lightning_bn.probe.core`: :class:`Probe` itself;
- :mod:`~lightning_bn.probe.batched`: the grid of points under :func:`torch.func.vmap`;
- :mod:`~lightning_bn.probe.collective`: reductions across ranks with DDP semantics.
"""

from __future__ import annotations

from lightning_bn._types import LossFn, Params
from lightning_bn.errors import DiagnosticSkipped
from lightning_bn.probe.collective import Collective
from lightning_bn.probe.core import Probe
from lightning_bn.probe.record import (
    RNGState,
    StepRecord,
    accepts_batch_triple,
    copy_batch,
    in_probe,
)

__all__ = [
    "Collective",
    "DiagnosticSkipped",
    "LossFn",
    "Params",
    "Probe",
    "RNGState",
    "StepRecord",
    "accepts_batch_triple",
    "copy_batch",
    "in_probe",
]
