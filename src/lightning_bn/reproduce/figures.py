"""Paper-style figures of a ``lightning-bn reproduce`` run, drawn from its CSV history.

The figures compare the variants of a run (read from ``run.json`` and the plan) with the generic
builders of :mod:`lightning_bn.figures` (one line or band per variant) and are saved as PNG
into ``<run>/figures``:

=================================== =========================================================
file                                what it shows
=================================== =========================================================
``overview_<arch>.png``             training loss of standard / BN / noisy BN, the loss range
                                    and gradient-predictiveness bands and β_eff
``training_<arch>.png``             training loss and validation accuracy (or loss) of every
                                    variant, one column per learning rate
``ics_<arch>.png``                  ‖G − G′‖₂ and cos(G, G′) per layer, BN vs standard
                                    (paper Fig. 3)
``loss_landscape_<arch>.png``       band between min and max over η of L(W − ηg), BN vs
                                    standard (Fig. 4a)
``gradient_predictiveness_<arch>``  band of ‖g − ∇L(W − ηg)‖ over η (Fig. 4b)
``beta_smoothness_<arch>.png``      effective β-smoothness (Fig. 4c)
``fig4_<arch>.png``                 Fig. 4a-c per step, medians and bands over seeds, the
                                    deciding early phase shaded (:mod:`.fig4`)
``thm41_ratio_<arch>.png``          Theorem 4.1 ratio per BatchNorm layer (≤ 1)
``noisy_bn_activations_<arch>.png`` mean and standard deviation of each noisy layer's output
                                    before and after the noise (Fig. 2's instability)
=================================== =========================================================

A figure whose data the run lacks (no noisy-BN variant, no BatchNorm layer, ...) is skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lightning_bn.figures.draw import (
    KIND_STYLE,
    FigureFile,
    RunHistory,
    band_figure,
    draw_band,
    draw_layer_lines,
    draw_line,
    ics_figure,
    line_figure,
    new_figure,
    pick_layers,
    save_figure,
    short_layer,
    use_log,
)
from lightning_bn.reproduce.fig4 import fig4_figure
from lightning_bn.reproduce.findings import ics_layers
from lightning_bn.reproduce.history import RunData, VariantHistory
from lightning_bn.reproduce.plan import format_lr

__all__ = ["plot_run"]

# ℓ2 normalisation equals BatchNorm in training (up to ε): dashed, so that it does not hide it.
_LINESTYLE = {"l2": "--"}


def _label(kind: str) -> str:
    return KIND_STYLE.get(kind, (kind, "black"))[0]


def _color(kind: str) -> str:
    return KIND_STYLE.get(kind, (kind, "black"))[1]


def _run(history: VariantHistory) -> RunHistory:
    """A variant as the generic builders see it: labelled and coloured by its kind."""
    kind = history.spec.kind
    return RunHistory(
        _label(kind), history.series, color=_color(kind), linestyle=_LINESTYLE.get(kind, "-")
    )


def _save(fig: Figure | None, path: Path, caption: str) -> FigureFile | None:
    return None if fig is None else save_figure(fig, path, caption)


def _variants(run: RunData, arch: str, lr: float) -> list[VariantHistory]:
    """Standard and BatchNorm at ``lr`` (those trained), the paper's comparison."""
    found = [run.find(arch, kind, lr) for kind in ("standard", "batchnorm")]
    return [h for h in found if h is not None]


def _per_lr(run: RunData, arch: str) -> list[tuple[str, list[RunHistory]]]:
    """One panel per learning rate: BatchNorm and the standard network."""
    return [
        (f"lr = {format_lr(lr)}", [_run(h) for h in _variants(run, arch, lr)])
        for lr in run.plan.lrs
    ]


def _title(run: RunData, arch: str) -> str:
    return f"{run.plan.experiment} · {arch}"


# --- figures -----------------------------------------------------------------------------------------
def _training(run: RunData, arch: str, out: Path) -> FigureFile | None:
    plan = run.plan
    classification = plan.task == "classification"
    fig, axes = new_figure(2, len(plan.lrs))
    drawn = False
    for col, lr in enumerate(plan.lrs):
        top, bottom = axes[0, col], axes[1, col]
        for kind in plan.kinds:
            history = run.find(arch, kind, lr)
            if history is None:
                continue
            variant = _run(history)
            drawn |= draw_line(top, variant, "train/loss", smooth=True, loss=True)
            val_key = "val/acc" if classification else "val/loss"
            draw_line(bottom, variant, val_key, loss=not classification, marker=".", ms=3)
        use_log(top)
        top.set_title(f"lr = {format_lr(lr)}")
        top.set_ylabel("training loss (moving average)")
        bottom.set_ylabel("validation accuracy" if classification else "validation loss")
        bottom.set_xlabel("step")
        if not classification:
            use_log(bottom)
    if not drawn:
        return None
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{_title(run, arch)}: training curves per variant")
    return _save(
        fig,
        out / f"training_{arch}.png",
        f"Training loss and validation {'accuracy' if classification else 'loss'} of every "
        f"variant ({arch}), one column per learning rate (ℓ2 normalisation, dashed, equals "
        "BatchNorm in training, so their curves coincide).",
    )


def _ics(run: RunData, arch: str, out: Path) -> FigureFile | None:
    lr = run.plan.base_lr
    histories = _variants(run, arch, lr)
    fig = ics_figure(
        [_run(h) for h in histories],
        ics_layers(histories),
        f"{_title(run, arch)}: internal covariate shift per layer, lr = {format_lr(lr)} (Fig. 3)",
    )
    return _save(
        fig,
        out / f"ics_{arch}.png",
        f"Internal covariate shift (gradient form, Def. 2.1) per layer, BatchNorm vs standard at "
        f"lr {format_lr(lr)} ({arch}; the paper's Fig. 3).",
    )


def _bands(
    run: RunData,
    arch: str,
    out: Path,
    lo: str,
    hi: str,
    name: str,
    ylabel: str,
    title: str,
    caption: str,
) -> FigureFile | None:
    fig = band_figure(_per_lr(run, arch), lo, hi, ylabel, f"{_title(run, arch)}: {title}")
    return _save(fig, out / f"{name}_{arch}.png", caption)


def _beta(run: RunData, arch: str, out: Path) -> FigureFile | None:
    fig = line_figure(
        _per_lr(run, arch),
        "smoothness/beta_eff",
        "β_eff = max_η ‖g − ∇L(W − ηg)‖ / ‖ηg‖",
        f"{_title(run, arch)}: effective β-smoothness (Fig. 4c)",
    )
    return _save(
        fig,
        out / f"beta_smoothness_{arch}.png",
        f"Effective β-smoothness along the gradient, BatchNorm vs standard ({arch}; Fig. 4c).",
    )


def _thm41(run: RunData, arch: str, out: Path) -> FigureFile | None:
    plan = run.plan
    rows = [
        k
        for k in ("batchnorm", "noisy-batchnorm")
        if k in plan.kinds
        and any(
            (h := run.find(arch, k, lr)) is not None and h.layers("lipschitz/", "/thm41_ratio")
            for lr in plan.lrs
        )
    ]
    if not rows:
        return None
    fig, axes = new_figure(len(rows), len(plan.lrs))
    for r, kind in enumerate(rows):
        for c, lr in enumerate(plan.lrs):
            ax = axes[r, c]
            history = run.find(arch, kind, lr)
            layers: list[str] = []
            if history is not None:
                layers = draw_layer_lines(ax, _run(history), "lipschitz/", "/thm41_ratio")
            ax.axhline(1.0, color="black", ls="--", lw=0.8, gid="guide")
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            ax.set_title(f"{_label(kind)}, lr = {format_lr(lr)}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("‖∇_y L‖² / Thm 4.1 bound")
            if layers:
                ax.legend(fontsize=6)
    fig.suptitle(f"{_title(run, arch)}: Theorem 4.1 ratio per BatchNorm layer (≤ 1)")
    return _save(
        fig,
        out / f"thm41_ratio_{arch}.png",
        f"Theorem 4.1: measured ‖∇_y L‖² over the bound, per BatchNorm layer ({arch}); the "
        "theorem says ≤ 1.",
    )


def _noise(run: RunData, arch: str, out: Path) -> FigureFile | None:
    lr = run.plan.base_lr
    history = run.find(arch, "noisy-batchnorm", lr)
    if history is None:
        return None
    layers = pick_layers(history.layers("noise/", "/out_std"), limit=4)
    if not layers:
        return None
    fig, axes = new_figure(len(layers), 2, width=4.0, height=2.4)
    for row, layer in enumerate(layers):
        for col, stat in enumerate(("mean", "std")):
            ax = axes[row, col]
            for source, style, label in (
                ("clean", "-", "BN output (before noise)"),
                ("out", "-", "after noise (next layer's input)"),
            ):
                steps, values = history.get(f"noise/{layer}/{source}_{stat}")
                keep = np.isfinite(values)
                color = _color("batchnorm") if source == "clean" else _color("noisy-batchnorm")
                ax.plot(steps[keep], values[keep], ls=style, lw=1.0, color=color, label=label)
            ax.set_ylabel(f"{short_layer(layer)}\n{stat}", fontsize=8)
    axes[0, 0].set_title("activation mean")
    axes[0, 1].set_title("activation standard deviation")
    axes[-1, 0].set_xlabel("step")
    axes[-1, 1].set_xlabel("step")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        f"{_title(run, arch)}: noisy BatchNorm, layer input distribution over training, "
        f"lr = {format_lr(lr)} (Fig. 2)"
    )
    return _save(
        fig,
        out / f"noisy_bn_activations_{arch}.png",
        f"Noisy BatchNorm ({arch}, lr {format_lr(lr)}): mean and standard deviation of each "
        "BatchNorm output before and after the injected noise; the noise makes the next layer's "
        "input distribution unstable (the paper's Fig. 2).",
    )


def _overview(run: RunData, arch: str, out: Path) -> FigureFile | None:
    plan = run.plan
    lr = plan.base_lr
    fig, grid = new_figure(1, 4, width=3.9, height=3.1)
    axes = grid[0]
    drawn = False
    for lr_i, dash in ((plan.base_lr, "-"), (plan.large_lr, "--")):
        for kind in ("standard", "batchnorm", "noisy-batchnorm"):
            history = run.find(arch, kind, lr_i)
            if history is not None:
                label = f"{_label(kind)}, lr {format_lr(lr_i)}"
                drawn |= draw_line(
                    axes[0],
                    _run(history),
                    "train/loss",
                    smooth=True,
                    loss=True,
                    ls=dash,
                    label=label,
                )
        if len(plan.lrs) == 1:
            break
    if not drawn:
        return None
    use_log(axes[0])
    axes[0].set_title("training loss")
    axes[0].legend(fontsize=6)
    for h in _variants(run, arch, lr):
        variant = _run(h)
        draw_band(axes[1], variant, "lipschitz/loss_min", "lipschitz/loss_max")
        draw_band(axes[2], variant, "smoothness/grad_diff_min", "smoothness/grad_diff_max")
        draw_line(axes[3], variant, "smoothness/beta_eff", marker="o", ms=2.5)
    axes[1].set_title(f"loss landscape (Fig. 4a), lr {format_lr(lr)}", fontsize=9)
    axes[2].set_title(f"gradient predictiveness (Fig. 4b), lr {format_lr(lr)}", fontsize=9)
    axes[3].set_title(f"β-smoothness (Fig. 4c), lr {format_lr(lr)}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        if ax is not axes[0] and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[1:]:
        use_log(ax)
    fig.suptitle(
        f"How does BatchNorm help optimisation? {plan.experiment} · {arch} (lightning-bn reproduce)"
    )
    return _save(
        fig,
        out / f"overview_{arch}.png",
        f"Overview ({arch}): training loss of the standard, BatchNorm and noisy-BatchNorm "
        "networks (dashed: the larger lr), and at the base lr the loss-landscape and gradient-"
        "predictiveness bands and β_eff, BatchNorm vs standard.",
    )


def plot_run(run: RunData, out_dir: str | Path | None = None) -> list[FigureFile]:
    """Draw every figure of a run that its data allows.

    Args:
        run: the run (see :func:`lightning_bn.reproduce.history.load_run`).
        out_dir: where to save the PNG files; default ``<run>/figures``.

    Returns:
        The saved figures, in the order of the module docstring.
    """
    out = Path(out_dir) if out_dir is not None else run.path / "figures"
    figures: list[FigureFile | None] = []
    for arch in run.plan.archs:
        figures += [
            _overview(run, arch, out),
            _training(run, arch, out),
            _ics(run, arch, out),
            _bands(
                run,
                arch,
                out,
                "lipschitz/loss_min",
                "lipschitz/loss_max",
                "loss_landscape",
                "L(W − ηg) over η",
                "loss along the gradient, band between min and max over η (Fig. 4a)",
                f"Loss landscape: the band between the smallest and largest loss along the "
                f"gradient over the step sizes η, BatchNorm vs standard ({arch}; Fig. 4a).",
            ),
            _bands(
                run,
                arch,
                out,
                "smoothness/grad_diff_min",
                "smoothness/grad_diff_max",
                "gradient_predictiveness",
                "‖g − ∇L(W − ηg)‖ over η",
                "gradient predictiveness, band between min and max over η (Fig. 4b)",
                f"Gradient predictiveness: the band of ‖g − ∇L(W − ηg)‖ over the step sizes η, "
                f"BatchNorm vs standard ({arch}; Fig. 4b).",
            ),
            _beta(run, arch, out),
            fig4_figure(run, arch, out),
            _thm41(run, arch, out),
            _noise(run, arch, out),
        ]
    return [f for f in figures if f is not None]
