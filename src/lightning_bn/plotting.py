"""Paper-style figures of a ``lightning-bn reproduce`` run, drawn from its CSV history.

Every figure is drawn with matplotlib's Agg canvas directly (no ``pyplot``, so the caller's
backend and global figure state are untouched) and saved as PNG into ``<run>/figures``:

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
``thm41_ratio_<arch>.png``          Theorem 4.1 ratio per BatchNorm layer (≤ 1)
``noisy_bn_activations_<arch>.png`` mean and standard deviation of each noisy layer's output
                                    before and after the noise (Fig. 2's instability)
=================================== =========================================================

A figure whose data the run lacks (no noisy-BN variant, no BatchNorm layer, ...) is skipped. With
several seeds every curve is the median over the seeds and a light band spans the smallest to the
largest seed (see :func:`lightning_bn.reproduce.history.seed_median`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_bn.reproduce.findings import ics_layers
from lightning_bn.reproduce.history import HI, LO, RunData, VariantHistory
from lightning_bn.reproduce.plan import format_lr

__all__ = ["KIND_STYLE", "FigureFile", "plot_run"]

#: Label and colour of each variant kind.
KIND_STYLE: dict[str, tuple[str, str]] = {
    "standard": ("Standard", "#3a3a3a"),
    "batchnorm": ("BatchNorm", "tab:blue"),
    "noisy-batchnorm": ("Noisy BatchNorm", "tab:orange"),
    "l1": ("ℓ1 norm", "tab:green"),
    "l2": ("ℓ2 norm", "tab:red"),
    "linf": ("ℓ∞ norm", "tab:purple"),
    "layernorm": ("LayerNorm", "tab:brown"),
}
# ℓ2 normalisation equals BatchNorm in training (up to ε): dashed, so that it does not hide it.
_LINESTYLE = {"l2": "--"}
#: Most layers drawn in one per-layer figure (evenly spread, first and last included).
MAX_LAYERS = 6
_DPI = 110


@dataclass(frozen=True)
class FigureFile:
    """A saved figure.

    Attributes:
        path: the PNG file.
        caption: one sentence on what it shows (used in ``summary.md``).
    """

    path: Path
    caption: str


# --- helpers ------------------------------------------------------------------------------------------
def _label(kind: str) -> str:
    return KIND_STYLE.get(kind, (kind, "black"))[0]


def _color(kind: str) -> str:
    return KIND_STYLE.get(kind, (kind, "black"))[1]


def _new_figure(nrows: int, ncols: int, width: float = 4.2, height: float = 3.0) -> Figure:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _axes(fig: Figure, nrows: int, ncols: int) -> np.ndarray:
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return np.asarray(axes)


def _finite_prefix(
    steps: np.ndarray, values: np.ndarray, blowup: float | None = None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The points before the series diverged, and whether it did.

    A series diverges at its first non-finite value, or (with ``blowup``) at its first value
    above ``blowup``: a training loss on its way to overflow would squash the other curves.
    """
    bad = ~np.isfinite(values)
    if blowup is not None:
        bad |= np.nan_to_num(values, nan=np.inf, posinf=np.inf) > blowup
    if not bad.any():
        return steps, values, False
    first = int(np.argmax(bad))
    return steps[:first], values[:first], True


def _loss_blowup(values: np.ndarray) -> float | None:
    """Ten times the initial loss level: above it a training loss counts as diverging."""
    head = values[: max(1, values.size // 20)]
    head = head[np.isfinite(head)]
    if head.size == 0:
        return None
    return 10.0 * float(np.abs(head).max()) + 1e-12


def _smooth(values: np.ndarray, points: int = 25) -> np.ndarray:
    """Trailing moving average over about ``1/points`` of the series (same length)."""
    window = max(1, values.size // points)
    if window == 1:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(values.size):
        lo = max(0, i + 1 - window)
        out[i] = (cumsum[i + 1] - cumsum[lo]) / (i + 1 - lo)
    return out


def _use_log(ax: Axes) -> None:
    """Log scale for the y axis when the drawn data are positive and span over 50×."""
    parts = [
        np.asarray(line.get_ydata(), dtype=float)
        for line in ax.get_lines()
        if line.get_gid() != "guide"
    ]
    values = np.concatenate(parts) if parts else np.zeros(0)
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() / values.min() > 50:
        ax.set_yscale("log")


def _save(fig: Figure, path: Path, caption: str) -> FigureFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return FigureFile(path, caption)


def _pick_layers(layers: Sequence[str], limit: int = MAX_LAYERS) -> list[str]:
    if len(layers) <= limit:
        return list(layers)
    idx = sorted({round(i * (len(layers) - 1) / (limit - 1)) for i in range(limit)})
    return [layers[i] for i in idx]


def _short(layer: str) -> str:
    return layer.removeprefix("model.")


def _line(
    ax: Axes,
    history: VariantHistory,
    key: str,
    smooth: bool = False,
    loss: bool = False,
    **kw: object,
) -> bool:
    """Draw one variant's series of ``key``; mark where it diverged. True if anything was drawn.

    ``loss=True`` also ends the line where the loss exceeds ten times its initial level.
    """
    all_steps, all_values = history.get(key)
    blowup = _loss_blowup(all_values) if loss else None
    steps, values, diverged = _finite_prefix(all_steps, all_values, blowup)
    if steps.size == 0 and not diverged:
        return False
    kind = history.spec.kind
    style = {
        "color": _color(kind),
        "label": _label(kind),
        "lw": 1.4,
        "ls": _LINESTYLE.get(kind, "-"),
    }
    style.update(kw)
    if steps.size:
        ax.plot(steps, _smooth(values) if smooth else values, **style)  # type: ignore[arg-type]
        _seed_band(ax, history, key, steps, smooth, _color(kind))
    if diverged:
        stop = float(all_steps[steps.size])
        ax.axvline(stop, color=_color(kind), ls=":", lw=1.0, gid="guide")
        ax.annotate(
            "diverged",
            (stop, 0.97),
            xycoords=("data", "axes fraction"),
            color=_color(kind),
            fontsize=7,
            ha="right",
            va="top",
            rotation=90,
        )
    return True


def _seed_band(
    ax: Axes, history: VariantHistory, key: str, steps: np.ndarray, smooth: bool, color: str
) -> None:
    """Shade the range over seeds of ``key`` (the ``@lo``/``@hi`` series of a median history)."""
    s_lo, lo = history.get(key + LO)
    _, hi = history.get(key + HI)
    keep = np.isin(s_lo, steps) & np.isfinite(lo) & np.isfinite(hi)
    if keep.sum() < 2:
        return
    lo, hi = lo[keep], hi[keep]
    if smooth:
        lo, hi = _smooth(lo), _smooth(hi)
    ax.fill_between(s_lo[keep], lo, hi, color=color, alpha=0.18, lw=0)


def _band(ax: Axes, history: VariantHistory, lo_key: str, hi_key: str) -> bool:
    s_lo, lo = history.get(lo_key)
    s_hi, hi = history.get(hi_key)
    common, i_lo, i_hi = np.intersect1d(s_lo, s_hi, return_indices=True)
    lo, hi = lo[i_lo], hi[i_hi]
    keep = np.isfinite(lo) & np.isfinite(hi)
    if not keep.any():
        return False
    kind = history.spec.kind
    steps = common[keep]
    ax.fill_between(steps, lo[keep], hi[keep], color=_color(kind), alpha=0.3, lw=0)
    ax.plot(steps, lo[keep], color=_color(kind), lw=0.8)
    ax.plot(steps, hi[keep], color=_color(kind), lw=0.8, label=_label(kind))
    return True


def _compared(run: RunData, arch: str, lr: float) -> list[VariantHistory]:
    """Standard and BatchNorm at ``lr`` (those trained), the paper's comparison."""
    found = [run.find(arch, kind, lr) for kind in ("standard", "batchnorm")]
    return [h for h in found if h is not None]


def _title(run: RunData, arch: str) -> str:
    return f"{run.plan.experiment} · {arch}"


# --- figures -----------------------------------------------------------------------------------------
def _training(run: RunData, arch: str, out: Path) -> FigureFile | None:
    plan = run.plan
    classification = plan.task == "classification"
    fig = _new_figure(2, len(plan.lrs))
    axes = _axes(fig, 2, len(plan.lrs))
    drawn = False
    for col, lr in enumerate(plan.lrs):
        top, bottom = axes[0, col], axes[1, col]
        for kind in plan.kinds:
            history = run.find(arch, kind, lr)
            if history is None:
                continue
            drawn |= _line(top, history, "train/loss", smooth=True, loss=True)
            val_key = "val/acc" if classification else "val/loss"
            _line(bottom, history, val_key, loss=not classification, marker=".", ms=3)
        _use_log(top)
        top.set_title(f"lr = {format_lr(lr)}")
        top.set_ylabel("training loss (moving average)")
        bottom.set_ylabel("validation accuracy" if classification else "validation loss")
        bottom.set_xlabel("step")
        if not classification:
            _use_log(bottom)
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
    histories = _compared(run, arch, lr)
    layers = ics_layers(histories)
    if not layers:
        return None
    chosen = _pick_layers(layers)
    fig = _new_figure(len(chosen), 2, width=4.0, height=2.4)
    axes = _axes(fig, len(chosen), 2)
    for row, layer in enumerate(chosen):
        for h in histories:
            _line(axes[row, 0], h, f"ics/{layer}/l2", marker="o", ms=2.5)
            _line(axes[row, 1], h, f"ics/{layer}/cos", marker="o", ms=2.5)
        _use_log(axes[row, 0])
        axes[row, 0].set_ylabel(f"{_short(layer)}\n‖G − G′‖₂", fontsize=8)
        axes[row, 1].set_ylabel("cos(G, G′)", fontsize=8)
    axes[0, 0].set_title("ℓ2 difference (ideal 0)")
    axes[0, 1].set_title("cosine (ideal 1)")
    axes[-1, 0].set_xlabel("step")
    axes[-1, 1].set_xlabel("step")
    axes[0, 1].legend(fontsize=7)
    fig.suptitle(
        f"{_title(run, arch)}: internal covariate shift per layer, lr = {format_lr(lr)} (Fig. 3)"
    )
    return _save(
        fig,
        out / f"ics_{arch}.png",
        f"Internal covariate shift (gradient form, Def. 2.1) per layer, BatchNorm vs standard at "
        f"lr {format_lr(lr)} ({arch}; the paper's Fig. 3).",
    )


def _per_lr(
    run: RunData,
    arch: str,
    out: Path,
    draw: Callable[[Axes, VariantHistory], bool],
    name: str,
    ylabel: str,
    title: str,
    caption: str,
) -> FigureFile | None:
    """One panel per learning rate comparing BatchNorm with the standard network."""
    lrs = run.plan.lrs
    fig = _new_figure(1, len(lrs))
    axes = _axes(fig, 1, len(lrs))
    drawn = False
    for col, lr in enumerate(lrs):
        ax = axes[0, col]
        for h in _compared(run, arch, lr):
            drawn |= draw(ax, h)
        _use_log(ax)
        ax.set_title(f"lr = {format_lr(lr)}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not drawn:
        return None
    fig.suptitle(f"{_title(run, arch)}: {title}")
    return _save(fig, out / f"{name}_{arch}.png", caption)


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
    return _per_lr(run, arch, out, lambda ax, h: _band(ax, h, lo, hi), name, ylabel, title, caption)


def _beta(run: RunData, arch: str, out: Path) -> FigureFile | None:
    return _per_lr(
        run,
        arch,
        out,
        lambda ax, h: _line(ax, h, "smoothness/beta_eff", marker="o", ms=2.5),
        "beta_smoothness",
        "β_eff = max_η ‖g − ∇L(W − ηg)‖ / ‖ηg‖",
        "effective β-smoothness (Fig. 4c)",
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
    fig = _new_figure(len(rows), len(plan.lrs))
    axes = _axes(fig, len(rows), len(plan.lrs))
    for r, kind in enumerate(rows):
        for c, lr in enumerate(plan.lrs):
            ax = axes[r, c]
            history = run.find(arch, kind, lr)
            layers: list[str] = []
            if history is not None:
                layers = _pick_layers(history.layers("lipschitz/", "/thm41_ratio"))
                for layer in layers:
                    steps, values = history.get(f"lipschitz/{layer}/thm41_ratio")
                    keep = np.isfinite(values)
                    ax.plot(
                        steps[keep], values[keep], marker="o", ms=2.5, lw=1.0, label=_short(layer)
                    )
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
    layers = _pick_layers(history.layers("noise/", "/out_std"), limit=4)
    if not layers:
        return None
    fig = _new_figure(len(layers), 2, width=4.0, height=2.4)
    axes = _axes(fig, len(layers), 2)
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
            ax.set_ylabel(f"{_short(layer)}\n{stat}", fontsize=8)
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
    fig = _new_figure(1, 4, width=3.9, height=3.1)
    axes = _axes(fig, 1, 4)[0]
    drawn = False
    for lr_i, dash in ((plan.base_lr, "-"), (plan.large_lr, "--")):
        for kind in ("standard", "batchnorm", "noisy-batchnorm"):
            history = run.find(arch, kind, lr_i)
            if history is not None:
                label = f"{_label(kind)}, lr {format_lr(lr_i)}"
                drawn |= _line(
                    axes[0], history, "train/loss", smooth=True, loss=True, ls=dash, label=label
                )
        if len(plan.lrs) == 1:
            break
    if not drawn:
        return None
    _use_log(axes[0])
    axes[0].set_title("training loss")
    axes[0].legend(fontsize=6)
    for h in _compared(run, arch, lr):
        _band(axes[1], h, "lipschitz/loss_min", "lipschitz/loss_max")
        _band(axes[2], h, "smoothness/grad_diff_min", "smoothness/grad_diff_max")
        _line(axes[3], h, "smoothness/beta_eff", marker="o", ms=2.5)
    axes[1].set_title(f"loss landscape (Fig. 4a), lr {format_lr(lr)}", fontsize=9)
    axes[2].set_title(f"gradient predictiveness (Fig. 4b), lr {format_lr(lr)}", fontsize=9)
    axes[3].set_title(f"β-smoothness (Fig. 4c), lr {format_lr(lr)}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        if ax is not axes[0] and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[1:]:
        _use_log(ax)
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
            _thm41(run, arch, out),
            _noise(run, arch, out),
        ]
    return [f for f in figures if f is not None]
