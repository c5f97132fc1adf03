"""The wiring shared by the callbacks that step along the gradient (Lipschitz, Smoothness)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl

from lightning_bn._types import LossFn
from lightning_bn._validation import check_bool, check_step_sizes
from lightning_bn.callbacks.base import DiagnosticCallback
from lightning_bn.diagnostics.landscape import DEFAULT_STEP_SIZES, resolve_steps
from lightning_bn.probe.batched import VmapChunkSize

__all__ = ["AlongGradientCallback"]


class AlongGradientCallback(DiagnosticCallback):
    """A :class:`DiagnosticCallback` that evaluates the loss at :math:`W^t - \\eta g_t` over a grid
    of step sizes: it holds ``step_sizes`` and ``relative_to_lr``, records them in the run's
    settings and turns them into the step's absolute sizes (:meth:`_steps`).

    Args:
        step_sizes: the grid (``None``: the paper's, relative to the learning rate).
        relative_to_lr: whether a step size multiplies each parameter group's learning rate.
        every_n_steps, loss_fn, budget, name, vmap_chunk_size: as for
            :class:`~lightning_bn.callbacks.base.DiagnosticCallback`.
    """

    def __init__(
        self,
        every_n_steps: int | Literal["auto"],
        step_sizes: Sequence[float] | None,
        relative_to_lr: bool,
        loss_fn: LossFn | None,
        budget: float | None,
        name: str | None,
        vmap_chunk_size: VmapChunkSize,
    ) -> None:
        super().__init__(every_n_steps, loss_fn, budget, name, vmap_chunk_size)
        self.step_sizes = check_step_sizes(step_sizes)
        self.relative_to_lr = check_bool("relative_to_lr", relative_to_lr)

    def _settings(self) -> dict[str, Any]:
        return {
            **super()._settings(),
            "step_sizes": self.step_sizes,
            "relative_to_lr": self.relative_to_lr,
        }

    @property
    def grid_size(self) -> int:
        """The number of step sizes (points along the gradient) one measurement evaluates."""
        return len(self.step_sizes or DEFAULT_STEP_SIZES)

    def _steps(self, trainer: pl.Trainer) -> tuple[list[float], dict[str, float] | None]:
        """The step sizes η at this step and the per-parameter scales
        (:func:`~lightning_bn.diagnostics.landscape.resolve_steps`)."""
        return resolve_steps(
            self._param_lrs(trainer, self.probe.module),
            self.step_sizes,
            self.relative_to_lr,
        )
