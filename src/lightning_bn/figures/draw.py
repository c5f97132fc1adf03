"""Generic figure builders for logged diagnostic histories: one line or band per run.

The builders know nothing of where a history comes from (a ``lightning-bn reproduce`` run, a
Lightning ``CSVLogger`` file, a callback's :class:`~lightning_bn.logging.extras.MetricHistory`):
each run is a :class:`RunHistory`, its logged keys mapped to ``(steps, values)`` with a label
and a style. The figures of a reproduce run (:mod:`lightning_bn.reproduce.figures`) are built
from them; this module imports neither :mod:`lightning_bn.reproduce` nor the command line.

Every figure is drawn on matplotlib's Agg canvas directly (no ``pyplot``, so the caller's
backend and global figure state are untouched).

A run that aggregates several seeds carries, beside a key's median series, the series
``<key>@lo`` and ``<key>@hi`` (smallest and largest seed); :func:`draw_line` then shades that
range in a light band around the median.

Example::

    from lightning_bn.figures.draw import RunHistory, band_figure

    runs = [RunHistory.from_lists("BatchNorm", bn_series, color="tab:blue"),
            RunHistory.from_lists("standard", plain_series)]
    fig = band_figure(
        [("lr = 0.1", runs)], "lipschitz/loss_min", "lipschitz/loss_max",
        ylabel="L(W − ηg) over η", title="loss landscape (Fig. 4a)",
    )
    fig.savefig("loss_landscape.png")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

if TYPE_CHECKING:
    pass
from lightning_bn.figures.style import (
    KIND_STYLE,
    MAX_LAYERS,
    SEED_HI,
    SEED_LO,
    FigureFile,
    RunHistory,
    new_figure,
    pick_layers,
    plain_ticks,
    save_figure,
    set_title,
    short_layer,
    use_log,
)

__all__ = [
    "KIND_STYLE",
    "MAX_LAYERS",
    "SEED_HI",
    "SEED_LO",
    "Column",
    "FigureFile",
    "RunHistory",
    "band_figure",
    "draw_band",
    "draw_layer_lines",
    "draw_line",
    "ics_figure",
    "layer_grid_figure",
    "layers_figure",
    "line_figure",
    "new_figure",
    "panel_figure",
    "pick_layers",
    "plain_ticks",
    "save_figure",
    "set_title",
    "short_layer",
    "union_layers",
    "use_log",
]


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


# --- drawing one run ----------------------------------------------------------------------------------
def draw_line(
    ax: Axes,
    run: RunHistory,
    key: str,
    smooth: bool = False,
    loss: bool = False,
    **kw: object,
) -> bool:
    """Draw ``run``'s series of ``key`` up to its first non-finite value. True if anything was drawn.

    A dotted vertical line marks where the series stopped, labelled "diverged" for a loss
    (``loss=True``) and "NaN" or "inf" for any other key. ``smooth=True`` draws a trailing
    moving average; ``loss=True`` also ends the line where the loss exceeds ten times its
    initial level. ``kw`` overrides the run's style.
    """
    all_steps, all_values = run.get(key)
    blowup = _loss_blowup(all_values) if loss else None
    steps, values, diverged = _finite_prefix(all_steps, all_values, blowup)
    if steps.size == 0 and not diverged:
        return False
    style: dict[str, object] = {"color": run.color, "label": run.label, "lw": 1.4}
    style["ls"] = run.linestyle
    style.update(kw)
    if steps.size:
        ax.plot(steps, _smooth(values) if smooth else values, **style)  # type: ignore[arg-type]
        _seed_band(ax, run, key, steps, smooth, style["color"])
    if diverged:
        stop = float(all_steps[steps.size])
        color = style["color"] if style["color"] is not None else "black"
        ax.axvline(stop, color=color, ls=":", lw=1.0, gid="guide")
        # a run diverged when its loss did; a diagnostic's NaN or inf is said as such
        first = float(all_values[steps.size])
        word = "diverged" if loss else ("NaN" if np.isnan(first) else "inf")
        ax.annotate(
            word,
            (stop, 0.97),
            xycoords=("data", "axes fraction"),
            color=color,
            fontsize=7,
            ha="right",
            va="top",
            rotation=90,
        )
    return True


def _seed_band(
    ax: Axes, run: RunHistory, key: str, steps: np.ndarray, smooth: bool, color: object
) -> None:
    """Shade the range over seeds of ``key`` (its ``@lo``/``@hi`` series), where the run has it."""
    s_lo, lo = run.get(key + SEED_LO)
    _, hi = run.get(key + SEED_HI)
    if s_lo.size != hi.size:
        return
    keep = np.isin(s_lo, steps) & np.isfinite(lo) & np.isfinite(hi)
    if keep.sum() < 2:
        return
    lo, hi = lo[keep], hi[keep]
    if smooth:
        lo, hi = _smooth(lo), _smooth(hi)
    ax.fill_between(s_lo[keep], lo, hi, color=color, alpha=0.18, lw=0)


def draw_band(ax: Axes, run: RunHistory, lo_key: str, hi_key: str) -> bool:
    """Fill between ``run``'s ``lo_key`` and ``hi_key`` at their common finite steps."""
    s_lo, lo = run.get(lo_key)
    s_hi, hi = run.get(hi_key)
    common, i_lo, i_hi = np.intersect1d(s_lo, s_hi, return_indices=True)
    lo, hi = lo[i_lo], hi[i_hi]
    keep = np.isfinite(lo) & np.isfinite(hi)
    if not keep.any():
        return False
    steps = common[keep]
    ax.fill_between(steps, lo[keep], hi[keep], color=run.color, alpha=0.3, lw=0)
    ax.plot(steps, lo[keep], color=run.color, lw=0.8)
    ax.plot(steps, hi[keep], color=run.color, lw=0.8, label=run.label)
    return True


def draw_layer_lines(
    ax: Axes, run: RunHistory, prefix: str, suffix: str, limit: int = MAX_LAYERS
) -> list[str]:
    """One line per layer of ``run``'s ``<prefix><layer><suffix>`` keys; the layers drawn."""
    layers = pick_layers(run.layers(prefix, suffix), limit)
    for layer in layers:
        steps, values = run.get(f"{prefix}{layer}{suffix}")
        keep = np.isfinite(values)
        ax.plot(steps[keep], values[keep], marker="o", ms=2.5, lw=1.0, label=short_layer(layer))
    return layers


# --- figures ------------------------------------------------------------------------------------------
def panel_figure(
    panels: Sequence[tuple[str, Sequence[RunHistory]]],
    draw: Callable[[Axes, RunHistory], bool],
    ylabel: str,
    title: str,
    width: float = 4.2,
) -> Figure | None:
    """One column per panel ``(panel title, runs)``, ``draw(ax, run)`` for each run in it.

    ``width`` is the width of one panel in inches.

    Returns:
        The figure, or ``None`` when nothing was drawn.
    """
    fig, axes = new_figure(1, len(panels), width=width)
    drawn = False
    for col, (panel_title, runs) in enumerate(panels):
        ax = axes[0, col]
        for run in runs:
            drawn |= draw(ax, run)
        use_log(ax)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not drawn:
        return None
    set_title(fig, title)
    return fig


def band_figure(
    panels: Sequence[tuple[str, Sequence[RunHistory]]],
    lo_key: str,
    hi_key: str,
    ylabel: str,
    title: str,
    width: float = 4.2,
) -> Figure | None:
    """:func:`panel_figure` of the min-max bands ``lo_key``–``hi_key`` (Fig. 4a, 4b)."""
    return panel_figure(
        panels, lambda ax, run: draw_band(ax, run, lo_key, hi_key), ylabel, title, width
    )


def line_figure(
    panels: Sequence[tuple[str, Sequence[RunHistory]]],
    key: str,
    ylabel: str,
    title: str,
    width: float = 4.2,
) -> Figure | None:
    """:func:`panel_figure` of one line of ``key`` per run (β_eff, Fig. 4c)."""
    return panel_figure(
        panels, lambda ax, run: draw_line(ax, run, key, marker="o", ms=2.5), ylabel, title, width
    )


def union_layers(runs: Sequence[RunHistory], prefix: str, suffix: str) -> list[str]:
    """Layers of ``<prefix><layer><suffix>`` keys over all runs, matched by name, first-seen order."""
    return list(dict.fromkeys(layer for run in runs for layer in run.layers(prefix, suffix)))


class Column(NamedTuple):
    """A column of :func:`layer_grid_figure`: the key ``<prefix><layer><suffix>`` in each row.

    Attributes:
        prefix: key prefix, such as ``"ics/"``.
        suffix: key suffix, such as ``"/l2"``.
        title: the column title.
        ylabel: the y-axis label.
        log: log scale when the data are positive and span over 50× (:func:`use_log`).
    """

    prefix: str
    suffix: str
    title: str
    ylabel: str
    log: bool = True


def layer_grid_figure(
    runs: Sequence[RunHistory],
    layers: Sequence[str],
    columns: Sequence[Column],
    title: str,
    limit: int = MAX_LAYERS,
) -> Figure | None:
    """One row per layer (at most ``limit``), one column per quantity, a line per run in each.

    Args:
        runs: the runs; a layer only some runs have is drawn for those.
        layers: the layer names (see :func:`union_layers`).
        columns: the quantities (see :class:`Column`); the key drawn in row ``layer`` is
            ``<prefix><layer><suffix>``.
        title: the figure title.
        limit: most rows (evenly spread over ``layers``, first and last included).

    Returns:
        The figure, or ``None`` when no run has a value of any drawn key.
    """
    chosen = pick_layers(layers, limit)
    if not chosen or not columns:
        return None
    fig, axes = new_figure(len(chosen), len(columns), width=4.0, height=2.4)
    drawn = False
    for row, layer in enumerate(chosen):
        for col, column in enumerate(columns):
            ax = axes[row, col]
            key = f"{column.prefix}{layer}{column.suffix}"
            for run in runs:
                drawn |= draw_line(ax, run, key, marker="o", ms=2.5)
            if column.log:
                use_log(ax)
            plain_ticks(ax)
            ylabel = column.ylabel
            ax.set_ylabel(f"{short_layer(layer)}\n{ylabel}" if col == 0 else ylabel, fontsize=8)
    if not drawn:
        return None
    for col, column in enumerate(columns):
        axes[0, col].set_title(column.title)
        axes[-1, col].set_xlabel("step")
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
            break
    set_title(fig, title)
    return fig


def layers_figure(
    runs: Sequence[RunHistory],
    prefix: str,
    suffix: str,
    ylabel: str,
    title: str,
    limit: int = MAX_LAYERS,
    ncols: int = 3,
    guide: float | None = None,
) -> Figure | None:
    """One panel per layer of ``<prefix><layer><suffix>`` (matched by name), a line per run.

    Args:
        runs: the runs; a layer only some runs have is drawn for those.
        prefix: key prefix, such as ``"ics/"``.
        suffix: key suffix, such as ``"/l2"``.
        ylabel: the y-axis label.
        title: the figure title.
        limit: most layers drawn (evenly spread, first and last included).
        ncols: panels per row.
        guide: draw a dashed horizontal line at this value (a bound, such as 1).

    Returns:
        The figure, or ``None`` when no run has a value of such a key.
    """
    chosen = pick_layers(union_layers(runs, prefix, suffix), limit)
    if not chosen:
        return None
    ncols = min(ncols, len(chosen))
    nrows = -(-len(chosen) // ncols)
    fig, axes = new_figure(nrows, ncols, width=3.8, height=2.7)
    drawn = False
    for i, layer in enumerate(chosen):
        ax = axes[i // ncols, i % ncols]
        for run in runs:
            drawn |= draw_line(ax, run, f"{prefix}{layer}{suffix}", marker="o", ms=2.5)
        if guide is not None:
            ax.axhline(guide, color="black", ls="--", lw=0.8, gid="guide")
        use_log(ax)
        plain_ticks(ax)
        ax.set_title(short_layer(layer), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for j in range(len(chosen), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    if not drawn:
        return None
    set_title(fig, title)
    return fig


def ics_figure(runs: Sequence[RunHistory], layers: Sequence[str], title: str) -> Figure | None:
    """‖G − G′‖₂ and cos(G, G′) per layer (rows; at most :data:`MAX_LAYERS`), a line per run.

    Returns:
        The figure, or ``None`` without layers.
    """
    return layer_grid_figure(
        runs,
        layers,
        [
            Column("ics/", "/l2", "ℓ2 difference (ideal 0)", "‖G − G′‖₂"),
            Column("ics/", "/cos", "cosine (ideal 1)", "cos(G, G′)", log=False),
        ],
        title,
    )
