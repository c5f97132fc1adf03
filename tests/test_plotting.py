"""Figures, CSV read-back, findings and summary of `lightning-bn reproduce`, on hand-made runs.

No training here: every run is built from histories written by hand (in memory or as
CSVLogger-style files), so each finding's criterion can be checked right at its threshold.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from lightning_bn.plotting import plot_run
from lightning_bn.reproduce import (
    FINDINGS,
    RunFormatError,
    VariantHistory,
    VariantSpec,
    build_plan,
    evaluate_findings,
    load_run,
    redraw,
    render_summary,
)
from lightning_bn.reproduce.findings import (
    ACC_TOLERANCE,
    FASTER_RATIO,
    ICS_COS_TOLERANCE,
    ICS_L2_TOLERANCE,
    LARGE_LR_MARGIN,
    LOSS_TOLERANCE,
    NOT_EVALUATED,
    NOT_REPRODUCED,
    REPRODUCED,
    STANDARD_FAILS_RATIO,
    Finding,
    beta_smaller,
    bn_tolerates_larger_lr,
    bn_trains_faster,
    gradients_more_predictive,
    ics_not_smaller,
    loss_varies_less,
    lp_norms_like_bn,
    noisy_bn_like_bn,
)
from lightning_bn.reproduce.history import RunData, read_metrics_csv
from lightning_bn.reproduce.plan import ExperimentPlan

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = [0, 10, 20, 30]
LAYERS = ("model.blocks.0.linear", "model.blocks.1.linear", "model.head")

Series = Mapping[str, tuple[Sequence[int], Sequence[float]]]


def _plan(
    experiment: str = "digits",
    archs: tuple[str, ...] = ("mlp",),
    lrs: tuple[float, ...] = (0.1, 1.0),
) -> ExperimentPlan:
    return build_plan(experiment, archs=archs, lrs=lrs, steps=40)


def _hist(kind: str, lr: float = 0.1, arch: str = "mlp", **values: float) -> VariantHistory:
    """A history whose quantities are constant over ``STEPS`` (keys given by short names)."""
    keys = {
        "loss": "final/mean_train_loss",
        "final_loss": "final/train_loss",
        "acc": "final/val_acc",
        "loss_range": "lipschitz/loss_range",
        "grad_diff": "smoothness/grad_diff_max",
        "beta": "smoothness/beta_eff",
    }
    series: dict[str, tuple[list[int], list[float]]] = {}
    for name, value in values.items():
        if name in ("ics_l2", "ics_cos"):
            suffix = name.removeprefix("ics_")
            for i, layer in enumerate(LAYERS):
                # The first layer's shift is 0 by definition; it must not count.
                v = (0.0 if suffix == "l2" else 1.0) if i == 0 else value
                series[f"ics/{layer}/{suffix}"] = (STEPS, [v] * len(STEPS))
        elif name.startswith("final"):
            series[keys.get(name, name)] = ([40], [value])
        else:
            key = keys[name]
            if key.startswith("final/"):
                series[key] = ([40], [value])
            else:
                series[key] = (STEPS, [value] * len(STEPS))
    return VariantHistory.from_lists(VariantSpec(arch, kind, lr), series)


def _run(plan: ExperimentPlan, *histories: VariantHistory) -> RunData:
    return RunData.from_histories(plan, histories)


# --- findings ---------------------------------------------------------------------------------------
def test_trains_faster_at_threshold() -> None:
    plan = _plan()
    at = _run(plan, _hist("batchnorm", loss=FASTER_RATIO * 2.0), _hist("standard", loss=2.0))
    above = _run(
        plan, _hist("batchnorm", loss=FASTER_RATIO * 2.0 + 1e-6), _hist("standard", loss=2.0)
    )
    assert bn_trains_faster(at).status == REPRODUCED
    assert bn_trains_faster(above).status == NOT_REPRODUCED


def test_trains_faster_needs_every_architecture() -> None:
    plan = _plan(archs=("mlp", "cnn"))
    run = _run(
        plan,
        _hist("batchnorm", loss=0.1),
        _hist("standard", loss=1.0),
        _hist("batchnorm", arch="cnn", loss=1.0),
        _hist("standard", arch="cnn", loss=1.0),
    )
    finding = bn_trains_faster(run)
    assert finding.status == NOT_REPRODUCED
    assert "mlp" in finding.numbers and "cnn" in finding.numbers


def test_trains_faster_standard_diverged_and_missing_runs() -> None:
    plan = _plan()
    diverged = _run(plan, _hist("batchnorm", loss=0.5), _hist("standard", loss=math.inf))
    assert bn_trains_faster(diverged).status == REPRODUCED
    assert "diverged" in bn_trains_faster(diverged).numbers
    both = _run(plan, _hist("batchnorm", loss=math.inf), _hist("standard", loss=math.inf))
    assert bn_trains_faster(both).status == NOT_REPRODUCED
    missing = _run(plan, _hist("batchnorm", loss=0.5))
    assert bn_trains_faster(missing).status == NOT_EVALUATED


def test_mean_train_loss_falls_back_to_logged_points() -> None:
    plan = _plan()
    bn = VariantHistory.from_lists(
        VariantSpec("mlp", "batchnorm", 0.1), {"train/loss": ([1, 2, 3], [1.0, 0.5, 0.3])}
    )
    std = VariantHistory.from_lists(
        VariantSpec("mlp", "standard", 0.1), {"train/loss": ([1, 2, 3], [2.0, 2.0, math.nan])}
    )
    finding = bn_trains_faster(_run(plan, bn, std))
    assert finding.status == REPRODUCED
    assert "0.6" in finding.numbers  # mean of 1.0, 0.5, 0.3


@pytest.mark.parametrize(
    ("bn_lo", "bn_hi", "std_hi", "expected"),
    [
        (0.95, 0.95, 0.95 - LARGE_LR_MARGIN, REPRODUCED),
        (0.95, 0.95, 0.95 - LARGE_LR_MARGIN + 0.01, NOT_REPRODUCED),
        (0.95, 0.95 - ACC_TOLERANCE, 0.1, REPRODUCED),
        (0.95, 0.95 - ACC_TOLERANCE - 0.01, 0.1, NOT_REPRODUCED),
    ],
)
def test_larger_lr_classification(bn_lo: float, bn_hi: float, std_hi: float, expected: str) -> None:
    run = _run(
        _plan(),
        _hist("batchnorm", 0.1, acc=bn_lo),
        _hist("batchnorm", 1.0, acc=bn_hi),
        _hist("standard", 1.0, acc=std_hi),
    )
    assert bn_tolerates_larger_lr(run).status == expected


def test_larger_lr_regression_and_single_lr() -> None:
    plan = _plan("dln", archs=("dln",), lrs=(1e-6, 1e-5))
    ok = _run(
        plan,
        _hist("batchnorm", 1e-6, "dln", final_loss=10.0),
        _hist("batchnorm", 1e-5, "dln", final_loss=10.0 * LOSS_TOLERANCE),
        _hist("standard", 1e-5, "dln", final_loss=10.0 * LOSS_TOLERANCE * STANDARD_FAILS_RATIO),
    )
    assert bn_tolerates_larger_lr(ok).status == REPRODUCED
    standard_fine = _run(
        plan,
        _hist("batchnorm", 1e-6, "dln", final_loss=10.0),
        _hist("batchnorm", 1e-5, "dln", final_loss=5.0),
        _hist("standard", 1e-5, "dln", final_loss=6.0),
    )
    assert bn_tolerates_larger_lr(standard_fine).status == NOT_REPRODUCED
    diverged = _run(
        plan,
        _hist("batchnorm", 1e-6, "dln", final_loss=10.0),
        _hist("batchnorm", 1e-5, "dln", final_loss=5.0),
        _hist("standard", 1e-5, "dln", final_loss=math.inf),
    )
    assert bn_tolerates_larger_lr(diverged).status == REPRODUCED
    one_lr = _run(_plan("dln", archs=("dln",), lrs=(1e-6,)))
    finding = bn_tolerates_larger_lr(one_lr)
    assert finding.status == NOT_EVALUATED
    assert "one learning rate" in finding.numbers


def test_noisy_bn_every_lr() -> None:
    plan = _plan()

    def run_with(noisy_acc_hi: float, noisy_loss_lo: float) -> RunData:
        return _run(
            plan,
            _hist("noisy-batchnorm", 0.1, acc=0.9, loss=noisy_loss_lo),
            _hist("batchnorm", 0.1, acc=0.9, loss=0.2),
            _hist("standard", 0.1, acc=0.8, loss=1.0),
            _hist("noisy-batchnorm", 1.0, acc=noisy_acc_hi, loss=0.3),
            _hist("batchnorm", 1.0, acc=0.95, loss=0.2),
            _hist("standard", 1.0, acc=0.1, loss=math.inf),
        )

    assert noisy_bn_like_bn(run_with(0.95 - ACC_TOLERANCE, 0.5)).status == REPRODUCED
    assert noisy_bn_like_bn(run_with(0.95 - ACC_TOLERANCE - 0.01, 0.5)).status == NOT_REPRODUCED
    # at the base lr noisy BN must also train faster than the standard network
    assert noisy_bn_like_bn(run_with(0.95, FASTER_RATIO + 0.01)).status == NOT_REPRODUCED
    missing = _run(plan, _hist("batchnorm", 0.1, acc=0.9), _hist("standard", 0.1, acc=0.8))
    assert noisy_bn_like_bn(missing).status == NOT_EVALUATED


@pytest.mark.parametrize(
    ("l2_bn", "cos_bn", "expected"),
    [
        (ICS_L2_TOLERANCE * 1.0, 0.9 + ICS_COS_TOLERANCE, REPRODUCED),
        (ICS_L2_TOLERANCE * 1.0 - 1e-3, 0.9, NOT_REPRODUCED),
        (2.0, 0.9 + ICS_COS_TOLERANCE + 1e-3, NOT_REPRODUCED),
    ],
)
def test_ics_not_smaller(l2_bn: float, cos_bn: float, expected: str) -> None:
    run = _run(
        _plan(),
        _hist("batchnorm", ics_l2=l2_bn, ics_cos=cos_bn),
        _hist("standard", ics_l2=1.0, ics_cos=0.9),
    )
    finding = ics_not_smaller(run)
    assert finding.status == expected
    # the first layer (0 and 1 by definition) is left out of the medians
    assert f"BN {l2_bn:.3g}" in finding.numbers


def test_ics_dln_needs_larger() -> None:
    plan = _plan("dln", archs=("dln",), lrs=(1e-6,))
    equal = _run(
        plan,
        _hist("batchnorm", 1e-6, "dln", ics_l2=1.0, ics_cos=0.9),
        _hist("standard", 1e-6, "dln", ics_l2=1.0, ics_cos=0.9),
    )
    larger = _run(
        plan,
        _hist("batchnorm", 1e-6, "dln", ics_l2=1.5, ics_cos=0.8),
        _hist("standard", 1e-6, "dln", ics_l2=1.0, ics_cos=0.9),
    )
    assert ics_not_smaller(equal).status == NOT_REPRODUCED
    assert ics_not_smaller(larger).status == REPRODUCED
    assert "larger" in ics_not_smaller(larger).claim


@pytest.mark.parametrize(
    ("check", "name"),
    [
        (loss_varies_less, "loss_range"),
        (gradients_more_predictive, "grad_diff"),
        (beta_smaller, "beta"),
    ],
)
def test_landscape_findings(check: object, name: str) -> None:
    assert callable(check)
    plan = _plan()
    smaller = _run(plan, _hist("batchnorm", **{name: 0.5}), _hist("standard", **{name: 1.0}))
    equal = _run(plan, _hist("batchnorm", **{name: 1.0}), _hist("standard", **{name: 1.0}))
    nan_only = _run(plan, _hist("batchnorm", **{name: math.nan}), _hist("standard", **{name: 1.0}))
    assert check(smaller).status == REPRODUCED
    assert check(equal).status == NOT_REPRODUCED
    assert check(nan_only).status == NOT_EVALUATED


def test_landscape_uses_median_over_steps() -> None:
    plan = _plan()
    bn = VariantHistory.from_lists(
        VariantSpec("mlp", "batchnorm", 0.1),
        {"smoothness/beta_eff": (STEPS, [100.0, 0.1, 0.2, 0.3])},  # one outlier
    )
    std = VariantHistory.from_lists(
        VariantSpec("mlp", "standard", 0.1), {"smoothness/beta_eff": (STEPS, [1.0] * 4)}
    )
    assert beta_smaller(_run(plan, bn, std)).status == REPRODUCED


def test_lp_norms() -> None:
    plan = _plan()
    hists = [_hist("batchnorm", lr, acc=0.9) for lr in plan.lrs]
    close = [_hist(k, lr, acc=0.9 - ACC_TOLERANCE) for k in ("l1", "l2", "linf") for lr in plan.lrs]
    assert lp_norms_like_bn(_run(plan, *hists, *close)).status == REPRODUCED
    worse = [*close[:-1], _hist("linf", 1.0, acc=0.9 - ACC_TOLERANCE - 0.01)]
    finding = lp_norms_like_bn(_run(plan, *hists, *worse))
    assert finding.status == NOT_REPRODUCED
    assert "ℓ∞ 0.84" in finding.numbers
    assert lp_norms_like_bn(_run(plan, *hists)).status == NOT_EVALUATED


def test_evaluate_findings_one_per_claim() -> None:
    findings = evaluate_findings(_run(_plan()))
    assert len(findings) == len(FINDINGS) == 8
    assert len({f.id for f in findings}) == 8
    assert all(f.status == NOT_EVALUATED for f in findings)
    assert all(f.criterion for f in findings)


# --- CSV read-back ------------------------------------------------------------------------------------
def test_read_metrics_csv_merges_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss,ics/a.b/l2,final/val_acc\n"
        "0,1,2.0,,\n"
        "0,1,,0.5,\n"
        "0,3,nan,,\n"
        "0,3,,,0.9\n"
        "0,2,1.5,,\n"
    )
    series = read_metrics_csv(path)
    assert set(series) == {"train/loss", "ics/a.b/l2", "final/val_acc"}
    steps, values = series["train/loss"]
    assert steps.tolist() == [1, 2, 3]
    assert values[:2].tolist() == [2.0, 1.5] and math.isnan(values[2])
    assert series["ics/a.b/l2"][1].tolist() == [0.5]


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(RunFormatError, match="does not exist"):
        load_run(tmp_path / "nothing")
    with pytest.raises(RunFormatError, match=r"no run\.json"):
        load_run(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunFormatError, match="not a valid run description"):
        load_run(tmp_path)


# --- a synthetic run on disk ------------------------------------------------------------------------
def _write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in rows for k in row})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _synthetic_rows(spec: VariantSpec, steps: int = 40) -> list[dict[str, float]]:
    rng = np.random.default_rng(zlib.crc32(spec.id.encode()))
    bn = spec.kind != "standard"
    diverges = spec.kind == "standard" and spec.lr > 0.5
    rows: list[dict[str, float]] = []
    for step in range(1, steps + 1):
        loss = 2.3 * math.exp(-step / (8 if bn else 30)) + 0.05 * rng.random()
        if diverges and step > 30:
            loss = math.nan if step > 33 else 1e6 * step
        rows.append({"step": step, "train/loss": loss})
    for step in range(0, steps, 5):
        lo, hi = 1.0 - 0.1 * rng.random(), 1.2 + (0.1 if bn else 0.8) * rng.random()
        row: dict[str, float] = {
            "step": step,
            "lipschitz/loss_min": lo,
            "lipschitz/loss_max": hi,
            "lipschitz/loss_range": hi - lo,
            "smoothness/grad_diff_min": 0.1,
            "smoothness/grad_diff_max": 0.5 if bn else 2.0,
            "smoothness/beta_eff": 3.0 if bn else 9.0,
        }
        for i, layer in enumerate(LAYERS):
            row[f"ics/{layer}/l2"] = 0.0 if i == 0 else 0.1 * (2 if bn else 1)
            row[f"ics/{layer}/cos"] = 1.0 if i == 0 else (0.9 if bn else 0.95)
        if spec.norm == "batchnorm":
            for layer in ("model.blocks.0.norm", "model.blocks.1.norm"):
                row[f"lipschitz/{layer}/thm41_ratio"] = 1.0 - 1e-3 * rng.random()
        rows.append(row)
    if spec.noise:
        for step in range(0, steps, 2):
            row = {"step": step}
            for layer in ("model.blocks.0.norm", "model.blocks.1.norm"):
                row |= {
                    f"noise/{layer}/clean_mean": 0.0,
                    f"noise/{layer}/clean_std": 1.0,
                    f"noise/{layer}/out_mean": 0.05 * rng.standard_normal(),
                    f"noise/{layer}/out_std": 1.15 + 0.02 * rng.standard_normal(),
                }
            rows.append(row)
    for step in range(0, steps, 10):
        rows.append({"step": step, "val/acc": 0.5 + step / 100, "val/loss": 1.0 - step / 100})
    rows.append(
        {
            "step": steps,
            "final/val_acc": 0.1 if diverges else 0.95,
            "final/val_loss": 0.2,
            "final/wall_time_s": 1.5,
        }
    )
    return rows


@pytest.fixture
def synthetic_run(tmp_path: Path) -> Path:
    """A run folder as `lightning-bn reproduce` writes it, with hand-made CSV files."""
    plan = build_plan("digits", quick=True, steps=40)
    variants = []
    for spec in plan.variants():
        _write_csv(tmp_path / "csv" / spec.id / "metrics.csv", _synthetic_rows(spec))
        variants.append(spec.to_dict() | {"id": spec.id, "csv": f"csv/{spec.id}/metrics.csv"})
    manifest = {"format": 1, "status": "finished", "plan": plan.to_dict(), "variants": variants}
    (tmp_path / "run.json").write_text(json.dumps(manifest))
    return tmp_path


EXPECTED_FIGURES = {
    "overview_mlp.png",
    "training_mlp.png",
    "ics_mlp.png",
    "loss_landscape_mlp.png",
    "gradient_predictiveness_mlp.png",
    "beta_smoothness_mlp.png",
    "thm41_ratio_mlp.png",
    "noisy_bn_activations_mlp.png",
}


def assert_valid_png(path: Path) -> None:
    """A PNG file that matplotlib reads back as a non-empty image."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0, path


def test_plot_run_draws_every_figure(synthetic_run: Path) -> None:
    figures = plot_run(load_run(synthetic_run))
    assert {f.path.name for f in figures} == EXPECTED_FIGURES
    for figure in figures:
        assert figure.path.parent == synthetic_run / "figures"
        assert figure.caption
        assert_valid_png(figure.path)


def test_plot_run_skips_figures_without_data(synthetic_run: Path, tmp_path: Path) -> None:
    run = load_run(synthetic_run)
    kept = ("l1", "layernorm")
    run.histories = {k: h for k, h in run.histories.items() if h.spec.kind in kept}
    names = {f.path.name for f in plot_run(run, tmp_path / "other")}
    # neither standard nor BatchNorm: no comparison figure, no Theorem 4.1, no noise
    assert names == {"training_mlp.png"}


def test_redraw_writes_summary(synthetic_run: Path) -> None:
    result = redraw(synthetic_run)
    text = (synthetic_run / "summary.md").read_text()
    assert result.summary == synthetic_run / "summary.md"
    rows = finding_rows(text)
    assert len(rows) == len(FINDINGS)
    statuses = {r[2] for r in rows}
    assert statuses <= {"**reproduced**", "**not reproduced**"}
    # hand-made data: BN and noisy BN faster, smoother, larger ICS; standard diverges at lr 1
    assert [f.status for f in result.findings] == [REPRODUCED] * len(FINDINGS)
    for figure in result.figures:
        assert f"figures/{figure.name}" in text
    assert "| mlp | standard | 1 | 0.1 |" in text  # the runs table


def finding_rows(summary: str) -> list[list[str]]:
    """Cells of the findings table of a summary.md (one list per row)."""
    section = summary.split("## Findings", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and cells[0].isdigit():
            rows.append(cells)
    return rows


def test_render_summary_escapes_and_counts() -> None:
    run = _run(_plan())
    findings = [
        Finding("a", "claim | with pipe", REPRODUCED, "x 1.0", "rule"),
        Finding("b", "other", NOT_REPRODUCED, "y 2.0", "rule"),
        Finding("c", "third", NOT_EVALUATED, "no runs", "rule"),
    ]
    text = render_summary(run, findings)
    assert "claim \\| with pipe" in text
    assert "1 of 2 evaluated findings reproduced (1 not evaluated)." in text
    assert len(finding_rows(text)) == 3
