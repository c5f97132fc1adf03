"""The paper's Fig. 4 as the paper draws it: per-step curves of both networks over training.

``fig4_<arch>.png`` has three panels: the loss range along the gradient (Fig. 4a), the largest
gradient difference ``max_η ‖g − ∇L(W − ηg)‖`` (Fig. 4b) and β_eff (Fig. 4c), for the standard
and BatchNorm networks at the base lr. Each curve is the median over seeds at every measured
step, its band the smallest to the largest seed. The deciding phase of the findings (the
measured steps before either network fitted its training data in any seed, see
:data:`~lightning_bn.reproduce.criteria.EARLY_PHASE`) is shaded; when a network fitted its data,
a dotted line marks the step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_bn.figures.style import KIND_STYLE, FigureFile, new_figure, save_figure, use_log
from lightning_bn.reproduce.criteria import EARLY_PHASE
from lightning_bn.reproduce.history import HI, LO, RunData, seed_median
from lightning_bn.reproduce.paired import LANDSCAPE_KEYS, fit_steps
from lightning_bn.reproduce.plan import VariantSpec, format_lr

__all__ = ["fig4_figure"]

_PANELS = (
    ("loss_variation", "loss range along the gradient (Fig. 4a)"),
    ("gradient_predictiveness", "max over η of ‖g − ∇L(W − ηg)‖ (Fig. 4b)"),
    ("beta_smoothness", "β_eff (Fig. 4c)"),
)


def fig4_figure(run: RunData, arch: str, out: Path) -> FigureFile | None:
    """Draw ``fig4_<arch>.png`` into ``out`` (``None`` when the run has no landscape data)."""
    lr = run.plan.base_lr
    runs = {kind: run.seed_runs(VariantSpec(arch, kind, lr)) for kind in ("standard", "batchnorm")}
    if not all(runs.values()):
        return None
    fits = [
        f for kind_runs in runs.values() for h in kind_runs for f in fit_steps((h,), EARLY_PHASE)
    ]
    known = [f for f in fits if f is not None]
    fig, axes = new_figure(1, 3, width=4.4, height=3.2)
    drawn = False
    last = 0
    for ax, (name, title) in zip(axes[0], _PANELS, strict=True):
        key = LANDSCAPE_KEYS[name]
        for kind, histories in runs.items():
            median = seed_median(histories)
            steps, values = median.get(key)
            keep = np.isfinite(values)
            if not keep.any():
                continue
            label, color = KIND_STYLE.get(kind, (kind, "black"))
            ax.plot(steps[keep], values[keep], color=color, label=label, marker="o", ms=2.5)
            lo, hi = median.get(key + LO)[1], median.get(key + HI)[1]
            if lo.size == values.size:
                band = keep & np.isfinite(lo) & np.isfinite(hi)
                ax.fill_between(steps[band], lo[band], hi[band], color=color, alpha=0.2, lw=0)
            last = max(last, int(steps[keep][-1]))
            drawn = True
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        use_log(ax)
    if not drawn:
        return None
    end = min(known) if known else last
    for ax in axes[0]:
        ax.axvspan(0, end, color="0.85", alpha=0.5, zorder=0, label="deciding phase")
        for step in sorted(set(known)):
            ax.axvline(step, color="0.3", ls=":", lw=0.8)
    axes[0][0].legend(fontsize=7)
    fit_text = f"first fit at step {min(known)}" if known else "neither network fitted its data"
    fig.suptitle(
        f"{run.plan.experiment} {arch}, lr {format_lr(lr)}: BatchNorm vs standard per step "
        f"(median and range over {len(runs['standard'])} seed(s)); shaded: the deciding early "
        f"phase ({fit_text})",
        fontsize=9,
    )
    return save_figure(
        fig,
        out / f"fig4_{arch}.png",
        f"Fig. 4 per step ({arch}): loss range, gradient difference and β_eff of the standard "
        "and BatchNorm networks over training, medians and bands over seeds; the shaded steps "
        "decide the findings.",
    )
