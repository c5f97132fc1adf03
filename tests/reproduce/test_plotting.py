"""Figures, CSV read-back, findings and summary of `lightning-bn reproduce`, on hand-made runs.

No training here: every run is built from histories written by hand (in memory or as
CSVLogger-style files), so each finding's criterion can be checked right at its threshold.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from lightning_bn.reproduce import (
    FINDINGS,
    RunFormatError,
    VariantSpec,
    build_plan,
    load_run,
    redraw,
    render_summary,
)
from lightning_bn.reproduce.figures import plot_run
from lightning_bn.reproduce.findings import (
    CRITERIA,
    INCONCLUSIVE,
    NOT_EVALUATED,
    NOT_REPRODUCED,
    REPRODUCED,
    VERDICTS,
    Finding,
)
from lightning_bn.reproduce.history import RunData, read_metrics_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ("model.blocks.0.linear", "model.blocks.1.linear", "model.head")
SEEDS = (0, 1)


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


def _synthetic_rows(spec: VariantSpec, seed: int, steps: int = 40) -> list[dict[str, float]]:
    rng = np.random.default_rng(zlib.crc32(f"{spec.id}/{seed}".encode()))
    bn = spec.kind != "standard"
    diverges = spec.kind == "standard" and (spec.lr > 0.5 or spec.init_scale > 1)
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
        # BN reaches 0.95 at step 10, the standard network at the end
        val = min(0.96, 0.5 + step / (20 if bn else 100))
        rows.append({"step": step, "val/acc": val, "val/loss": 1.0 - step / 100})
    # BN is insensitive to the initial scale, loses accuracy at batch 4 (LayerNorm does not)
    acc = 0.95 + 0.01 * seed
    if diverges or (spec.kind == "standard" and spec.init_scale < 1):
        acc = 0.1
    if spec.kind == "batchnorm" and spec.batch_size == 4:
        acc = 0.6
    rows.append(
        {
            "step": steps,
            "final/val_acc": acc,
            "final/val_samples": 360,
            "final/val_loss": 0.2,
            "final/steps": steps,
            "final/diverged": float(diverges),
            "final/wall_time_s": 1.5,
            "final/cpu_time_s": 1.4,
        }
    )
    return rows


@pytest.fixture
def synthetic_run(tmp_path: Path) -> Path:
    """A run folder as `lightning-bn reproduce` writes it, with hand-made CSV files."""
    plan = build_plan("digits", quick=True, steps=40, seeds=len(SEEDS))
    runs = []
    for spec, seed in plan.runs():
        run_id = spec.run_id(seed)
        _write_csv(tmp_path / "csv" / run_id / "metrics.csv", _synthetic_rows(spec, seed))
        runs.append(
            spec.to_dict() | {"id": run_id, "seed": seed, "csv": f"csv/{run_id}/metrics.csv"}
        )
    manifest = {"format": 2, "status": "finished", "plan": plan.to_dict(), "runs": runs}
    (tmp_path / "run.json").write_text(json.dumps(manifest))
    return tmp_path


EXPECTED_FIGURES = {
    "overview_mlp.png",
    "training_mlp.png",
    "ics_mlp.png",
    "loss_landscape_mlp.png",
    "gradient_predictiveness_mlp.png",
    "beta_smoothness_mlp.png",
    "fig4_mlp.png",
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


def test_figures_draw_bands_over_seeds(synthetic_run: Path) -> None:
    run = load_run(synthetic_run)
    assert run.seeds == list(SEEDS)
    bn = run.find("mlp", "batchnorm", 0.1)
    assert bn is not None and bn.seed is None  # the median over the two seeds
    # seed_median: the band of the final accuracy spans the seeds (0.95 and 0.96)
    assert bn.last("final/val_acc@lo") == pytest.approx(0.95)
    assert bn.last("final/val_acc@hi") == pytest.approx(0.96)
    assert bn.last("final/val_acc") == pytest.approx(0.955)
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    import lightning_bn.figures.draw as plotting

    fig = Figure()
    ax = fig.subplots()
    history = plotting.RunHistory("BatchNorm", bn.series)
    assert plotting.draw_line(ax, history, "val/acc")
    # the val/acc curves are equal over seeds here, so the band is degenerate; the loss differs
    assert plotting.draw_line(ax, history, "train/loss")
    assert any(isinstance(c, PolyCollection) for c in ax.collections)


def test_plot_run_skips_figures_without_data(synthetic_run: Path, tmp_path: Path) -> None:
    run = load_run(synthetic_run)
    kept = ("l1", "layernorm")
    run.histories = {k: h for k, h in run.histories.items() if h.spec.kind in kept}
    names = {f.path.name for f in plot_run(run, tmp_path / "other")}
    # neither standard nor BatchNorm: no comparison figure, no Theorem 4.1, no noise
    assert names == {"training_mlp.png"}


def test_redraw_writes_summary_and_findings_json(synthetic_run: Path) -> None:
    result = redraw(synthetic_run)
    text = (synthetic_run / "summary.md").read_text()
    assert result.summary == synthetic_run / "summary.md"
    rows = finding_rows(text)
    assert len(rows) == len(FINDINGS)
    assert {r[3] for r in rows} <= {"**reproduced**", "**not reproduced**", "*inconclusive*"}
    # hand-made data: every claim holds, clearly, in both seeds
    assert {f.id: f.verdict for f in result.findings} == {
        f"{name}/mlp": REPRODUCED for name in FINDINGS
    }
    for figure in result.figures:
        assert f"figures/{figure.name}" in text
    assert "| mlp | standard | 1 | 1 | 64 | 0 | 0.1 |" in text  # the runs table, per seed
    assert "He/Kaiming" in text and "seeds: 0, 1 (2)" in text
    assert "The early phase decides the verdict" in text and "early phase (decides)" in text
    assert result.findings_file == synthetic_run / "findings.json"
    data = json.loads(result.findings_file.read_text())
    assert_findings_schema(data, n_runs=len(load_run(synthetic_run).plan.runs()))
    assert data["seeds"] == [0, 1] and data["base_lr"] == 0.1


def assert_findings_schema(data: dict[str, object], n_runs: int) -> None:
    """``findings.json`` has the schema of issue 13, with values of the right types."""
    assert {"base_lr", "seeds", "findings", "runs"} <= set(data)
    assert isinstance(data["base_lr"], float)
    seeds = data["seeds"]
    assert isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)
    findings = data["findings"]
    assert isinstance(findings, list) and findings
    for f in findings:
        assert {
            "id",
            "title",
            "verdict",
            "seeds",
            "median",
            "interval",
            "threshold",
            "criterion",
        } <= set(f)
        assert isinstance(f["id"], str) and isinstance(f["title"], str)
        assert f["verdict"] in VERDICTS
        assert isinstance(f["seeds"], int) and 1 <= f["seeds"] <= len(seeds)
        assert f["median"] is None or isinstance(f["median"], float)
        assert isinstance(f["interval"], list) and len(f["interval"]) == 2
        assert all(v is None or isinstance(v, float) for v in f["interval"])
        if None not in f["interval"]:
            assert f["interval"][0] <= f["interval"][1]
        assert isinstance(f["threshold"], float) and isinstance(f["criterion"], str)
    assert len({f["id"] for f in findings}) == len(findings)
    runs = data["runs"]
    assert isinstance(runs, list) and len(runs) == n_runs
    for r in runs:
        assert {
            "arch",
            "variant",
            "lr",
            "seed",
            "batch_size",
            "final_val_acc",
            "final_val_loss",
            "mean_train_loss",
            "diverged_at",
        } <= set(r)
        assert isinstance(r["seed"], int) and isinstance(r["batch_size"], int)
        assert r["diverged_at"] is None or isinstance(r["diverged_at"], int)


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
    plan = build_plan("digits", archs=("mlp",), steps=40, seeds=2)
    run = RunData.from_histories(plan, [])
    crit = CRITERIA["loss_variation"]

    def finding(i: int, title: str, verdict: str) -> Finding:
        return Finding(
            f"f{i}/mlp",
            "loss_variation",
            "mlp",
            title,
            verdict,
            (0, 1),
            0.5,
            (0.4, 0.6),
            (0.45, 0.55),
            crit,
            "x 1.0",
        )

    findings = [
        finding(1, "claim | with pipe", REPRODUCED),
        finding(2, "other", NOT_REPRODUCED),
        finding(3, "fourth", INCONCLUSIVE),
        finding(4, "third", NOT_EVALUATED),
    ]
    text = render_summary(run, findings)
    assert "claim \\| with pipe" in text
    assert "1 of 3 evaluated findings reproduced, 1 inconclusive, 1 not reproduced." in text
    assert len(finding_rows(text)) == 3
    assert "0.5 [0.4, 0.6]" in text
    assert "- third (mlp): x 1.0" in text  # not evaluated, listed apart


def test_format_1_run_folders_still_load(tmp_path: Path) -> None:
    """A folder of lightning-bn 0.1.0 (one run per variant, `variants` in run.json) loads as one
    seed: the plan's seed."""
    plan = build_plan("digits", quick=True, steps=40, seed=3)
    data = plan.to_dict()
    for key in ("seeds", "init", "init_scales", "small_batches", "extra_archs"):
        data.pop(key)  # the 0.1.0 plan had none of these
    variants = []
    for spec in plan.variants()[:2]:  # standard and BatchNorm at lr 0.1
        _write_csv(tmp_path / "csv" / spec.id / "metrics.csv", _synthetic_rows(spec, 0))
        variants.append(
            {"arch": spec.arch, "kind": spec.kind, "lr": spec.lr, "id": spec.id}
            | {"csv": f"csv/{spec.id}/metrics.csv"}
        )
    manifest = {"format": 1, "status": "finished", "plan": data, "variants": variants}
    (tmp_path / "run.json").write_text(json.dumps(manifest))
    run = load_run(tmp_path)
    assert run.seeds == [3] and run.plan.seeds == 1
    assert run.plan.init == "default"  # 0.1.0 used PyTorch's initialisation
    assert sorted(run.histories) == ["mlp_batchnorm_lr0.1_seed3", "mlp_standard_lr0.1_seed3"]
    bn = run.find("mlp", "batchnorm", 0.1)
    assert bn is not None and bn.seed == 3
    verdicts = {f.name: f.verdict for f in redraw(tmp_path).findings}
    assert verdicts["bn_trains_faster"] == REPRODUCED
    assert verdicts["small_batch"] == NOT_EVALUATED
