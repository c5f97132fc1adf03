"""``summary.md`` of a reproduce run: the findings table, the runs table and the figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_bn.reproduce.findings import (
    NOT_EVALUATED,
    REPRODUCED,
    Finding,
    final_train_loss,
    final_val_acc,
    mean_train_loss,
)
from lightning_bn.reproduce.history import RunData
from lightning_bn.reproduce.plan import format_lr

if TYPE_CHECKING:
    from lightning_bn.plotting import FigureFile

__all__ = ["SUMMARY", "render_summary"]

#: File name of the summary in a run folder.
SUMMARY = "summary.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _num(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def _status(finding: Finding) -> str:
    if finding.status == REPRODUCED:
        return "**reproduced**"
    if finding.status == NOT_EVALUATED:
        return "not evaluated"
    return "**not reproduced**"


def _setup_lines(run: RunData) -> list[str]:
    plan = run.plan
    lrs = ", ".join(format_lr(lr) for lr in plan.lrs)
    if len(plan.lrs) > 1:
        lrs += f" (base {format_lr(plan.base_lr)}, larger {format_lr(plan.large_lr)})"
    budget = "quick" if plan.quick else "full"
    created = run.manifest.get("created", "?")
    lines = [
        f"- run: `{run.path.name}` ({budget} budget), created {created}, "
        f"lightning-bn {run.manifest.get('lightning_bn', '?')}, seed {plan.seed}",
        f"- architectures: {', '.join(plan.archs)}; variants: {', '.join(plan.kinds)}",
        f"- learning rates: {lrs}; plain SGD, {plan.steps} steps per run, batch "
        f"{plan.n_samples if plan.experiment == 'dln' else plan.batch_size}"
        + (" (full batch)" if plan.experiment == "dln" else ""),
        f"- diagnostics (ICS, loss landscape, gradient predictiveness, β_eff, Hessian, "
        f"Theorem 4.1) every {plan.measure_every} steps; noise statistics every "
        f"{plan.log_every} steps",
    ]
    if "train_seconds" in run.manifest:
        lines.append(f"- training time: {run.manifest['train_seconds']} s in all")
    if run.missing:
        lines.append(f"- runs missing from this folder (interrupted?): {', '.join(run.missing)}")
    lines += [f"- note: {note}" for note in plan.notes]
    return lines


def render_summary(
    run: RunData, findings: Sequence[Finding], figures: Sequence[FigureFile] = ()
) -> str:
    """The Markdown text of ``summary.md``.

    Args:
        run: the run.
        findings: the evaluated findings (one table row each).
        figures: the figures to list (paths relative to the run folder where possible).
    """
    plan = run.plan
    classification = plan.task == "classification"
    title = f"# lightning-bn reproduce: {plan.experiment}" + (" (--quick)" if plan.quick else "")
    out = [
        title,
        "",
        'The findings of Santurkar et al. (2018), "How Does Batch Normalization Help '
        'Optimization?", checked on this run. A finding is **reproduced** only when its '
        "criterion (last column, fixed in advance in `lightning_bn/reproduce/findings.py`) "
        "holds; otherwise it is reported as not reproduced, with the numbers that decided it.",
        "",
        *_setup_lines(run),
        "",
        "## Findings",
        "",
        "| # | finding | result | numbers | criterion |",
        "|---|---|---|---|---|",
    ]
    for i, f in enumerate(findings, 1):
        out.append(
            f"| {i} | {_cell(f.claim)} | {_status(f)} | {_cell(f.numbers)} | {_cell(f.criterion)} |"
        )
    evaluated = [f for f in findings if f.status != NOT_EVALUATED]
    reproduced = [f for f in evaluated if f.status == REPRODUCED]
    out += [
        "",
        f"{len(reproduced)} of {len(evaluated)} evaluated findings reproduced"
        + (
            f" ({len(findings) - len(evaluated)} not evaluated)."
            if len(evaluated) < len(findings)
            else "."
        ),
        "",
        "## Runs",
        "",
    ]
    header = ["arch", "variant", "lr"]
    if classification:
        header.append("final val acc")
    header += [
        "final val loss",
        "final train loss",
        "mean train loss",
        "diverged at step",
        "time (s)",
    ]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for history in run.histories.values():
        spec = history.spec
        row = [spec.arch, spec.kind, format_lr(spec.lr)]
        if classification:
            row.append(_num(final_val_acc(history)))
        diverged = history.last("final/diverged_step")
        row += [
            _num(history.last("final/val_loss"), 4),
            _num(final_train_loss(history), 4),
            _num(mean_train_loss(history), 4),
            "–" if math.isnan(diverged) else str(int(diverged)),
            _num(history.last("final/wall_time_s"), 3),
        ]
        out.append("| " + " | ".join(row) + " |")
    if figures:
        out += ["", "## Figures", ""]
        for fig in figures:
            try:
                rel = Path(fig.path).resolve().relative_to(run.path.resolve())
            except ValueError:
                rel = Path(fig.path)
            out.append(f"- [`{rel.as_posix()}`]({rel.as_posix()}): {fig.caption}")
    out.append("")
    return "\n".join(out)
