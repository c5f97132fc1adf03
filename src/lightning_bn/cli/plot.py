"""``lightning-bn plot``: the paper's figures of any logged runs, or a reproduce run redrawn."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_bn.cli._common import (
    Parser,
    arg_folder,
    arg_labels,
    arg_steps,
    check_extras,
    finding_lines,
)

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add the ``plot`` sub-command to the sub-parsers of ``lightning-bn``."""
    plot = sub.add_parser(
        "plot",
        help="draw the paper's figures of logged runs side by side (CSVLogger, TensorBoard or"
        " reproduce runs)",
        description="Draw the paper's figures (ICS, loss landscape, gradient predictiveness, "
        "β_eff, Hessian, Theorem 4.1, noise) of one or more runs, one line or band per run. "
        "A RUN is a Lightning CSVLogger metrics.csv or TensorBoard event file, a folder "
        "holding either (the newest version_N is taken), or a `lightning-bn reproduce` run folder; a reproduce run given "
        "alone (no other option) gets its own figures and summary.md redrawn.",
    )
    plot.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="a metrics.csv, a TensorBoard event file, a CSVLogger or TensorBoardLogger folder,"
        " or a reproduce run folder",
    )
    plot.add_argument(
        "--labels",
        type=arg_labels,
        metavar="A,B,...",
        help="legend label of each RUN, comma-separated (default: the folder names)",
    )
    plot.add_argument(
        "--out",
        type=arg_folder,
        metavar="DIR",
        help="folder for the PNG files and index.md: a new or empty one, or one lightning-bn "
        "wrote (default: lightning-bn-plot/ in the first RUN's folder, -2, -3, ... when that "
        "holds files of yours)",
    )
    plot.add_argument(
        "--steps", type=arg_steps, metavar="FROM:TO", help="draw only these steps (e.g. 100:500)"
    )
    plot.set_defaults(handler=_plot, subparser=plot)


def _plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from lightning_bn.logging.csv_log import LogFormatError

    check_extras(parser, None)
    runs: list[Path] = args.runs
    if args.labels is not None and len(args.labels) != len(runs):
        parser.error(
            f"--labels: expected one label per RUN ({len(runs)}), got {len(args.labels)}: "
            f"{','.join(args.labels)!r}"
        )
    for run in runs:
        if not run.exists():
            parser.error(
                f"RUN {str(run)!r}: no such file or folder (expected a metrics.csv, a CSVLogger "
                "folder or a lightning-bn reproduce run folder)"
            )
    alone = args.labels is None and args.out is None and args.steps is None
    try:
        if alone and len(runs) == 1 and (runs[0] / "run.json").is_file():
            return _redraw(runs[0])
        return _plot_runs(parser, args)
    except LogFormatError as err:
        parser.error(str(err))
    except OSError as err:
        # a read-only folder, a full disk: one line naming the file, not a traceback
        where = f" {err.filename}" if err.filename else ""
        parser.error(f"cannot write{where}: {err.strerror or err}")


def _redraw(run_dir: Path) -> int:
    """A reproduce run alone: its own figures and summary.md, as `reproduce` draws them."""
    from lightning_bn.reproduce import redraw

    result = redraw(run_dir)
    for note in result.notes:
        print(note)
    print(f"summary: {result.summary}")
    print(f"findings: {result.findings_file}")
    folder = result.figures[0].parent if result.figures else result.run.path / "figures"
    print(f"figures: {len(result.figures)} PNG files in {folder}")
    for line in finding_lines(result):
        print(line)
    return 0


def _default_out(first: Path) -> Path:
    """``lightning-bn-plot/`` in the first run's folder (inside the folder given, never beside
    it), or ``lightning-bn-plot-2/`` … when that one holds files lightning-bn did not write."""
    from lightning_bn._outputs import folder_state

    base = (first.parent if first.is_file() else first) / "lightning-bn-plot"
    out, n = base, 1
    while folder_state(out) in ("foreign", "file"):
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _plot_runs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from lightning_bn._outputs import OutputFolder, folder_state, foreign_files
    from lightning_bn.plot.run_figures import figure_set, save_figures

    out: Path = args.out if args.out is not None else _default_out(args.runs[0])
    if out.name == "figures" and (out.parent / "run.json").is_file():
        parser.error(
            f"--out {str(out)!r} is the figures folder of a reproduce run; choose another folder"
        )
    state = folder_state(out)
    if state == "file":
        parser.error(f"--out {str(out)!r} exists and is not a folder")
    if state == "foreign":
        parser.error(
            f"--out {str(out)!r} holds files lightning-bn did not write ({foreign_files(out)}); "
            "pass a new or empty folder, or leave --out off"
        )
    figures = figure_set(args.runs, args.labels, args.steps or (None, None))
    loaded = figures.loaded
    assert loaded is not None  # figure_set always records what it read
    for line in loaded.incomplete:
        print(line)
    if not loaded.runs:
        parser.error("no complete run to draw (every run given is incomplete)")
    for run in loaded.runs:
        print(f"run {run.label!r}: {run.source}")
        for note in run.notes:
            print(f"  {note}")
    for line in figures.skipped:
        print(line)
    if not figures.figures:
        window = " in the --steps window" if args.steps else ""
        parser.error(f"nothing to draw: no run has a diagnostic value{window}")
    folder = OutputFolder.open(out)
    index = save_figures(figures, out, folder)
    for line in folder.notes:
        print(line)
    drawn = sum(1 for f in figures.figures if f"{f.name}.png" in folder.written)
    if not drawn:
        parser.error(f"no figure could be drawn or written (see {index})")
    print(f"figures: {drawn} PNG files in {out} (list: {index})")
    return 0
