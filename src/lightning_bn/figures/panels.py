"""Figure builders for declared panels that are neither one line nor a band per run.

- :func:`lines_figure`: a panel of several fixed keys (the k largest Hessian eigenvalues, the
  preconditioned sharpness beside its stability threshold), one line per key and run;
- :func:`density_figure`: a logged histogram over training (the Hessian's eigenvalue density,
  keys ``<prefix>lo``, ``<prefix>hi``, ``<prefix>bin_<j>``) as a heatmap of step × value,
  colour the share of mass in each bin, one heatmap per run.

Like :mod:`lightning_bn.figures.draw`, they draw on matplotlib's Agg canvas (no ``pyplot``).

Example::

    from lightning_bn.figures.panels import density_figure

    fig = density_figure(runs, "hessian/density/", "Hessian eigenvalue density")
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from lightning_bn.figures.draw import draw_line
from lightning_bn.figures.style import RunHistory, new_figure, set_title, use_log

__all__ = ["density_columns", "density_figure", "lines_figure"]

#: Line styles of a panel's keys (the colour is the run's).
_STYLES = ("-", "--", ":", "-.")
#: The colour scale spans this many decades below the largest bin mass: the bulk of a Hessian
#: spectrum holds almost all the mass, and its outliers, a few eigenvalues, would be invisible
#: on a linear scale.
_DECADES = 4.0


def lines_figure(
    runs: Sequence[RunHistory],
    lines: Sequence[tuple[str, str]],
    ylabel: str,
    title: str,
    width: float = 5.6,
) -> Figure | None:
    """One axes, a line per ``(key, label)`` and run (the run's colour, a style per key).

    Returns:
        The figure, or ``None`` when no run has a value of any key.
    """
    fig, axes = new_figure(1, 1, width=width)
    ax = axes[0, 0]
    drawn = False
    for i, (key, label) in enumerate(lines):
        for run in runs:
            name = f"{run.label}: {label}" if len(runs) > 1 else label
            drawn |= draw_line(ax, run, key, ls=_STYLES[i % len(_STYLES)], label=name)
    if not drawn:
        return None
    use_log(ax)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    set_title(fig, title)
    return fig


def density_columns(
    run: RunHistory, prefix: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The logged histograms of ``run``: ``(steps, lo, hi, mass)``, ``mass`` of shape (steps, bins).

    Steps where ``lo``, ``hi`` or a bin is missing or not finite are left out; ``None`` when
    no step is complete.
    """
    pattern = re.compile(re.escape(prefix) + r"bin_(\d+)\Z")
    bins = sorted((int(m[1]), key) for key in run.series if (m := pattern.match(key)))
    if not bins:
        return None
    table: dict[int, list[float]] = {}
    for column, key in [(0, prefix + "lo"), (1, prefix + "hi")] + [
        (j + 2, key) for j, (_, key) in enumerate(bins)
    ]:
        for step, value in zip(*run.get(key), strict=True):
            table.setdefault(int(step), [np.nan] * (len(bins) + 2))[column] = float(value)
    steps = np.array(sorted(table), dtype=np.int64)
    if steps.size == 0:
        return None
    rows = np.array([table[int(s)] for s in steps])
    keep = np.isfinite(rows).all(axis=1)
    if not keep.any():
        return None
    rows, steps = rows[keep], steps[keep]
    return steps, rows[:, 0], rows[:, 1], rows[:, 2:]


def density_figure(
    runs: Sequence[RunHistory], prefix: str, ylabel: str, title: str
) -> Figure | None:
    """One heatmap per run: x the measured step, y the value, colour the bin's mass.

    Each measured step is a column from its step to the next (the last as wide as the one
    before it), split into the logged bins between that step's ``lo`` and ``hi``; the colour
    is logarithmic over :data:`_DECADES` decades below the largest mass of all runs.

    Returns:
        The figure, or ``None`` when no run logged a complete histogram.
    """
    found = [(run, cols) for run in runs if (cols := density_columns(run, prefix)) is not None]
    if not found:
        return None
    top = max(float(cols[3].max()) for _, cols in found)
    floor = top * 10.0**-_DECADES
    norm = LogNorm(vmin=floor, vmax=top, clip=True)
    fig, axes = new_figure(1, len(found), width=5.0, height=3.4)
    mesh = None
    for ax, (run, (steps, lo, hi, mass)) in zip(axes[0], found, strict=True):
        gap = np.diff(steps).astype(float)
        width = np.append(gap, gap[-1] if gap.size else 1.0)
        for step, w, a, b, m in zip(steps, width, lo, hi, mass, strict=True):
            edges = np.linspace(a, b, m.size + 1)
            mesh = ax.pcolormesh(
                [step, step + w], edges, np.maximum(m, floor)[:, None], norm=norm, cmap="magma"
            )
        ax.set_title(run.label, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    assert mesh is not None
    fig.colorbar(mesh, ax=list(axes[0]), label="share of eigenvalues in the bin")
    set_title(fig, title)
    return fig
