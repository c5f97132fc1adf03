"""What every figure of lightning-bn shares: a run's history, the styles, the canvas and axes.

Plain matplotlib on the Agg canvas (no ``pyplot``, so the caller's backend and global figure
state are untouched). :mod:`lightning_bn.figures.draw` draws lines, bands and grids with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_bn._types import Series, SeriesHistory, series_arrays

if TYPE_CHECKING:
    from lightning_bn.logging.extras import MetricHistory

__all__ = [
    "KIND_STYLE",
    "MAX_LAYERS",
    "SEED_HI",
    "SEED_LO",
    "FigureFile",
    "RunHistory",
    "new_figure",
    "pick_layers",
    "plain_ticks",
    "save_figure",
    "set_title",
    "short_layer",
    "use_log",
]


#: Suffixes of the per-seed range series of a key (see :func:`draw_line`).
SEED_LO, SEED_HI = "@lo", "@hi"

#: Label and colour of each normalisation kind (the variants of a reproduce run).
KIND_STYLE: dict[str, tuple[str, str]] = {
    "standard": ("Standard", "#3a3a3a"),
    "batchnorm": ("BatchNorm", "tab:blue"),
    "noisy-batchnorm": ("Noisy BatchNorm", "tab:orange"),
    "l1": ("ℓ1 norm", "tab:green"),
    "l2": ("ℓ2 norm", "tab:red"),
    "linf": ("ℓ∞ norm", "tab:purple"),
    "layernorm": ("LayerNorm", "tab:brown"),
}
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


@dataclass(frozen=True)
class RunHistory(SeriesHistory):
    """One run as the figure builders see it: logged key -> ``(steps, values)``, label, style.

    Attributes:
        label: the legend entry of the run's lines.
        series: key -> ``(steps int array, values float array)``, sorted by step.
        color: the colour of its lines (``None``: matplotlib's cycle).
        linestyle: the line style of its lines.
    """

    label: str
    series: Mapping[str, Series] = field(default_factory=dict)
    color: str | None = None
    linestyle: str = "-"

    @classmethod
    def from_lists(
        cls,
        label: str,
        series: Mapping[str, tuple[Sequence[int], Sequence[float]]],
        **style: Any,
    ) -> RunHistory:
        """A run from plain lists ``key -> (steps, values)``."""
        return cls(label, series_arrays(series), **style)

    @classmethod
    def from_metric_history(cls, label: str, history: MetricHistory, **style: Any) -> RunHistory:
        """A run from what a diagnostic callback logged (its ``panel_history``)."""
        keys = history.keys()  # a list in first-logged order (the history is not iterable)
        return cls.from_lists(label, {k: history.series(k) for k in keys}, **style)


# --- canvas and axes helpers --------------------------------------------------------------------------
def new_figure(
    nrows: int, ncols: int, width: float = 4.2, height: float = 3.0
) -> tuple[Figure, np.ndarray]:
    """An Agg figure of ``nrows × ncols`` panels of ``width × height`` inches, and its axes grid."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.asarray(fig.subplots(nrows, ncols, squeeze=False))


def _drawable_text(fig: Figure) -> None:
    """Replace the surrogate escapes of a label made from a non-UTF-8 folder name (no font can
    draw them) by U+FFFD."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        label = text.get_text()
        if any("\udc80" <= ch <= "\udcff" for ch in label):
            text.set_text(label.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def save_figure(fig: Figure, path: Path, caption: str) -> FigureFile | None:
    """Save ``fig`` as a PNG at ``path`` (folders created).

    Inside :func:`lightning_bn._outputs.pending_figures` the PNG is rendered into the batch and
    written later; a figure matplotlib cannot render (values near the float range, ±1e308) is
    then one line in the batch's ``failed`` and ``None`` is returned.
    """
    import io

    from lightning_bn._outputs import current_batch

    batch = current_batch()
    if batch is None:
        _drawable_text(fig)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_DPI)
        return FigureFile(path, caption)
    buffer = io.BytesIO()
    try:
        _drawable_text(fig)  # lays out the ticks: fails as savefig would
        fig.savefig(buffer, format="png", dpi=_DPI)
    except (ValueError, OverflowError, RuntimeError, MemoryError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        batch.failed.append(f"{path.name}: not drawn, matplotlib cannot draw its values ({reason})")
        return None
    batch.rendered[path] = buffer.getvalue()
    return FigureFile(path, caption)


def pick_layers(layers: Sequence[str], limit: int = MAX_LAYERS) -> list[str]:
    """At most ``limit`` of ``layers``, evenly spread, first and last included."""
    if len(layers) <= limit:
        return list(layers)
    idx = sorted({round(i * (len(layers) - 1) / (limit - 1)) for i in range(limit)})
    return [layers[i] for i in idx]


def short_layer(layer: str) -> str:
    """A layer name without the ``model.`` of the built-in modules."""
    return layer.removeprefix("model.")


def set_title(fig: Figure, title: str) -> None:
    """The figure's title, wrapped to the figure's width (a one-panel figure is narrow)."""
    import textwrap

    chars = max(30, int(fig.get_figwidth() * 10))  # about 10 characters per inch at 12 pt
    fig.suptitle("\n".join(textwrap.wrap(title, chars, break_on_hyphens=False)))


def _drawn_values(ax: Axes) -> np.ndarray:
    """The finite y values of every line on ``ax`` but the guides."""
    parts = [
        np.asarray(line.get_ydata(), dtype=float)
        for line in ax.get_lines()
        if line.get_gid() != "guide"
    ]
    values = np.concatenate(parts) if parts else np.zeros(0)
    values = values[np.isfinite(values)]
    return values


def plain_ticks(ax: Axes) -> None:
    """Readable y ticks on a linear axis: no offset notation (``1e-5+9.999e-1``), and data
    that are constant up to rounding (a first layer's ICS is exactly 0 or 1) get a range
    around their value instead of ticks at the 13th digit."""
    if ax.get_yscale() != "linear":
        return
    values = _drawn_values(ax)
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        scale = max(abs(lo), abs(hi), 1e-12)
        if hi - lo <= 1e-9 * scale:
            pad = 0.05 * scale if scale > 1e-12 else 1.0
            ax.set_ylim(lo - pad, hi + pad)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def use_log(ax: Axes) -> None:
    """Log scale for the y axis when the drawn data are positive and span over 50×."""
    values = _drawn_values(ax)
    if values.size and values.min() > 0 and values.max() / values.min() > 50:
        ax.set_yscale("log")
