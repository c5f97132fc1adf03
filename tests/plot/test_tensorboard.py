"""TensorBoard runs: `lightning-bn plot` on a TensorBoardLogger folder, the custom-scalars layout,
and a second, named ICSCallback's W&B panels and figures.

One small model is fitted twice with the same seed, once with a TensorBoardLogger and once with
a CSVLogger (the diagnostic callbacks change nothing in training, so both runs log the same
values): the figures drawn from the event file hold the CSV values rounded to float32 (what
TensorBoard keeps), read back independently with the `csv` module.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from lightning_bn import (
    HessianCallback,
    ICSCallback,
    LipschitzCallback,
    SmoothnessCallback,
    plot_runs,
)
from lightning_bn.cli import main
from lightning_bn.logging.keys import instance_of
from tests.support.models import Classifier, loader, mlp, trainer

STEPS = 12
EVERY = 4


def _callbacks() -> list[Any]:
    return [
        ICSCallback(every_n_steps=EVERY),
        ICSCallback(every_n_steps=EVERY, name="late", layers=["net.4"]),
        LipschitzCallback(every_n_steps=EVERY),
        SmoothnessCallback(every_n_steps=EVERY, max_iters=4),
        HessianCallback(
            every_n_steps=EVERY,
            top_k=2,
            max_iters=30,
            trace_max_samples=10,
            density_starts=1,
            density_steps=8,
            density_bins=6,
        ),
    ]


def _fit(logger: Any, extra: list[Any] | None = None) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(0)
    model = Classifier(mlp(norm=True, dropout=0.0).double(), lr=0.05, log_loss=True)
    callbacks = _callbacks() + (extra or [])
    trainer(callbacks, STEPS, logger=logger, log_every_n_steps=1).fit(model, loader())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tb")
    tb = TensorBoardLogger(str(root / "tb"), name="lightning_logs", version=0)
    _fit(tb)
    csv_logger = CSVLogger(str(root / "csv"), name="run", version=0)
    _fit(csv_logger)
    return {
        "tb": root / "tb" / "lightning_logs" / "version_0",
        "csv": Path(csv_logger.log_dir) / "metrics.csv",
        "root": root,
    }


def _csv_series(path: Path, key: str) -> tuple[list[int], list[float]]:
    points: dict[int, float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                points[int(row["step"])] = float(row[key])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _lines(fig: Figure) -> list[tuple[str, str, list[float]]]:
    return [
        (ax.get_title(), line.get_label(), [float(v) for v in line.get_ydata()])
        for ax in fig.axes
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    ]


def _meshes(fig: Figure) -> list[np.ndarray]:
    return [
        np.asarray(c.get_array())
        for ax in fig.axes
        if ax.get_xlabel() == "step"  # not the colour bar
        for c in ax.collections
        if isinstance(c, QuadMesh)
    ]


def test_plot_on_tensorboard_version_0_equals_csv(runs: dict[str, Path], tmp_path: Path) -> None:
    tb_figs = {f.get_label(): f for f in plot_runs([runs["tb"]], labels=["run"])}
    csv_figs = {f.get_label(): f for f in plot_runs([runs["csv"]], labels=["run"])}
    assert set(tb_figs) == set(csv_figs)
    assert {"loss_range", "ics_l2", "ics_l2@late", "hessian_top_k", "hessian_density"} <= set(
        tb_figs
    )
    for name, fig in tb_figs.items():
        ours, theirs = _lines(fig), _lines(csv_figs[name])
        assert [(t, lab) for t, lab, _ in ours] == [(t, lab) for t, lab, _ in theirs], name
        for (_, _, a), (_, _, b) in zip(ours, theirs, strict=True):
            # TensorBoard keeps float32: the same values, rounded
            np.testing.assert_array_equal(np.float32(a), np.float32(b), err_msg=name)
        for a, b in zip(_meshes(fig), _meshes(csv_figs[name]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=name)
    # the named callback's figure holds its own keys, read back with the csv module
    _, l2 = _csv_series(runs["csv"], "ics@late/net.4/l2")
    assert l2 and _lines(tb_figs["ics_l2@late"])[0][2] == pytest.approx(l2, rel=1e-6)
    assert tb_figs["ics_l2@late"].get_suptitle().endswith("[ics@late]")
    # the density heatmap: one column per measured step, colour the logged bin masses
    steps, mass0 = _csv_series(runs["csv"], "hessian/density/bin_0")
    meshes = _meshes(tb_figs["hessian_density"])
    assert len(meshes) == len(steps)
    floor = meshes[0].min()
    assert [m[0] for m in meshes] == pytest.approx([max(v, floor) for v in mass0], rel=1e-6)

    # the command line on the version_0 folder
    out = tmp_path / "figs"
    assert main(["plot", str(runs["tb"]), "--out", str(out)]) == 0
    assert {p.stem for p in out.glob("*.png")} == set(tb_figs)


def test_mixed_tensorboard_and_csv(runs: dict[str, Path], tmp_path: Path) -> None:
    figs = plot_runs([runs["tb"].parent, runs["csv"]], labels=["tb", "csv"], steps="4:")
    by_name = {f.get_label(): f for f in figs}
    lines = _lines(by_name["beta_smoothness"])
    assert [lab for _, lab, _ in lines] == ["tb", "csv"]
    np.testing.assert_array_equal(np.float32(lines[0][2]), np.float32(lines[1][2]))
    _, beta = _csv_series(runs["csv"], "smoothness/beta_eff")
    assert lines[1][2] == beta[1:]  # --steps 4: leaves out step 0
    out = tmp_path / "mixed"
    code = main(
        ["plot", str(runs["tb"]), str(runs["csv"]), "--labels", "tb,csv", "--out", str(out)]
    )
    assert code == 0 and (out / "loss_range.png").is_file()


def test_event_file_without_diagnostics_is_one_line_rc_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "plain"))
    writer.add_scalar("train/loss", 1.0, 0)
    writer.close()
    event = next((tmp_path / "plain").glob("events.out.tfevents.*"))
    for given in (event, tmp_path / "plain"):
        with pytest.raises(SystemExit) as exc:
            main(["plot", str(given), "--out", str(tmp_path / "out")])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "no lightning-bn diagnostic key" in err[-1] and str(given) in err[-1]
        assert len(err) == 1
        assert "Traceback" not in "\n".join(err)


def _layout(folder: Path) -> layout_pb2.Layout:
    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    assert len(events) == 1  # written once per run
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    return layout


def test_custom_scalars_layout_covers_every_logged_family(runs: dict[str, Path]) -> None:
    layout = _layout(runs["tb"])
    categories = {c.title: c for c in layout.category}
    assert list(categories) == ["ics", "ics@late", "lipschitz", "smoothness", "hessian"]
    # the Fig. 4a and 4b bands are margin charts: value, lower, upper
    margins = {
        chart.title: (s.value, s.lower, s.upper)
        for c in layout.category
        for chart in c.chart
        if chart.HasField("margin")
        for s in chart.margin.series
    }
    assert margins[
        "Loss landscape: loss along the gradient, min-max over step size η (Fig. 4a)"
    ] == ("lipschitz/loss_min", "lipschitz/loss_min", "lipschitz/loss_max")
    assert margins[next(t for t in margins if "(Fig. 4b)" in t)] == (
        "smoothness/grad_diff_min",
        "smoothness/grad_diff_min",
        "smoothness/grad_diff_max",
    )
    # ICS per layer: one chart holding every layer
    (l2,) = [
        c for c in categories["ics"].chart if c.title.startswith("Internal covariate shift: ‖")
    ]
    assert list(l2.multiline.tag) == ["^ics/.+/l2$"]
    # every diagnostic tag in the event file is in a chart of its own instance's category
    acc = EventAccumulator(str(runs["tb"]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if instance_of(t) is not None]
    assert any(t.startswith("ics@late/") for t in tags)
    assert any(t.startswith("hessian/density/bin_") for t in tags)
    uncovered = []
    for tag in tags:
        if tag.endswith(("/every_n_steps", "/overhead")):
            continue  # the schedule, logged once; not a diagnostic
        category = categories[instance_of(tag)[1].removesuffix("/")]  # type: ignore[index]
        regexes = [r for chart in category.chart for r in chart.multiline.tag]
        names = {
            n
            for chart in category.chart
            for s in chart.margin.series
            for n in (s.value, s.lower, s.upper)
        }
        if tag not in names and not any(re.search(r, tag) for r in regexes):
            uncovered.append(tag)
    assert not uncovered


def test_named_ics_gets_wandb_panels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch as pl
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from tests.support.wandb_offline import find_run_file, wait_for_finished_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        (tmp_path / var.lower()).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    if wandb.run is not None:
        wandb.finish()
    pl.seed_everything(0)
    named = ICSCallback(every_n_steps=EVERY, name="late", layers=["net.4"])
    csv_logger = CSVLogger(str(tmp_path / "csv"), name="run", version=0)
    wandb_logger = WandbLogger(save_dir=tmp_path / "save", offline=True, project="lbn-test")
    model = Classifier(mlp(norm=True, dropout=0.0).double(), lr=0.05, log_loss=True)
    hessian = HessianCallback(
        every_n_steps=EVERY,
        top_k=1,
        max_iters=30,
        trace=False,
        per_layer=False,
        preconditioned=False,
        density_starts=1,
        density_steps=8,
        density_bins=4,
    )
    trainer(
        [ICSCallback(every_n_steps=EVERY), named, hessian],
        STEPS,
        logger=[wandb_logger, csv_logger],
        log_every_n_steps=1,
    ).fit(model, loader())
    wandb.finish()
    run = wait_for_finished_run(tmp_path / "save")
    steps, l2 = _csv_series(Path(csv_logger.log_dir) / "metrics.csv", "ics@late/net.4/l2")
    _, cos = _csv_series(Path(csv_logger.log_dir) / "metrics.csv", "ics@late/net.4/cos")
    assert len(l2) == STEPS // EVERY
    # its summaries: the worst shift of the run, as for the unnamed callback
    assert run.summary["ics@late/net.4/l2"] == {"max": pytest.approx(max(l2))}
    assert run.summary["ics@late/net.4/cos"] == {"min": pytest.approx(min(cos))}
    visualize = run.config["_wandb"]["visualize"]
    assert {"panels/ics_l2", "panels/ics_l2@late", "panels/ics_cos@late"} <= set(visualize)
    config = visualize["panels/ics_l2@late"]["panel_config"]
    assert config["stringSettings"]["title"].endswith("[ics@late]")
    run_dir = find_run_file(tmp_path / "save").parent
    rows = [r for r in run.history if "panels/ics_l2@late_table" in r]
    table = json.loads(
        (run_dir / "files" / rows[0]["panels/ics_l2@late_table"]["path"]).read_text()
    )
    assert table["data"] == [[s, "net.4", pytest.approx(v)] for s, v in zip(steps, l2, strict=True)]
    # the Hessian's density over training: a table of step, range, bin, centre, mass
    metrics = Path(csv_logger.log_dir) / "metrics.csv"
    rows = [r for r in run.history if "panels/hessian_density" in r]
    table = json.loads((run_dir / "files" / rows[0]["panels/hessian_density"]["path"]).read_text())
    assert table["columns"] == ["step", "lo", "hi", "bin", "value", "mass"]
    expected = []
    lo, hi = _csv_series(metrics, "hessian/density/lo"), _csv_series(metrics, "hessian/density/hi")
    for i, step in enumerate(lo[0]):
        for j in range(4):
            mass = dict(zip(*_csv_series(metrics, f"hessian/density/bin_{j}"), strict=True))[step]
            width = (hi[1][i] - lo[1][i]) / 4
            centre = lo[1][i] + (j + 0.5) * width
            expected.append([step, lo[1][i], hi[1][i], j, centre, mass])
    assert len(lo[0]) == STEPS // EVERY
    assert table["data"] == [pytest.approx(row, rel=1e-9) for row in expected]
    # and `plot` draws its figures from the CSV log of the same run
    figs = {f.get_label(): f for f in plot_runs([csv_logger.log_dir])}
    assert {"ics_l2@late", "ics_cos@late"} <= set(figs)
