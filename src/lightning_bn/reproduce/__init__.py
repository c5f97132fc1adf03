"""``lightning-bn reproduce``: the paper's experiments, figures and findings from one call.

Layout of a run folder (default ``./lightning-bn-runs/<experiment>-<YYYYmmdd-HHMMSS>``)::

    run.json                       the plan and the variants (what `plot` reads first)
    csv/<variant>/metrics.csv      every logged metric of a variant (Lightning CSVLogger)
    wandb/offline-run-*/           a W&B run per variant (offline unless logged in)
    figures/*.png                  paper-style figures (see lightning_bn.reproduce.figures)
    summary.md                     the findings table, the runs table and the figures

:func:`reproduce` trains the plan and then calls :func:`redraw`, which reads the CSV files back
and draws the figures and the summary: ``lightning-bn plot RUN_DIR`` is that second half alone.

Example:
    >>> from lightning_bn.reproduce import build_plan, reproduce
    >>> plan = build_plan("digits", quick=True)
    >>> result = reproduce(plan, "runs/digits")  # doctest: +SKIP
    >>> [f.status for f in result.findings]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lightning_bn.reproduce.figures import plot_run
from lightning_bn.reproduce.findings import FINDINGS, Finding, evaluate_findings
from lightning_bn.reproduce.history import RunData, RunFormatError, VariantHistory, load_run
from lightning_bn.reproduce.plan import (
    EXPERIMENTS,
    KINDS,
    ExperimentPlan,
    VariantSpec,
    build_plan,
)
from lightning_bn.reproduce.summary import SUMMARY, render_summary

__all__ = [
    "EXPERIMENTS",
    "FINDINGS",
    "KINDS",
    "SUMMARY",
    "ExperimentPlan",
    "Finding",
    "RedrawResult",
    "RunData",
    "RunFormatError",
    "VariantHistory",
    "VariantSpec",
    "build_plan",
    "evaluate_findings",
    "load_run",
    "redraw",
    "render_summary",
    "reproduce",
]


@dataclass(frozen=True)
class RedrawResult:
    """What :func:`redraw` produced.

    Attributes:
        run: the run read back from its CSV files.
        findings: the evaluated findings.
        figures: paths of the PNG files.
        summary: path of ``summary.md``.
    """

    run: RunData
    findings: list[Finding]
    figures: list[Path]
    summary: Path


def redraw(run_dir: str | Path) -> RedrawResult:
    """Draw the figures and write ``summary.md`` of a run folder from its CSV files.

    Args:
        run_dir: a folder written by :func:`reproduce` (it holds ``run.json``).

    Returns:
        The run, its findings and the files written.

    Raises:
        RunFormatError: ``run_dir`` is not a run folder.
    """
    run = load_run(run_dir)
    findings = evaluate_findings(run)
    figures = plot_run(run)
    summary = run.path / SUMMARY
    summary.write_text(render_summary(run, findings, figures))
    return RedrawResult(run, findings, [f.path for f in figures], summary)


def reproduce(
    plan: ExperimentPlan,
    out_dir: str | Path,
    *,
    wandb: str = "auto",
    project: str = "lightning-bn",
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> RedrawResult:
    """Train every variant of ``plan`` into ``out_dir``, then draw the figures and the summary.

    Args:
        plan: what to train (see :func:`build_plan`).
        out_dir: the run folder (created).
        wandb: ``"auto"`` (online when an API key is configured, else offline), ``"online"``,
            ``"offline"`` or ``"off"``.
        project: the W&B project.
        progress: show Lightning's progress bar for each run.
        echo: where the one-line report per finished variant goes.

    Returns:
        The result of :func:`redraw` on the finished run.
    """
    from lightning_bn.reproduce.runner import resolve_wandb_mode, train_plan

    out = Path(out_dir)
    train_plan(
        plan,
        out,
        wandb_mode=resolve_wandb_mode(wandb),
        project=project,
        progress=progress,
        echo=echo,
    )
    return redraw(out)
