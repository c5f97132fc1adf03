"""A new diagnostic in two pieces: plain-torch math, then a thin callback (docs/architecture.md).

The callback declares what it logs (``logged_keys``): the W&B summaries and charts and the
figures of ``lightning-bn plot`` come from that declaration, with no other file to edit.
"""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_bn.callbacks.base import DiagnosticCallback
from lightning_bn.diagnostics.paramvec import dict_norm
from lightning_bn.logging.keys import LoggedKey, LoggedKeys, Panel
from lightning_bn.probe import Collective, Params, Probe, StepRecord


def compute_grad_norms(probe: Probe, params: Params, step: StepRecord) -> dict[str, float]:
    """Per-parameter gradient norm ‖∇_{W_i} L(W; x, y)‖₂ at ``params`` (DDP: ranks averaged)."""
    _, grads = probe.loss_and_grad(params, step)
    grads = Collective().mean_dict(grads)  # average over ranks first, as DDP does
    return {name: float(dict_norm({name: g})) for name, g in grads.items()}


class GradNormCallback(DiagnosticCallback):
    """Logs ``gradnorm/<parameter>`` every ``every_n_steps`` steps, at W^t on the step's batch."""

    logged_keys = LoggedKeys(
        prefix="gradnorm/",
        keys=(LoggedKey("gradnorm/{layer}", "max"),),  # W&B keeps each norm's largest value
        panels=(
            Panel(
                "panels/gradnorm",
                "Gradient norm per parameter",
                (("gradnorm/{layer}", "{layer}"),),  # one line per parameter
                "‖∇_W L‖₂",
                caption="Norm of the loss gradient with respect to each parameter tensor.",
                source="gradnorm/<parameter> (GradNormCallback)",
            ),
        ),
    )

    def _compute(self, trainer: pl.Trainer, record: StepRecord) -> dict[str, float]:
        values = compute_grad_norms(self.probe, self.probe.parameters(), record)
        return {f"gradnorm/{k}": v for k, v in values.items()}
