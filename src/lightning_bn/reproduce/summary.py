"""``summary.md`` of a reproduce run: the findings table, the runs table and the figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_bn.reproduce.findings import (
    BOOTSTRAP_SAMPLES,
    EARLY_PHASE,
    INCONCLUSIVE,
    LEVEL,
    NOT_EVALUATED,
    REPRODUCED,
    Comparison,
    Finding,
    final_train_loss,
    final_val_acc,
    fit_sentences,
    mean_train_loss,
)
from lightning_bn.reproduce.history import RunData, VariantHistory
from lightning_bn.reproduce.plan import ExperimentPlan, format_lr

if TYPE_CHECKING:
    from lightning_bn.figures.draw import FigureFile

__all__ = ["FINDINGS_JSON", "SUMMARY", "findings_json", "render_summary"]

#: File name of the summary in a run folder.
SUMMARY = "summary.md"
#: File name of the machine-readable findings in a run folder.
FINDINGS_JSON = "findings.json"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _num(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}g}"


def _interval(interval: tuple[float, float]) -> str:
    return f"[{_num(interval[0])}, {_num(interval[1])}]"


def _verdict(text: str) -> str:
    if text == REPRODUCED:
        return "**reproduced**"
    if text == INCONCLUSIVE:
        return "*inconclusive*"
    if text == NOT_EVALUATED:
        return "not evaluated"
    return "**not reproduced**"


def _json_number(value: float) -> float | None:
    # JSON has no NaN or infinity: a statistic that is undefined (NaN) or infinite (a run that
    # never reached the target, a diverged denominator) is written as null.
    return float(value) if math.isfinite(value) else None


def _run_row(history: VariantHistory, plan: ExperimentPlan) -> dict[str, Any]:
    spec = history.spec
    diverged = history.last("final/diverged_step")
    return {
        "id": spec.run_id(history.seed if history.seed is not None else 0),
        "arch": spec.arch,
        "variant": spec.kind,
        "variant_id": spec.id,
        "lr": spec.lr,
        "seed": history.seed,
        "batch_size": plan.n_samples if plan.experiment == "dln" else plan.batch_of(spec),
        "init_scale": spec.init_scale,
        "final_val_acc": _json_number(final_val_acc(history)),
        "final_val_loss": _json_number(history.last("final/val_loss")),
        "mean_train_loss": _json_number(mean_train_loss(history)),
        "diverged_at": None if math.isnan(diverged) else int(diverged),
        "wall_time_s": _json_number(history.last("final/wall_time_s")),
        "cpu_time_s": _json_number(history.last("final/cpu_time_s")),
    }


def _comparison_json(c: Comparison) -> dict[str, Any]:
    out: dict[str, Any] = {
        "median": _json_number(c.median),
        "interval": [_json_number(v) for v in c.interval],
        "verdict": c.verdict,
        "per_seed": [_json_number(v) for v in c.per_seed],
        "steps": [list(p) for p in c.steps],
        "resampled": c.resampled,
    }
    if c.bins:
        out["bins"] = list(c.bins)
    return out


def findings_json(run: RunData, findings: Sequence[Finding]) -> dict[str, Any]:
    """The content of ``findings.json``: the evaluated findings and every run.

    Schema: ``{"base_lr": float, "seeds": [int], "phase_rule": str, "fits": [str],
    "findings": [{"id", "title", "verdict", "seeds": int, "median", "interval": [lo, hi],
    "threshold", "criterion", "decided_by", "resampled", ...}], "runs": [{"arch", "variant",
    "lr", "seed", "batch_size", "final_val_acc", "final_val_loss", "mean_train_loss",
    "diverged_at", ...}]}``, plus the findings the run could not evaluate
    (``"not_evaluated"``) and the setup. Non-finite numbers are ``null``.

    A per-step finding (ICS, Fig. 4a-c) also has ``"phase"`` (the deciding comparison: its
    numbers are the finding's ``median``/``interval``), ``"whole_run"`` and ``"matched_loss"``,
    each ``{"median", "interval", "verdict", "per_seed", "steps", "resampled"}``: ``steps`` per
    seed is ``[paired measured steps kept]`` (phase, whole run) or ``[BN steps, standard
    steps]`` in the shared loss bins (matched loss, which adds ``"bins"``: shared bins per
    seed); ``resampled`` says what the bootstrap redrew. ``"fit_steps"`` gives per seed the step
    at which each network fitted its training data (``null``: not within the run).
    """
    plan = run.plan
    rows = []
    for f in findings:
        if f.verdict == NOT_EVALUATED:
            continue
        comparisons = {
            key: _comparison_json(c)
            for key, c in (
                ("phase", f.phase),
                ("whole_run", f.whole_run),
                ("matched_loss", f.matched),
            )
            if c is not None
        }
        rows.append(
            {
                "id": f.id,
                "title": f.title,
                "verdict": f.verdict,
                "seeds": len(f.seeds),
                "median": _json_number(f.median),
                "interval": [_json_number(v) for v in f.interval],
                "threshold": f.threshold,
                "criterion": f.criterion.rule(),
                "side": f.criterion.side,
                "statistic": f.criterion.statistic,
                "source": f.criterion.source,
                "arch": f.arch,
                "seed_list": list(f.seeds),
                "per_seed": [_json_number(v) for v in f.per_seed],
                "numbers": f.numbers,
                "decided_by": f.decided_by or "the one comparison",
                "resampled": f.resampled,
                **comparisons,
                **(
                    {"fit_steps": [{"batchnorm": a, "standard": b} for a, b in f.fits]}
                    if f.phase is not None
                    else {}
                ),
            }
        )
    return {
        "format": 1,
        "experiment": plan.experiment,
        "quick": plan.quick,
        "init": plan.init,
        "base_lr": plan.base_lr,
        "seeds": run.seeds or plan.seed_list,
        "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "level": LEVEL},
        "phase_rule": EARLY_PHASE.describe(),
        "fits": fit_sentences(run),
        "findings": rows,
        "not_evaluated": [
            {"id": f.id, "title": f.title, "reason": f.numbers}
            for f in findings
            if f.verdict == NOT_EVALUATED
        ],
        "runs": [_run_row(h, plan) for h in run.histories.values()],
    }


def _setup_lines(run: RunData) -> list[str]:
    plan = run.plan
    lrs = ", ".join(format_lr(lr) for lr in plan.lrs)
    if len(plan.lrs) > 1:
        lrs += f" (base {format_lr(plan.base_lr)}, larger {format_lr(plan.large_lr)})"
    budget = "quick" if plan.quick else "full"
    created = run.manifest.get("created", "?")
    seeds = run.seeds or plan.seed_list
    init = (
        "He/Kaiming (`--init kaiming`: N(0, 2/fan_in) weights, zero biases; the standard "
        "networks train at the base lr)"
        if plan.init == "kaiming"
        else "PyTorch's default (`--init default`: the deep standard MLP starts on a loss "
        "plateau at the base lr)"
    )
    lines = [
        f"- run: `{run.path.name}` ({budget} budget), created {created}, "
        f"lightning-bn {run.manifest.get('lightning_bn', '?')}",
        f"- seeds: {', '.join(map(str, seeds))} ({len(seeds)}); each variant is trained once "
        "per seed (initialisation, data split and order, noise)",
        f"- initialisation: {init}",
        f"- architectures: {', '.join(plan.archs)}; variants: {', '.join(plan.kinds)}"
        + (
            f" (at the larger lr: {', '.join(plan.large_lr_kinds)})"
            if plan.large_lr_kinds is not None and len(plan.lrs) > 1
            else ""
        ),
        f"- learning rates: {lrs}; plain SGD, {plan.steps} steps per run, batch "
        f"{plan.n_samples if plan.experiment == 'dln' else plan.batch_size}"
        + (" (full batch)" if plan.experiment == "dln" else ""),
    ]
    if plan.init_scales:
        lines.append(
            f"- initialisation finding: standard and BatchNorm with the initial weights scaled "
            f"by {', '.join(f'×{s:g}' for s in plan.init_scales)}"
        )
    if plan.small_batches:
        lines.append(
            f"- batch-size finding: BatchNorm and LayerNorm at batch "
            f"{', '.join(map(str, plan.small_batches))} (same steps and lr)"
        )
    lines.append(
        f"- diagnostics (ICS, loss landscape, gradient predictiveness, β_eff, Hessian, Theorem "
        f"4.1) on the {', '.join(plan.diagnose_kinds or ('every',))} runs, every "
        f"{plan.measure_every} steps"
    )
    if "train_seconds" in run.manifest:
        cpu = run.manifest.get("train_cpu_seconds")
        jobs = run.manifest.get("jobs", 1)
        lines.append(
            f"- training time: {run.manifest['train_seconds']} s wall, {jobs} run(s) at a time"
            + (f"; {cpu} s CPU summed over the runs" if cpu is not None else "")
        )
    if run.missing:
        lines.append(f"- runs missing from this folder (interrupted?): {', '.join(run.missing)}")
    lines += [f"- note: {note}" for note in plan.notes]
    return lines


def _phase_section(run: RunData, compared: Sequence[Finding]) -> list[str]:
    out = ["", "### Per-step findings: early phase, whole run, matched loss", ""]
    out += fit_sentences(run)
    if not compared:
        return out
    out += [
        "",
        "The ICS and Fig. 4 findings are statistics of the per-step ratio BN ÷ standard at the "
        "same step and seed (median over the kept measured steps, then over seeds). **The early "
        f"phase decides the verdict**: {EARLY_PHASE.describe()}, the phase in which the paper "
        "states these claims. The whole run is the same statistic over every measured step; the "
        "matched-loss comparison bins every measured step by its measured batch's own loss "
        f"({EARLY_PHASE.bin_decades:g}-decade bins) and compares the two networks within the "
        "bins both visit. Bootstrap: seeds with replacement and, within a seed, moving blocks "
        "of consecutive measured steps (early phase, whole run) or the shared bins (matched).",
        "",
        "| finding | arch | early phase (decides) | steps per seed | whole run | matched loss "
        "| bins per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in compared:
        p, w, m = f.phase, f.whole_run, f.matched
        assert p is not None and w is not None and m is not None
        out.append(
            f"| {_cell(f.title)} | {f.arch} | {_num(p.median)} {_interval(p.interval)} "
            f"{_verdict(p.verdict)} | {', '.join(str(s[0]) for s in p.steps)} | "
            f"{_num(w.median)} {_interval(w.interval)} {_verdict(w.verdict)} | "
            f"{_num(m.median)} {_interval(m.interval)} {_verdict(m.verdict)} | "
            f"{', '.join(map(str, m.bins))} |"
        )
    return out


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
    pct = f"{LEVEL:.0%}"
    out = [
        title,
        "",
        'The findings of Santurkar et al. (2018), "How Does Batch Normalization Help '
        'Optimization?", and of the papers it builds on, checked on this run. Each finding is a '
        f"statistic computed per seed; the table gives its median over seeds and a {pct} "
        "interval (bootstrap over seeds, blocks of measured steps, logged losses and validation "
        "samples; see `lightning_bn/reproduce/findings.py`). A finding is **reproduced** when the whole "
        "interval is on the paper's side of the threshold, **not reproduced** when it is "
        "entirely on the other side, *inconclusive* otherwise. Criteria and thresholds are "
        "fixed in advance in `CRITERIA` of that module.",
        "",
        *_setup_lines(run),
        "",
        "## Findings",
        "",
        f"| # | finding | arch | verdict | median [{pct} interval] | per seed | criterion |",
        "|---|---|---|---|---|---|---|",
    ]
    evaluated = [f for f in findings if f.verdict != NOT_EVALUATED]
    for i, f in enumerate(evaluated, 1):
        per_seed = ", ".join(_num(v) for v in f.per_seed)
        out.append(
            f"| {i} | {_cell(f.title)} | {f.arch} | {_verdict(f.verdict)} | "
            f"{_num(f.median)} {_interval(f.interval)} | {per_seed} | "
            f"{_cell(f.criterion.rule())} ({_cell(f.criterion.source)}) |"
        )
    counts = {v: sum(f.verdict == v for f in evaluated) for v in (REPRODUCED, INCONCLUSIVE)}
    out += [
        "",
        f"{counts[REPRODUCED]} of {len(evaluated)} evaluated findings reproduced, "
        f"{counts[INCONCLUSIVE]} inconclusive, "
        f"{len(evaluated) - counts[REPRODUCED] - counts[INCONCLUSIVE]} not reproduced.",
    ]
    skipped = [f for f in findings if f.verdict == NOT_EVALUATED]
    if skipped:
        out += ["", "Not evaluated on this run:", ""]
        out += [f"- {f.title} ({f.arch}): {f.numbers}" for f in skipped]
    out += _phase_section(run, [f for f in evaluated if f.phase is not None])
    out += ["", "### What each number is", ""]
    seen: set[str] = set()
    for f in evaluated:
        if f.name in seen:
            continue
        seen.add(f.name)
        out.append(f"- {f.title}: {f.criterion.statistic}.")
    out += ["", "### Per-seed values", ""]
    out += [f"- {f.title} ({f.arch}): {_cell(f.numbers)}" for f in evaluated]
    out += ["", "## Runs", ""]
    header = ["arch", "variant", "lr", "init ×", "batch", "seed"]
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
        row = [
            spec.arch,
            spec.kind,
            format_lr(spec.lr),
            f"{spec.init_scale:g}",
            str(plan.batch_of(spec)),
            "–" if history.seed is None else str(history.seed),
        ]
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
        if len(run.seeds) > 1:
            out += [
                "Curves are medians over the seeds; shaded bands span the smallest to the "
                "largest seed.",
                "",
            ]
        for fig in figures:
            try:
                rel = Path(fig.path).resolve().relative_to(run.path.resolve())
            except ValueError:
                rel = Path(fig.path)
            out.append(f"- [`{rel.as_posix()}`]({rel.as_posix()}): {fig.caption}")
    out.append("")
    return "\n".join(out)
