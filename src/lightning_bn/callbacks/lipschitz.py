"""LipschitzCallback: the loss along the gradient, gradient norms and Theorem 4.1 (paper Fig. 4a)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn

from lightning_bn._types import LossFn
from lightning_bn.callbacks._docs import fill_doc
from lightning_bn.callbacks._guards import drop_empty_grid
from lightning_bn.callbacks.along_gradient import AlongGradientCallback
from lightning_bn.diagnostics.landscape import compute_lipschitz, norm_layers
from lightning_bn.errors import DiagnosticWarning
from lightning_bn.logging.keys import LoggedKey, LoggedKeys, Panel, peak_memory_keys
from lightning_bn.probe import StepRecord
from lightning_bn.probe.batched import VmapChunkSize

__all__ = ["LipschitzCallback"]

#: Tolerance above 1 of the Theorem 4.1 ratio before a warning (floating-point rounding).
THM41_TOLERANCE = 1e-4


@fill_doc
class LipschitzCallback(AlongGradientCallback):
    r"""Measure how much the loss varies along the gradient, and the Lipschitzness of the loss.

    At a measured step t, on the step's batch (same dropout masks, batch statistics, nothing of
    the model or optimiser touched), with :math:`g_t = \nabla L(W^t)` and the step sizes
    :math:`\eta` (default :math:`\eta = \mathrm{lr} \times \{0.5, 0.8, \dots, 3.8, 4.0\}`, lr read
    from the optimiser at that step; with several parameter groups a relative step c moves each
    group by :math:`c \times \mathrm{lr}_\text{group} \times g_\text{group}`, so a group with
    lr 0 stays put, and absolute step sizes move every parameter by :math:`\eta g`):

    - the loss :math:`L(W^t - \eta g_t)` over the grid (the paper's Fig. 4a draws the band between
      its minimum and maximum over training; a smaller band means a smoother landscape);
    - :math:`\lVert g_t \rVert_2`;
    - per normalisation layer, :math:`\lVert \nabla_y L \rVert_2` for the layer's input y (the left
      side of Theorem 4.1), and for every BatchNorm layer (torch's or ours, in training mode) the
      ratio of the two sides of Theorem 4.1,

      .. math::
          \mathrm{thm41\_ratio} = \frac{\sum_j \lVert \nabla_{y_j} L \rVert^2}
              {\sum_j \frac{\gamma_j^2}{s_j^2}\bigl(\lVert g_j\rVert^2 - \frac1m\langle 1, g_j
              \rangle^2 - \frac1m \langle g_j, \hat y_j\rangle^2\bigr)},

      channels j, :math:`g_j = \partial L/\partial z_j` (the layer's output), m entries per
      channel (batch × spatial), :math:`s_j = \sqrt{\sigma_j^2 + \epsilon}`. The theorem says
      ratio ≤ 1 (= 1 for ε = 0). A value above 1 + 1e-4 is logged as it is and warned about.

    Cost of one measurement: one gradient pass plus one forward pass per step size.

    Logged metrics: ``lipschitz/loss`` (:math:`L(W^t)`), ``lipschitz/loss_min``,
    ``lipschitz/loss_max``, ``lipschitz/loss_range``, ``lipschitz/grad_norm``,
    ``lipschitz/<layer>/act_grad_norm``, ``lipschitz/<layer>/thm41_ratio``.

    Args:
        %(every_n_steps)s
        %(budget)s
        %(step_sizes)s
        %(loss_fn)s
        %(name)s
        vmap_chunk_size: how the grid is evaluated (:mod:`lightning_bn.probe.batched`): ``"auto"``
            (default) under :func:`torch.func.vmap` on CUDA, point by point elsewhere; ``None``
            always point by point; an ``int``, under ``vmap`` with at most that many points per
            call. The values are the same (to float rounding).

    Raises:
        %(raises)s

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[LipschitzCallback(every_n_steps=100)])  # doctest: +SKIP
    """

    logged_keys = LoggedKeys(
        prefix="lipschitz/",
        keys=(
            LoggedKey("lipschitz/loss", "last"),
            LoggedKey("lipschitz/loss_min", "min"),
            *peak_memory_keys("lipschitz"),
            LoggedKey("lipschitz/loss_max", "max"),
            LoggedKey("lipschitz/loss_range", "max"),
            LoggedKey("lipschitz/grad_norm", "max"),
            LoggedKey("lipschitz/{layer}/act_grad_norm", "max"),
            LoggedKey("lipschitz/{layer}/thm41_ratio", "max"),
        ),
        panels=(
            Panel(
                "panels/loss_range",
                "Loss landscape: loss along the gradient, min-max over step size η (Fig. 4a)",
                (("lipschitz/loss_min", "min over η"), ("lipschitz/loss_max", "max over η")),
                "L(W − ηg), min to max over η",
                caption="Loss landscape (Fig. 4a): the band between the smallest and largest loss"
                " along the gradient over the step sizes η; a narrower, lower band is a smoother"
                " landscape.",
                source="lipschitz/loss_min and loss_max (LipschitzCallback)",
                order=10,
                kind="band",
            ),
            Panel(
                "panels/thm41_ratio",
                "Theorem 4.1: BatchNorm gradient norm bound ratio per layer",
                (("lipschitz/{layer}/thm41_ratio", "{layer}"),),
                "‖∇_y L‖² / Thm 4.1 bound (≤ 1)",
                caption="Theorem 4.1: measured ‖∇_y L‖² over the theorem's bound per BatchNorm"
                " layer; the theorem says the ratio is at most 1 (dashed line).",
                source="lipschitz/<layer>/thm41_ratio (LipschitzCallback on a model with BatchNorm)",
                order=60,
                guide=1.0,
            ),
            Panel(
                "panels/act_grad_norm",
                "Activation-gradient norm ‖∇_y L‖ per normalisation layer (Theorem 4.1)",
                (("lipschitz/{layer}/act_grad_norm", "{layer}"),),
                "‖∇_y L‖",
                caption="Norm of the loss gradient with respect to each normalisation layer's"
                " output, ‖∇_y L‖ (the left side of Theorem 4.1).",
                source="lipschitz/<layer>/act_grad_norm (LipschitzCallback on a model with"
                " normalisation layers)",
                order=70,
            ),
        ),
    )

    def __init__(
        self,
        every_n_steps: int | Literal["auto"] = "auto",
        step_sizes: Sequence[float] | None = None,
        relative_to_lr: bool = True,
        loss_fn: LossFn | None = None,
        budget: float | None = None,
        name: str | None = None,
        vmap_chunk_size: VmapChunkSize = "auto",
    ) -> None:
        super().__init__(
            every_n_steps, step_sizes, relative_to_lr, loss_fn, budget, name, vmap_chunk_size
        )
        self._norm_layers: list[tuple[str, nn.Module]] = []

    key_base = "lipschitz"

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._norm_layers = norm_layers(pl_module)

    def measurement_steps(self) -> float:
        """One forward and backward pass (:math:`g_t`), one forward per step size."""
        return 1.0 + self.grid_size / 3

    def _settings(self) -> dict[str, Any]:
        return {
            **super()._settings(),
        }

    def _compute(self, trainer: pl.Trainer, record: StepRecord) -> dict[str, float]:
        etas, scales = self._steps(trainer)
        values = compute_lipschitz(
            self.probe,
            self.probe.parameters(copy=False),  # W^t: the step has not run yet
            record,
            etas,
            self._norm_layers,
            self.collective,
            scales=scales,
        )
        self._warn_on_violation(values, record.step)
        metrics = {f"{self.key_prefix}/{k}": v for k, v in values.items()}
        grid = ("loss_min", "loss_max", "loss_range")
        kept, self._empty_grid_warned = drop_empty_grid(
            self, metrics, etas, scales, grid, record.step, self._empty_grid_warned
        )
        return kept

    def _warn_on_violation(self, values: Mapping[str, float], step: int) -> None:
        bad = {
            k: v for k, v in values.items() if k.endswith("thm41_ratio") and v > 1 + THM41_TOLERANCE
        }
        if bad:
            warnings.warn(
                f"Theorem 4.1 ratio above 1 at step {step}: {bad}. The bound holds for exact batch"
                " statistics; check for a custom BatchNorm, frozen statistics or low precision.",
                DiagnosticWarning,
                stacklevel=3,
            )
