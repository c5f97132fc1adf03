"""The paper's figures as data: which logged keys each one shows, under which name and title.

One table, :data:`PAPER_PANELS`, names every figure of the diagnostics once. The W&B charts
(:mod:`lightning_bn.logging.wandb`, logged under ``panel.key``) and the PNG figures of
``lightning-bn plot`` (:mod:`lightning_bn.plot.run_figures`, saved as ``<panel.name>.png`` with
``panel.title`` as title) are both drawn from it, so the two show the same quantities under
the same names. This module imports neither W&B nor matplotlib.

Example:
    >>> from lightning_bn.logging.panels import PAPER_PANELS
    >>> [p.name for p in PAPER_PANELS][:3]
    ['loss_range', 'grad_predictiveness', 'beta_smoothness']
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["PAPER_PANELS", "Panel"]


@dataclass(frozen=True)
class Panel:
    """One chart of the paper's diagnostics.

    Attributes:
        key: The key the W&B chart is logged under, such as ``"panels/loss_range"``; without
            its ``panels/`` it is the name of the PNG file of ``lightning-bn plot``.
        title: The chart title.
        lines: ``(key, label)`` per line. A key containing ``{layer}`` stands for one line
            per layer found in the history (``"ics/{layer}/l2"``); ``{layer}`` in the label
            is replaced by the layer name.
        ylabel: The y-axis label of the PNG figure.
    """

    key: str
    title: str
    lines: tuple[tuple[str, str], ...]
    ylabel: str = ""

    @property
    def name(self) -> str:
        """The panel's short name: its key without ``panels/`` (the PNG file's stem)."""
        return self.key.removeprefix("panels/")

    @property
    def per_layer(self) -> bool:
        """Whether the panel has one line per layer (its keys hold ``{layer}``)."""
        return any("{layer}" in key for key, _ in self.lines)

    def resolve(self, keys: Iterable[str]) -> list[tuple[str, str]]:
        """The concrete ``(key, label)`` lines among ``keys``, in panel then history order."""
        keys = list(keys)
        out: list[tuple[str, str]] = []
        for template, label in self.lines:
            if "{layer}" not in template:
                if template in keys:
                    out.append((template, label))
                continue
            head, _, tail = template.partition("{layer}")
            pattern = re.compile(re.escape(head) + "(?P<layer>.+)" + re.escape(tail) + r"\Z")
            for key in keys:
                match = pattern.match(key)
                if match:
                    out.append((key, label.replace("{layer}", match["layer"])))
        return out


PAPER_PANELS: tuple[Panel, ...] = (
    Panel(
        "panels/loss_range",
        "Loss landscape: loss along the gradient, min-max over step size η (Fig. 4a)",
        (("lipschitz/loss_min", "min over η"), ("lipschitz/loss_max", "max over η")),
        "L(W − ηg), min to max over η",
    ),
    Panel(
        "panels/grad_predictiveness",
        "Gradient predictiveness: ‖∇L(x) − ∇L(x − η∇L(x))‖, min-max over η (Fig. 4b)",
        (("smoothness/grad_diff_min", "min over η"), ("smoothness/grad_diff_max", "max over η")),
        "‖g − ∇L(W − ηg)‖, min to max over η",
    ),
    Panel(
        "panels/beta_smoothness",
        "Effective β-smoothness (Fig. 4c)",
        (("smoothness/beta_eff", "β_eff"),),
        "β_eff = max_η ‖g − ∇L(W − ηg)‖ / ‖ηg‖",
    ),
    Panel(
        "panels/ics_l2",
        "Internal covariate shift: ‖G − G′‖₂ per layer (Fig. 3)",
        (("ics/{layer}/l2", "{layer}"),),
        "‖G − G′‖₂ (ideal 0)",
    ),
    Panel(
        "panels/ics_cos",
        "Internal covariate shift: cos(G, G′) per layer (Fig. 3)",
        (("ics/{layer}/cos", "{layer}"),),
        "cos(G, G′) (ideal 1)",
    ),
    Panel(
        "panels/thm41_ratio",
        "Theorem 4.1: BatchNorm gradient norm bound ratio per layer",
        (("lipschitz/{layer}/thm41_ratio", "{layer}"),),
        "‖∇_y L‖² / Thm 4.1 bound (≤ 1)",
    ),
    Panel(
        "panels/act_grad_norm",
        "Activation-gradient norm ‖∇_y L‖ per normalisation layer (Theorem 4.1)",
        (("lipschitz/{layer}/act_grad_norm", "{layer}"),),
        "‖∇_y L‖",
    ),
    Panel(
        "panels/hessian_top_eig",
        "Top Hessian eigenvalue λ_max",
        (("smoothness/hessian_top_eig", "λ_max"),),
        "λ_max(H)",
    ),
    Panel(
        "panels/grad_curvature",
        "Curvature along the gradient gᵀHg / ‖g‖²",
        (("smoothness/grad_curvature", "gᵀHg / ‖g‖²"),),
        "gᵀHg / ‖g‖²",
    ),
)
"""The paper's figures, in the order they are drawn (W&B charts and ``lightning-bn plot``)."""
