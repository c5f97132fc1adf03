"""The paper's figures for any logged runs, side by side: ``lightning-bn plot`` and :func:`plot_runs`.

Each run (a CSVLogger ``metrics.csv``, a folder holding one, or the finished variants of a
reproduce run; see :mod:`lightning_bn.plot.run_logs`) is one line or band, in its own colour, in
every figure its logged keys allow. The figures are those of :data:`lightning_bn.logging.panels.PAPER_PANELS`
(the W&B charts, under the same names and titles) plus the training loss and the noise
statistics, drawn with the builders of :mod:`lightning_bn.figures.draw` that the reproduce figures
use too:

========================== ===============================================================
file                       what it shows
========================== ===============================================================
``train_loss.png``         training loss (``train/loss``, if logged)
``loss_range.png``         band of L(W − ηg) over the step sizes η (Fig. 4a)
``grad_predictiveness``    band of ‖g − ∇L(W − ηg)‖ over η (Fig. 4b)
``beta_smoothness.png``    effective β-smoothness (Fig. 4c)
``ics_l2.png``             ‖G − G′‖₂ per layer (Fig. 3)
``ics_cos.png``            cos(G, G′) per layer (Fig. 3)
``thm41_ratio.png``        Theorem 4.1 ratio per normalisation layer (≤ 1)
``act_grad_norm.png``      ‖∇_y L‖ per normalisation layer
``hessian_top_eig.png``    top Hessian eigenvalue
``grad_curvature.png``     gᵀHg / ‖g‖²
``noise_stats.png``        mean and std of each noisy layer's output before and after the noise
========================== ===============================================================

Example (a notebook)::

    from lightning_bn import plot_runs

    figs = plot_runs(["lightning_logs/bn", "lightning_logs/plain"], labels=["BN", "plain"])
    figs[0]  # a matplotlib Figure; fig.get_label() is its name, e.g. "loss_range"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lightning_bn._outputs import OutputFolder
from lightning_bn.figures.draw import (
    Column,
    RunHistory,
    band_figure,
    draw_line,
    layer_grid_figure,
    layers_figure,
    line_figure,
    panel_figure,
    union_layers,
)
from lightning_bn.figures.panels import density_figure, lines_figure
from lightning_bn.logging.keys import Panel, panels_for
from lightning_bn.plot.run_logs import Loaded, LoggedRun, load_runs

__all__ = ["FigureSet", "RunFigure", "build_figures", "plot_runs", "save_figures"]

#: What fills each figure that no callback declares, said when it is skipped (the panels of the
#: diagnostic callbacks carry their own, :attr:`~lightning_bn.logging.keys.Panel.source`).
_SOURCE = {
    "train_loss": "train/loss (self.log('train/loss', ...) in training_step)",
    "noise_stats": "noise/<layer>/... (NoiseInjectionCallback)",
}

#: One sentence on each figure that no callback declares (a panel has its
#: :attr:`~lightning_bn.logging.keys.Panel.caption`).
_CAPTION = {
    "train_loss": "Training loss of each run (a moving average; a dotted line marks where a "
    "run diverged).",
    "noise_stats": "Noise injection (Fig. 2): mean and standard deviation of each noisy "
    "layer's output before the noise (clean) and after it (what the next layer receives).",
}

#: Width in inches of a one-panel figure (room for the panel's title).
_WIDTH = 5.6

_NOISE_COLUMNS = [
    Column("noise/", "/clean_mean", "mean before noise", "mean", log=False),
    Column("noise/", "/clean_std", "std before noise", "std", log=False),
    Column("noise/", "/out_mean", "mean after noise", "mean", log=False),
    Column("noise/", "/out_std", "std after noise", "std", log=False),
]


@dataclass(frozen=True)
class RunFigure:
    """A figure of :func:`build_figures`.

    Attributes:
        name: its file stem (a W&B panel's key without ``panels/``, ``train_loss`` or
            ``noise_stats``).
        figure: the matplotlib figure (its label is ``name``).
        caption: one sentence on what it shows (the line of ``index.md``).
    """

    name: str
    figure: Figure
    caption: str


@dataclass
class FigureSet:
    """The figures of some runs, and the lines to tell the user.

    Attributes:
        figures: the figures drawn, in the order of the module docstring.
        skipped: one line per figure not drawn, saying why.
        loaded: the runs as read (with incomplete runs and notes).
    """

    figures: list[RunFigure]
    skipped: list[str] = field(default_factory=list)
    loaded: Loaded | None = None


def _history(run: LoggedRun, index: int) -> RunHistory:
    # C0, C1, ...: the same colour for a run in every figure
    return RunHistory(run.label, run.series, color=f"C{index % 10}")


def _panel_figure(panel: Panel, runs: Sequence[RunHistory]) -> Figure | None:
    keys = [key for key, _ in panel.lines]
    if panel.kind == "density":
        return density_figure(runs, keys[0].removesuffix("*"), panel.ylabel, panel.title)
    if panel.per_layer:
        head, _, tail = keys[0].partition("{layer}")
        return layers_figure(runs, head, tail, panel.ylabel, panel.title, guide=panel.guide)
    if panel.kind == "band":  # a min-max band over the step sizes
        return band_figure([("", runs)], keys[0], keys[1], panel.ylabel, panel.title, _WIDTH)
    if len(keys) > 1:
        return lines_figure(runs, panel.lines, panel.ylabel, panel.title, _WIDTH)
    return line_figure([("", runs)], keys[0], panel.ylabel, panel.title, _WIDTH)


def _train_loss(runs: Sequence[RunHistory]) -> Figure | None:
    def draw(ax: Axes, run: RunHistory) -> bool:
        return draw_line(ax, run, "train/loss", smooth=True, loss=True)

    ylabel = "training loss (moving average)"
    return panel_figure([("", runs)], draw, ylabel, "Training loss", _WIDTH)


def build_figures(runs: Sequence[RunHistory]) -> FigureSet:
    """Every figure the runs' logged keys allow, one line or band per run.

    Args:
        runs: the runs (labels and colours as they should appear).

    Returns:
        The figures, and one line per figure skipped for want of data.
    """
    source, caption = dict(_SOURCE), dict(_CAPTION)
    made: list[tuple[str, Figure | None]] = [("train_loss", _train_loss(runs))]
    for panel in panels_for(key for run in runs for key in run.series):
        made.append((panel.name, _panel_figure(panel, runs)))
        source[panel.name] = panel.source or " or ".join(key for key, _ in panel.lines)
        caption[panel.name] = panel.caption or panel.title
    noise_layers = union_layers(runs, "noise/", "/out_std")
    made.append(
        (
            "noise_stats",
            layer_grid_figure(
                runs,
                noise_layers,
                _NOISE_COLUMNS,
                "Noise injection: layer output before and after the noise (Fig. 2)",
                limit=4,
            ),
        )
    )
    out = FigureSet([])
    for name, fig in made:
        if fig is None:
            out.skipped.append(f"{name}.png skipped: no run logged {source[name]}")
            continue
        fig.set_label(name)
        out.figures.append(RunFigure(name, fig, caption[name]))
    return out


def figure_set(
    runs: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    steps: tuple[int | None, int | None] = (None, None),
) -> FigureSet:
    """Read ``runs`` (see :func:`lightning_bn.plot.run_logs.load_runs`) and build their figures."""
    loaded = load_runs(runs, labels, steps)
    out = build_figures([_history(run, i) for i, run in enumerate(loaded.runs)])
    out.loaded = loaded
    return out


def plot_runs(
    runs: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    steps: tuple[int | None, int | None] | str | None = None,
) -> list[Figure]:
    """The paper's figures of several logged runs side by side (for notebooks).

    Args:
        runs: CSVLogger ``metrics.csv`` files, TensorBoard event files, folders holding
            either (at any depth of ``version_N``; the newest is taken) or ``lightning-bn
            reproduce`` run folders (each finished variant is one run).
        labels: one legend label per entry of ``runs`` (default: the folder names).
        steps: keep the steps in ``(FROM, TO)`` or ``"FROM:TO"`` (either side may be open).

    Returns:
        One matplotlib figure per figure the logged keys allow (``fig.get_label()`` is its
        name, such as ``"loss_range"``), one line or band per run in each axes.

    Raises:
        lightning_bn.logging.csv_log.LogFormatError: a run is missing, unreadable, cut short or has no
            diagnostic key (the message names the file).
        ValueError: ``labels`` or ``steps`` are malformed.

    Example:
        >>> from lightning_bn import plot_runs
        >>> figs = plot_runs(["logs/bn", "logs/plain"], labels=["BN", "plain"])  # doctest: +SKIP
    """
    from lightning_bn.plot.run_logs import parse_steps

    if isinstance(runs, (str, Path)):
        runs = [runs]
    window = parse_steps(steps) if isinstance(steps, str) else (steps or (None, None))
    return [f.figure for f in figure_set(runs, labels, window).figures]


def _relative(path: Path, start: Path) -> str:
    import os

    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return str(path)


def save_figures(figures: FigureSet, out: Path, folder: OutputFolder | None = None) -> Path:
    """Save the figures as ``<out>/<name>.png`` and write ``<out>/index.md``.

    Files go through ``folder`` (default: :meth:`OutputFolder.open` of ``out``): a file there
    that lightning-bn did not write is kept under a new name, figures an earlier call wrote and
    this one does not draw are removed, and a figure that cannot be drawn or written is one line
    in ``folder.notes`` and under "Not drawn" in ``index.md``.

    Returns:
        The path of ``index.md``.
    """
    from lightning_bn._outputs import OutputFolder, pending_figures
    from lightning_bn.figures.draw import save_figure

    folder = folder if folder is not None else OutputFolder.open(out)
    with pending_figures() as batch:
        for fig in figures.figures:
            save_figure(fig.figure, out / f"{fig.name}.png", fig.caption)
    written, failed = batch.write(folder)
    problems = batch.failed + failed
    folder.notes += problems
    lines = ["# lightning-bn plot", ""]
    loaded = figures.loaded
    if loaded is not None:
        lines += ["Runs:", ""]
        # sources relative to index.md where they can be, so the folder can move with its runs
        lines += [f"- **{r.label}**: `{_relative(r.source, out)}`" for r in loaded.runs]
        lines += [f"- {line}" for line in loaded.incomplete]
        lines += [f"- {note}" for r in loaded.runs for note in r.notes]
        lines.append("")
    lines += ["Figures:", ""]
    for fig in figures.figures:
        if out / f"{fig.name}.png" in written:
            lines.append(f"- [`{fig.name}.png`]({fig.name}.png): {fig.caption}")
    not_drawn = list(figures.skipped) + problems
    if not_drawn:
        lines += ["", "Not drawn:", ""] + [f"- {line}" for line in not_drawn]
    index = folder.write_text(out / "index.md", "\n".join(lines) + "\n")
    folder.remove_stale(keep=batch.rendered)
    return index
