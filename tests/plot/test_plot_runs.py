"""`lightning-bn plot` and `lightning_bn.plot_runs` on real CSVLogger runs, side by side.

Two short real runs (with and without BatchNorm, all four diagnostic callbacks, a CSVLogger)
are trained once per module; every figure is checked against the CSV values read back with
the `csv` module, one line per run, labelled in the legend. Then each kind of RUN, the bad
inputs and the interrupted/partial-data cases of issue 14.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure

from lightning_bn import (
    ICSCallback,
    LipschitzCallback,
    NoiseInjectionCallback,
    SmoothnessCallback,
    plot_runs,
)
from lightning_bn._outputs import RECORD
from lightning_bn.callbacks import PAPER_PANELS
from lightning_bn.cli import main
from lightning_bn.reproduce import build_plan
from tests.support.models import Classifier, loader, mlp, trainer

STEPS = 24
EVERY = 4
EXPECTED_PNGS = {
    "train_loss.png",
    "loss_range.png",
    "grad_predictiveness.png",
    "beta_smoothness.png",
    "ics_l2.png",
    "ics_cos.png",
    "thm41_ratio.png",
    "act_grad_norm.png",
    "hessian_top_eig.png",
    "grad_curvature.png",
    "noise_stats.png",
}
# Figures of normalisation layers: the run without BatchNorm has none.
NORM_ONLY = {"thm41_ratio", "act_grad_norm"}


def _train(save_dir: Path, name: str, version: str | int, norm: bool) -> Path:
    """A real run: a tiny MLP, all four callbacks, a CSVLogger; returns its metrics.csv."""
    pl.seed_everything(0)
    # without BatchNorm, the noise goes where BatchNorm was (the nn.Identity at net.1)
    targets = None if norm else ["net.1", "net.5"]
    callbacks = [
        ICSCallback(every_n_steps=EVERY),
        LipschitzCallback(every_n_steps=EVERY),
        SmoothnessCallback(every_n_steps=EVERY, max_iters=4),
        NoiseInjectionCallback(targets=targets, log_every_n_steps=EVERY),
    ]
    logger = CSVLogger(str(save_dir), name=name, version=version)
    model = Classifier(mlp(norm=norm, dropout=0.0).double(), lr=0.05, log_loss=True)
    trainer(callbacks, STEPS, logger=logger, log_every_n_steps=1).fit(model, loader())
    return Path(logger.log_dir) / "metrics.csv"


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``bn``: lightning_logs/bn/version_0/metrics.csv; ``plain``: plain/metrics.csv."""
    root = tmp_path_factory.mktemp("logs")
    bn_csv = _train(root / "lightning_logs", "bn", 0, norm=True)
    plain_csv = _train(root, "plain", "", norm=False)
    return {"bn": root / "lightning_logs" / "bn", "plain": plain_csv.parent, "bn_csv": bn_csv}


def _csv_series(path: Path, key: str) -> tuple[list[int], list[float]]:
    """``key``'s (steps, values) read with the csv module: the independent reference."""
    points: dict[int, float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                points[int(row["step"])] = float(row[key])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _labelled_lines(ax: object) -> dict[str, list[float]]:
    """Legend label -> y data of the labelled lines of an axes (guides and outlines excluded)."""
    return {
        line.get_label(): list(line.get_ydata())
        for line in ax.get_lines()  # type: ignore[attr-defined]
        if not line.get_label().startswith("_")
    }


def _by_name(figs: list[Figure]) -> dict[str, Figure]:
    return {fig.get_label(): fig for fig in figs}


# --- the figures ----------------------------------------------------------------------------------
def test_plot_runs_one_line_per_run_in_every_axes(logs: dict[str, Path]) -> None:
    figs = _by_name(plot_runs([logs["bn"], logs["plain"]], labels=["BN", "plain"]))
    assert {f"{name}.png" for name in figs} == EXPECTED_PNGS
    for name, fig in figs.items():
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert axes, name
        for ax in axes:
            labels = list(_labelled_lines(ax))
            expected = ["BN"] if name in NORM_ONLY else ["BN", "plain"]
            assert labels == expected, (name, ax.get_title())
            legend = ax.get_legend()
            if legend is not None:
                assert [t.get_text() for t in legend.get_texts()] == expected, name
        # the W&B panel of the same name has the same title
        panel = next((p for p in PAPER_PANELS if p.name == name), None)
        if panel is not None:
            assert fig.get_suptitle().replace("\n", " ") == panel.title


def test_plot_runs_draws_the_logged_values(logs: dict[str, Path]) -> None:
    bn_csv, plain_csv = logs["bn_csv"], logs["plain"] / "metrics.csv"
    figs = _by_name(plot_runs([bn_csv, plain_csv], labels=["BN", "plain"]))
    (beta_ax,) = figs["beta_smoothness"].axes
    lines = _labelled_lines(beta_ax)
    for label, path in (("BN", bn_csv), ("plain", plain_csv)):
        steps, values = _csv_series(path, "smoothness/beta_eff")
        assert steps == list(range(0, STEPS, EVERY))
        np.testing.assert_allclose(lines[label], values, rtol=1e-12)
    # a per-layer figure: one panel per layer, matched by name across the runs
    ics = figs["ics_l2"]
    titles = [ax.get_title() for ax in ics.axes if ax.get_visible()]
    assert titles == ["net.0", "net.4", "net.8"]  # the three Linear layers of both MLPs
    np.testing.assert_allclose(
        _labelled_lines(ics.axes[1])["plain"], _csv_series(plain_csv, "ics/net.4/l2")[1]
    )
    # the band's outline runs through the min and max over η
    band_ax = figs["loss_range"].axes[0]
    ydata = [list(line.get_ydata()) for line in band_ax.get_lines()]
    assert _csv_series(bn_csv, "lipschitz/loss_min")[1] in ydata
    assert _csv_series(bn_csv, "lipschitz/loss_max")[1] in ydata
    # thm41 ratio ≤ 1 in a real BatchNorm run, with its guide at 1
    thm = figs["thm41_ratio"]
    ratios = [v for ax in thm.axes if ax.get_visible() for v in _labelled_lines(ax)["BN"]]
    assert ratios and max(ratios) <= 1 + 1e-9


def test_cli_writes_expected_pngs_and_index(
    logs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figs"
    argv = ["plot", str(logs["bn"]), str(logs["plain"]), "--labels", "BN,plain"]
    assert main([*argv, "--out", str(out)]) == 0
    written = {p.name for p in out.iterdir()}
    assert written == EXPECTED_PNGS | {"index.md", RECORD}
    for png in EXPECTED_PNGS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (out / "index.md").read_text()
    for png in EXPECTED_PNGS:
        assert index.count(f"[`{png}`]({png}): ") == 1
    text = capsys.readouterr().out
    assert f"figures: {len(EXPECTED_PNGS)} PNG files in {out}" in text


def test_steps_window_and_default_labels(logs: dict[str, Path]) -> None:
    figs = _by_name(plot_runs([logs["bn"], logs["plain"]], steps="8:16"))
    (ax,) = figs["beta_smoothness"].axes
    for line in ax.get_lines():
        assert list(line.get_xdata()) == [8, 12, 16]
    # default labels: the folder names
    assert list(_labelled_lines(ax)) == ["bn", "plain"]


# --- each kind of RUN -----------------------------------------------------------------------------
def test_run_kinds_csv_file_newest_version_and_default_out(
    logs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a CSVLogger folder with two versions: the newest is taken, and said
    exp = tmp_path / "logs" / "exp"
    shutil.copytree(logs["bn"] / "version_0", exp / "version_0")
    newest = exp / "version_1" / "metrics.csv"
    newest.parent.mkdir()
    rows = logs["bn_csv"].read_text().splitlines(keepends=True)
    step_col = rows[0].split(",").index("step")
    newest.write_text("".join(rows[:1] + [r for r in rows[1:] if r.split(",")[step_col] in "04"]))
    assert main(["plot", str(exp), str(logs["plain"] / "metrics.csv")]) == 0
    text = capsys.readouterr().out
    assert "2 logged versions; using the newest, version_1" in text
    out = exp / "lightning-bn-plot"  # inside the first RUN given, never beside it
    assert {p.name for p in out.iterdir()} == EXPECTED_PNGS | {"index.md", RECORD}
    figs = _by_name(plot_runs([exp, logs["plain"] / "metrics.csv"]))
    (ax,) = figs["beta_smoothness"].axes
    assert list(ax.get_lines()[0].get_xdata()) == [0, 4]  # version_1 has steps 0 and 4 only
    assert list(_labelled_lines(ax)) == ["exp", "plain"]


def _reproduce_folder(root: Path, logs: dict[str, Path], status: str = "finished") -> Path:
    """A reproduce run folder (run.json format 2) whose two runs, the standard and BatchNorm
    networks at the base learning rate and seed, are the two real runs."""
    plan = build_plan(
        "digits", quick=True, steps=STEPS, lrs=[0.05], kinds=["standard", "batchnorm"]
    )
    runs = []
    for spec in plan.variants():
        if spec.init_scale != 1.0 or spec.batch_size is not None:
            continue  # only the two base variants
        source = logs["bn_csv"] if spec.kind == "batchnorm" else logs["plain"] / "metrics.csv"
        run_id = spec.run_id(plan.seed)
        target = root / "csv" / run_id / "metrics.csv"
        target.parent.mkdir(parents=True)
        shutil.copy(source, target)
        entry = spec.to_dict() | {"id": run_id, "variant": spec.id, "seed": plan.seed}
        runs.append(entry | {"csv": f"csv/{run_id}/metrics.csv"})
    manifest = {"format": 2, "status": status, "plan": plan.to_dict(), "runs": runs}
    (root / "run.json").write_text(json.dumps(manifest))
    return root


def test_run_kind_reproduce_folder(logs: dict[str, Path], tmp_path: Path) -> None:
    run = _reproduce_folder(tmp_path / "run", logs)
    # alone: its own figures and summary.md, as today
    assert main(["plot", str(run)]) == 0
    assert (run / "summary.md").is_file() and (run / "figures").is_dir()
    own = {p.name: p.stat().st_mtime_ns for p in (run / "figures").iterdir()}
    # with another run: each variant is one run; figures beside it, its own left alone
    figs = _by_name(plot_runs([run, logs["plain"]], labels=["rep", "plain"]))
    labels = list(_labelled_lines(figs["beta_smoothness"].axes[0]))
    assert labels == [
        "rep/mlp_standard_lr0.05_seed0",
        "rep/mlp_batchnorm_lr0.05_seed0",
        "plain",
    ]
    assert main(["plot", str(run), str(logs["plain"])]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (run / "figures").iterdir()} == own
    assert (run / "lightning-bn-plot" / "index.md").is_file()


# --- bad input: one line naming the file, exit 2 --------------------------------------------------
def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs(
    logs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no metrics.csv in this folder" in _error(["plot", str(empty)], capsys)
    assert "no such file or folder" in _error(["plot", str(tmp_path / "nope")], capsys)

    no_keys = tmp_path / "nokeys" / "metrics.csv"
    no_keys.parent.mkdir()
    no_keys.write_text("epoch,step,train/loss\n0,0,2.3\n0,1,2.2\n")
    err = _error(["plot", str(no_keys)], capsys)
    assert str(no_keys) in err and "no lightning-bn diagnostic key" in err

    noise = tmp_path / "bytes" / "metrics.csv"
    noise.parent.mkdir()
    noise.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    err = _error(["plot", str(logs["plain"]), str(noise.parent)], capsys)
    assert str(noise) in err and "not a CSV text file" in err

    cut = tmp_path / "cut" / "metrics.csv"
    cut.parent.mkdir()
    text = logs["bn_csv"].read_text()
    cut.write_text(text[: len(text) - 7])  # cut inside the last row
    err = _error(["plot", str(cut)], capsys)
    assert str(cut) in err and "truncated" in err

    header_only = tmp_path / "header" / "metrics.csv"
    header_only.parent.mkdir()
    header_only.write_text("")
    assert "empty file" in _error(["plot", str(header_only)], capsys)

    argv = ["plot", str(logs["bn"]), str(logs["plain"])]
    assert "one label per RUN (2), got 3" in _error([*argv, "--labels", "a,b,c"], capsys)
    assert "FROM <= TO" in _error([*argv, "--steps", "9:3"], capsys)
    assert "no run has a diagnostic value in the --steps window" in _error(
        [*argv, "--steps", "1000:2000", "--out", str(tmp_path / "o")], capsys
    )


# --- issue 14: interrupted runs, no silent overwrite, NaN, unreadable, read-only ---------------------
def test_interrupted_reproduce_run_draws_what_is_complete(
    logs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _reproduce_folder(tmp_path / "run", logs, status="interrupted")
    bn_id, std_id = "mlp_batchnorm_lr0.05_seed0", "mlp_standard_lr0.05_seed0"
    manifest = json.loads((run / "run.json").read_text())
    manifest["completed"] = [std_id]
    (run / "run.json").write_text(json.dumps(manifest))
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{bn_id}: incomplete" in out and std_id not in out.split("summary:")[0]
    summary = (run / "summary.md").read_text()
    # the partial run is not in the runs table, and is named as missing
    assert "| mlp | batchnorm |" not in summary and "| mlp | standard |" in summary
    assert bn_id in summary
    # the comparison figures leave it out too, and say so
    assert main(["plot", str(run), str(logs["plain"]), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert f"run/{bn_id}: incomplete" in out
    assert f"run 'run/{std_id}'" in out and f"run 'run/{bn_id}'" not in out


def test_truncated_csv_keeps_the_summary_made_from_more_data(
    logs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _reproduce_folder(tmp_path / "run", logs)
    assert main(["plot", str(run)]) == 0
    good = (run / "summary.md").read_text()
    capsys.readouterr()
    csv_path = run / "csv" / "mlp_batchnorm_lr0.05_seed0" / "metrics.csv"
    text = csv_path.read_text()
    csv_path.write_text(text[: len(text) // 2 - 3])  # cut mid-row, as a killed writer leaves it
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert "mlp_batchnorm_lr0.05_seed0: incomplete" in out and "truncated" in out
    assert "summary.md, findings.json and figures/ not overwritten" in out
    assert (run / "summary.md").read_text() == good
    assert "| mlp | batchnorm |" not in (run / "summary.partial.md").read_text()
    assert (run / "figures.partial").is_dir()
    # once the file is whole again, summary.md is redrawn in place
    csv_path.write_text(text)
    assert main(["plot", str(run)]) == 0
    assert "not overwritten" not in capsys.readouterr().out


def test_nan_reported_as_nan_and_divergence_as_such(
    logs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = list(csv.DictReader(logs["bn_csv"].open(newline="")))
    fields = list(rows[0])
    for row in rows:
        if row["smoothness/beta_eff"] and int(row["step"]) >= 8:
            row["smoothness/beta_eff"] = "nan"
        if row["train/loss"] and int(row["step"]) >= 20:
            row["train/loss"] = "inf" if int(row["step"]) == 20 else "nan"
    path = tmp_path / "nan" / "metrics.csv"
    path.parent.mkdir()
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    assert main(["plot", str(path), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "diverged: training loss inf from step 20" in out
    assert "smoothness/beta_eff: NaN at 4 of 6 steps (first at step 8)" in out
    figs = _by_name(plot_runs([path]))
    (ax,) = figs["beta_smoothness"].axes
    assert (
        list(_labelled_lines(ax)["nan"])
        == _csv_series(logs["bn_csv"], "smoothness/beta_eff")[1][:2]
    )
    assert [t.get_text() for t in ax.texts] == ["NaN"]  # not "diverged": only a loss diverges
    (loss_ax,) = figs["train_loss"].axes
    assert [t.get_text() for t in loss_ax.texts] == ["diverged"]
    assert not any(math.isnan(v) for v in _labelled_lines(loss_ax)["nan"])


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` unwritable: chmod, or (as root, whom chmod does not stop) chattr +i."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a folder read-only")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"running as root and chattr +i failed: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_run_folder(
    logs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _reproduce_folder(tmp_path / "run", logs)
    with _read_only(run):
        try:
            (run / "probe").touch()
        except OSError:
            pass
        else:
            pytest.skip("the folder stayed writable")
        err = _error(["plot", str(run)], capsys)
        assert "cannot write" in err and str(run) in err
    with _read_only(tmp_path):
        err = _error(["plot", str(logs["plain"]), "--out", str(tmp_path / "figs")], capsys)
        assert "cannot write" in err and str(tmp_path / "figs") in err


def test_plot_runs_exported_lazily() -> None:
    # matplotlib is optional: `import lightning_bn` loads none of the figure modules
    code = (
        "import sys, lightning_bn; "
        "figs = ('lightning_bn.plot.run_figures', 'lightning_bn.figures.draw'); "
        "assert not any(m in sys.modules for m in figs), 'eager'; "
        "assert 'plot_runs' in lightning_bn.__all__; "
        "from lightning_bn import plot_runs; print(plot_runs.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lightning_bn.plot.run_figures"
