"""The ``lightning-bn`` command: reproduce the paper's experiments, or draw the figures of runs.

Usage::

    lightning-bn reproduce [mnist1d|digits|dln|vgg-cifar10] [--quick] [--out DIR] [--lr LR ...]
                           [--steps N] [--seed S] [--seeds N] [--init kaiming|default]
                           [--jobs N] [--data-dir DIR] [--variants K,K,...]
                           [--archs A,A,...] [--measure-every N] [--wandb MODE] ...
    lightning-bn plot RUN [RUN ...] [--labels A,B,...] [--out DIR] [--steps FROM:TO]

Invalid arguments end the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from lightning_bn.reproduce import experiments as registry
from lightning_bn.reproduce.plan import (
    ARCHS,
    EXPERIMENTS,
    FULL_SEEDS,
    INITS,
    KINDS,
    QUICK_SEEDS,
    build_plan,
    default_jobs,
    format_lr,
)

if TYPE_CHECKING:
    from lightning_bn.reproduce import RedrawResult

__all__ = ["build_parser", "main"]

_WANDB_CHOICES = ("auto", "online", "offline", "off")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2), no usage block."""

    def error(self, message: str) -> NoReturn:
        one_line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {one_line} (see `{self.prog} --help`)\n")


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a learning rate (a number > 0), got {text!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a learning rate > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _labels(text: str) -> list[str]:
    labels = [t.strip() for t in text.split(",")]
    if not all(labels):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-empty labels, got {text!r}")
    return labels


def _steps(text: str) -> tuple[int | None, int | None]:
    from lightning_bn.run_logs import parse_steps

    try:
        return parse_steps(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


#: Lightning's ``seed_everything`` (NumPy's legacy seeding) takes seeds in [0, 2**32 - 1].
_MAX_SEED = 2**32 - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer in [0, 2**32 - 1], got {text!r}"
        ) from None
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1], got {text!r}")
    return value


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}, got {text!r}"
            )
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-bn`` argument parser (sub-commands ``reproduce`` and ``plot``)."""
    parser = _Parser(
        prog="lightning-bn",
        description='Reproduce "How Does Batch Normalization Help Optimization?" '
        "(Santurkar et al., 2018) with PyTorch Lightning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rep = sub.add_parser(
        "reproduce",
        help="train the paper's variants, draw its figures and check its findings",
        description="Train standard, BatchNorm, noisy-BatchNorm, ℓ1/ℓ2/ℓ∞ and LayerNorm "
        "variants with every diagnostic callback on, then write figures and summary.md.",
    )
    rep.add_argument(
        "experiment",
        nargs="?",
        default=registry.DEFAULT_EXPERIMENT,
        choices=EXPERIMENTS,
        metavar="EXPERIMENT",
        help=registry.experiments_help(),
    )
    rep.add_argument(
        "--quick",
        action="store_true",
        help=f"reduced budget, {QUICK_SEEDS} seeds ({registry.quick_help()}); under 3 minutes "
        "on 2 CPU cores",
    )
    rep.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="run folder (default: ./lightning-bn-runs/<experiment>-<YYYYmmdd-HHMMSS>)",
    )
    rep.add_argument(
        "--lr",
        type=_learning_rate,
        nargs="+",
        metavar="LR",
        help="learning rates; the smallest is the base one, the largest the 'larger' one "
        "(default: the experiment's, see EXPERIMENT)",
    )
    rep.add_argument("--steps", type=_positive_int, metavar="N", help="optimiser steps per run")
    rep.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="S",
        help="base seed (0): the runs use seeds S, S+1, ...",
    )
    rep.add_argument(
        "--seeds",
        type=_positive_int,
        metavar="N",
        help=f"seeds per variant (default {QUICK_SEEDS} with --quick, else {FULL_SEEDS}); the "
        "findings report the median over seeds and a 95%% interval",
    )
    rep.add_argument(
        "--init",
        choices=INITS,
        default="kaiming",
        help="initialisation of the MLP/CNN/VGG weights: kaiming (He, the fair baseline; "
        "default) or default (PyTorch's, on which the deep standard MLP sits on a loss plateau)",
    )
    rep.add_argument(
        "--jobs",
        type=_positive_int,
        default=default_jobs(),
        metavar="N",
        help=f"runs at a time, one process and one torch thread each (default {default_jobs()})",
    )
    rep.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=registry.data_dir_help(),
    )
    rep.add_argument(
        "--variants",
        type=_names(KINDS),
        metavar="K,K,...",
        help=f"variants to train, among {', '.join(KINDS)}",
    )
    all_archs = tuple(dict.fromkeys(a for archs in ARCHS.values() for a in archs))
    rep.add_argument(
        "--archs",
        type=_names(all_archs),
        metavar="A,A,...",
        help="architectures ("
        + "; ".join(f"{n}: {', '.join(a)}" for n, a in ARCHS.items() if len(a) > 1)
        + ")",
    )
    rep.add_argument(
        "--measure-every",
        type=_positive_int,
        metavar="N",
        help="steps between diagnostic measurements (default: steps // 20)",
    )
    rep.add_argument(
        "--wandb",
        choices=_WANDB_CHOICES,
        default="auto",
        help="W&B: auto (online if an API key is configured, else offline), online, offline, off",
    )
    rep.add_argument(
        "--wandb-project", default="lightning-bn", metavar="NAME", help="W&B project (lightning-bn)"
    )
    rep.add_argument(
        "--accelerator",
        metavar="NAME",
        help="Lightning accelerator (default: cpu; auto for vgg-cifar10)",
    )
    rep.add_argument(
        "--threads",
        type=_non_negative_int,
        default=1,
        metavar="N",
        help="torch CPU threads (default 1, fastest for these small models; 0: torch's default)",
    )
    rep.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the overall progress (the line per finished run stays)",
    )
    rep.add_argument(
        "--verbose",
        action="store_true",
        help="show Lightning's progress bar of every run (--jobs 1 only)",
    )
    # Tiny models and few measurements: the test suite's end-to-end budget.
    rep.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    # Seconds between two progress lines off a terminal (tests shorten it).
    rep.add_argument("--progress-every", type=float, default=None, help=argparse.SUPPRESS)
    rep.set_defaults(handler=_reproduce, subparser=rep)

    plot = sub.add_parser(
        "plot",
        help="draw the paper's figures of logged runs side by side (CSVLogger or reproduce runs)",
        description="Draw the paper's figures (ICS, loss landscape, gradient predictiveness, "
        "β_eff, Hessian, Theorem 4.1, noise) of one or more runs, one line or band per run. "
        "A RUN is a Lightning CSVLogger metrics.csv, a folder holding one (the newest "
        "version_N is taken), or a `lightning-bn reproduce` run folder; a reproduce run given "
        "alone (no other option) gets its own figures and summary.md redrawn.",
    )
    plot.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="a metrics.csv, a CSVLogger folder, or a reproduce run folder",
    )
    plot.add_argument(
        "--labels",
        type=_labels,
        metavar="A,B,...",
        help="legend label of each RUN, comma-separated (default: the folder names)",
    )
    plot.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="folder for the PNG files and index.md (default: figures/ beside the first RUN)",
    )
    plot.add_argument(
        "--steps", type=_steps, metavar="FROM:TO", help="draw only these steps (e.g. 100:500)"
    )
    plot.set_defaults(handler=_plot, subparser=plot)
    return parser


def _check_extras(parser: argparse.ArgumentParser, experiment: str | None) -> None:
    # matplotlib (figures) is optional; an experiment names what else it imports.
    missing: list[tuple[str, str]] = []
    if importlib.util.find_spec("matplotlib") is None:
        missing.append(("matplotlib", "pip install 'lightning-bn[examples]'"))
    missing += registry.missing_requirements(experiment) if experiment else []
    if missing:
        names = ", ".join(dict.fromkeys(name for name, _ in missing))
        how = " and ".join(dict.fromkeys(install for _, install in missing))
        parser.error(f"this command needs {names}: {how}")


def _check_accelerator(parser: argparse.ArgumentParser, name: str) -> None:
    """Refuse an accelerator Lightning does not know or this machine does not have (before the
    run folder is written: Lightning would only fail once the first run starts)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator

    key = name  # Lightning takes the names as they are (lower case)
    if key == "auto":
        return
    known = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
    if key == "gpu":
        available = CUDAAccelerator.is_available() or MPSAccelerator.is_available()
    elif key in AcceleratorRegistry:
        available = AcceleratorRegistry[key]["accelerator"].is_available()
    else:
        parser.error(f"--accelerator {name!r}: expected one of {', '.join(known)}")
    if not available:
        parser.error(f"--accelerator {name!r}: no such device on this machine (use cpu or auto)")


def _check_out_dir(parser: argparse.ArgumentParser, out: Path) -> None:
    """Refuse a run folder that cannot be created or written, creating nothing.

    Probing (a temporary folder made and removed) rather than ``os.access``: permission bits do
    not bind root, and a read-only file system or a pseudo file system answers only a real try.
    """
    shown = str(out)
    if (out / "run.json").exists():
        parser.error(f"--out {shown!r} already holds a run; choose another folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = (
            "exists and is not a folder"
            if existing == out
            else f"is under the file {str(existing)!r}"
        )
        parser.error(f"--out {shown!r} {where}")
    try:
        probe = tempfile.mkdtemp(prefix=".lightning-bn-write-check-", dir=existing)
        os.rmdir(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        parser.error(f"--out {shown!r}: cannot write in {str(existing)!r} ({reason})")


def _reproduce(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from lightning_bn.reproduce import RunInterrupted, reproduce
    from lightning_bn.reproduce.interrupt import interrupt_guard
    from lightning_bn.reproduce.runner import default_out_dir, resolve_wandb_mode

    _check_extras(parser, args.experiment)
    try:
        data_dir = registry.check_data_dir(args.experiment, args.data_dir)
    except ValueError as err:
        parser.error(str(err))
    try:
        plan = build_plan(
            args.experiment,
            quick=args.quick,
            steps=args.steps,
            lrs=args.lr,
            seed=args.seed,
            seeds=args.seeds,
            init=args.init,
            kinds=args.variants,
            archs=args.archs,
            measure_every=args.measure_every,
            data_dir=data_dir,
            accelerator=args.accelerator,
            threads=args.threads or None,
            tiny=args.tiny,
        )
    except ValueError as err:
        parser.error(str(err))
    _check_accelerator(parser, plan.accelerator)
    out: Path = args.out if args.out is not None else default_out_dir(args.experiment)
    _check_out_dir(parser, out)
    mode = resolve_wandb_mode(args.wandb)

    n = len(plan.runs())
    print(
        f"lightning-bn reproduce {plan.experiment}{' --quick' if plan.quick else ''}: {n} runs "
        f"({len(plan.variants())} variants of {', '.join(plan.archs)} at lr "
        f"{', '.join(format_lr(lr) for lr in plan.lrs)} × seeds "
        f"{', '.join(map(str, plan.seed_list))}), {plan.steps} steps each, init {plan.init}, "
        f"diagnostics every {plan.measure_every} steps; {args.jobs} at a time; W&B {mode}; "
        f"output {out}",
        flush=True,
    )
    start = time.perf_counter()
    # The guard (SIGINT, SIGTERM) stays installed until the line below is printed: a second
    # Ctrl-C then still ends the command at once instead of raising KeyboardInterrupt.
    with interrupt_guard():
        try:
            result = reproduce(
                plan,
                out,
                wandb=mode,
                project=args.wandb_project,
                progress=not args.no_progress,
                echo=lambda line: print(line, flush=True),
                jobs=args.jobs,
                verbose=args.verbose,
                progress_every=args.progress_every,
            )
            _report(result, time.perf_counter() - start, mode)
        except RunInterrupted as stop:
            print(stop.message(out), file=sys.stderr, flush=True)
            return stop.exit_code
    return 0


def _finding_lines(result: RedrawResult) -> list[str]:
    lines = []
    for f in result.findings:
        numbers = ""
        if f.verdict != "not evaluated":
            lo, hi = f.interval
            numbers = f"  {f.median:.3g} [{lo:.3g}, {hi:.3g}] vs {f.threshold:g}"
        lines.append(f"  {f.verdict:<15} {f.title} ({f.arch}){numbers}")
    return lines


def _report(result: RedrawResult, seconds: float, mode: str) -> None:
    print("\nFindings (median over seeds [95% interval] vs threshold):")
    for line in _finding_lines(result):
        print(line)
    folder = result.run.path
    print(f"\nsummary: {result.summary}")
    print(f"findings: {result.findings_file}")
    print(f"figures: {len(result.figures)} PNG files in {folder / 'figures'}")
    if mode == "offline":
        print(
            f"W&B: offline runs in {folder / 'wandb'} (upload: wandb sync {folder / 'wandb'}/offline-run-*)"
        )
    elif mode == "online":
        print("W&B: runs logged online (project and group in the run config)")
    cpu = result.run.manifest.get("train_cpu_seconds")
    print(
        f"total time: {seconds:.1f} s" + (f" (training: {cpu} s CPU over the runs)" if cpu else "")
    )


def _plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from lightning_bn.csv_log import LogFormatError

    _check_extras(parser, None)
    runs: list[Path] = args.runs
    if args.labels is not None and len(args.labels) != len(runs):
        parser.error(
            f"--labels: expected one label per RUN ({len(runs)}), got {len(args.labels)}: "
            f"{','.join(args.labels)!r}"
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
    for line in _finding_lines(result):
        print(line)
    return 0


def _default_out(first: Path) -> Path:
    """``figures/`` beside the first run (so never a reproduce run's own ``figures/``)."""
    run_folder = first.parent if first.is_file() else first
    return run_folder.resolve().parent / "figures"


def _plot_runs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from lightning_bn.run_figures import figure_set, save_figures

    out: Path = args.out if args.out is not None else _default_out(args.runs[0])
    if out.name == "figures" and (out.parent / "run.json").is_file():
        parser.error(
            f"--out {str(out)!r} is the figures folder of a reproduce run; choose another folder"
        )
    if out.exists() and not out.is_dir():
        parser.error(f"--out {str(out)!r} exists and is not a folder")
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
    index = save_figures(figures, out)
    print(f"figures: {len(figures.figures)} PNG files in {out} (list: {index})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-bn`` command.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success; argument errors exit with 2 through ``SystemExit``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    status: int = args.handler(args.subparser, args)
    return status


if __name__ == "__main__":
    sys.exit(main())
