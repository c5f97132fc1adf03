"""``lightning-bn reproduce``: train the paper's variants, draw its figures, check its findings."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

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

from lightning_bn.cli._common import (
    _MAX_SEED,
    WANDB_CHOICES,
    Parser,
    arg_folder,
    arg_learning_rate,
    arg_names,
    arg_non_negative_int,
    arg_positive_int,
    arg_seed,
    check_extras,
    finding_lines,
)

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add the ``reproduce`` sub-command to the sub-parsers of ``lightning-bn``."""
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
        type=arg_folder,
        metavar="DIR",
        help="run folder (default: ./lightning-bn-runs/<experiment>-<YYYYmmdd-HHMMSS>)",
    )
    rep.add_argument(
        "--lr",
        type=arg_learning_rate,
        nargs="+",
        metavar="LR",
        help="learning rates; the smallest is the base one, the largest the 'larger' one "
        "(default: the experiment's, see EXPERIMENT)",
    )
    rep.add_argument("--steps", type=arg_positive_int, metavar="N", help="optimiser steps per run")
    rep.add_argument(
        "--seed",
        type=arg_seed,
        default=0,
        metavar="S",
        help="base seed (0): the runs use seeds S, S+1, ...",
    )
    rep.add_argument(
        "--seeds",
        type=arg_positive_int,
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
        type=arg_positive_int,
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
        type=arg_names(KINDS),
        metavar="K,K,...",
        help=f"variants to train, among {', '.join(KINDS)}",
    )
    all_archs = tuple(dict.fromkeys(a for archs in ARCHS.values() for a in archs))
    rep.add_argument(
        "--archs",
        type=arg_names(all_archs),
        metavar="A,A,...",
        help="architectures ("
        + "; ".join(f"{n}: {', '.join(a)}" for n, a in ARCHS.items() if len(a) > 1)
        + ")",
    )
    rep.add_argument(
        "--measure-every",
        type=arg_positive_int,
        metavar="N",
        help="steps between diagnostic measurements (default: steps // 20)",
    )
    rep.add_argument(
        "--wandb",
        choices=WANDB_CHOICES,
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
        type=arg_non_negative_int,
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
    from lightning_bn._outputs import folder_state, foreign_files
    from lightning_bn.reproduce.history import MANIFEST
    from lightning_bn.reproduce.interrupt import process_gone

    shown = str(out)
    state = folder_state(out, markers=(MANIFEST,))
    if state == "ours" and (out / MANIFEST).is_file():
        status = ""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            manifest = json.loads((out / MANIFEST).read_text())
            gone = process_gone(manifest)
            said = manifest.get("status")
            status = " (interrupted (process gone))" if gone else f" ({said})" if said else ""
        parser.error(f"--out {shown!r} already holds a run{status}; pass a new or empty folder")
    if state in ("ours", "foreign"):
        parser.error(
            f"--out {shown!r} holds files lightning-bn did not write ({foreign_files(out)}); "
            "pass a new or empty folder"
        )
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

    check_extras(parser, args.experiment)
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
    last_seed = max(plan.seed_list)
    if last_seed > _MAX_SEED:
        parser.error(
            f"--seed {args.seed} with {plan.seeds} seeds uses seeds up to {last_seed}: expected "
            f"--seed + seeds - 1 <= {_MAX_SEED} (2**32 - 1)"
        )
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
    # Ctrl-C then still ends the command at once instead of raising KeyboardInterrupt; run as
    # the command, later ones are ignored while the process exits.
    with interrupt_guard(until_exit=args.until_exit):
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
        except OSError as err:  # a full disk, a folder made read-only while training
            where = f" {err.filename}" if err.filename else ""
            parser.error(f"cannot write{where}: {err.strerror or err}")
    return 0


def _report(result: RedrawResult, seconds: float, mode: str) -> None:
    for note in result.notes:
        print(note)
    print("\nFindings (median over seeds [95% interval] vs threshold):")
    for line in finding_lines(result):
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
