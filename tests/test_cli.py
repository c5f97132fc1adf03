"""`lightning-bn reproduce` and `lightning-bn plot` end to end, on tiny budgets.

The runs use the hidden ``--tiny`` flag (small models, four diagnostic measurements) and a few
steps, so that every experiment runs through the real Trainer, callbacks, CSV and W&B (offline)
loggers in seconds. Argument errors are checked in-process and once through the installed
console script.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_bn.cli import main
from lightning_bn.experiments import write_cifar10_like
from lightning_bn.reproduce import FINDINGS, build_plan, load_run
from lightning_bn.reproduce.plan import KINDS, ExperimentPlan
from lightning_bn.reproduce.runner import resolve_wandb_mode
from tests.support.wandb_offline import OfflineRun, WandbFileError, read_run
from tests.test_plotting import EXPECTED_FIGURES, assert_valid_png, finding_rows

TINY = ["--tiny", "--no-progress"]


def _isolate_wandb(mp: pytest.MonkeyPatch, root: Path) -> None:
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_CONSOLE", "off")
    mp.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        path = root / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        mp.setenv(var, str(path))


def _script() -> str:
    candidate = Path(sys.executable).with_name("lightning-bn")
    found = str(candidate) if candidate.is_file() else shutil.which("lightning-bn")
    if found is None:
        pytest.skip("the lightning-bn console script is not installed")
    return found


def _finished_wandb_run(path: Path, timeout: float = 60.0) -> OfflineRun:
    """Read a run-*.wandb file once wandb-core has written its last (exit) record."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = read_run(path)
            if run.record_types.get("exit"):
                return run
        except WandbFileError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`lightning-bn reproduce digits --quick` on a tiny budget, W&B offline."""
    root = tmp_path_factory.mktemp("digits")
    out = root / "run"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        _isolate_wandb(mp, root)
        status = main(["reproduce", "digits", "--quick", "--steps", "12", "--out", str(out), *TINY])
    assert status == 0
    return out, stdout.getvalue()


def test_reproduce_digits_quick_end_to_end(digits_run: tuple[Path, str]) -> None:
    out, stdout = digits_run
    plan = load_run(out).plan
    variants = plan.variants()
    assert plan.quick and plan.archs == ("mlp",) and plan.kinds == KINDS
    assert len(variants) == 14
    # one progress line per finished variant, then the findings
    assert len([ln for ln in stdout.splitlines() if ln.startswith("[")]) == len(variants)
    assert "Findings of the paper" in stdout

    # every figure, each a valid non-empty PNG
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert figures == EXPECTED_FIGURES
    for name in figures:
        assert_valid_png(out / "figures" / name)

    # summary.md: one row per finding, each evaluated, with numbers and its criterion
    text = (out / "summary.md").read_text()
    rows = finding_rows(text)
    assert len(rows) == len(FINDINGS)
    for row in rows:
        assert row[2] in ("**reproduced**", "**not reproduced**"), row
        assert any(ch.isdigit() for ch in row[3]), row
        assert row[4], row

    # a CSV file and a finished offline W&B run per variant, holding the diagnostics
    for spec in variants:
        assert (out / "csv" / spec.id / "metrics.csv").is_file()
    run_files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == len(variants)
    names = set()
    for path in run_files:
        run = _finished_wandb_run(path)
        variant = run.config["variant"]
        names.add(variant["id"])
        keys: set[str] = set().union(*run.history)
        assert {"train/loss", "smoothness/beta_eff", "lipschitz/loss_range"} <= keys
        assert any(k.startswith("ics/") for k in keys)
        assert any(k.startswith("noise/") for k in keys) == (variant["kind"] == "noisy-batchnorm")
        assert "final/val_acc" in run.summary
    assert names == {spec.id for spec in variants}

    # `lightning-bn plot` (the installed script) redraws the same figures and summary
    summary_before = text
    for png in (out / "figures").glob("*.png"):
        png.unlink()
    (out / "summary.md").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run(
        [_script(), "plot", str(out)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (out / "figures").glob("*.png")} == figures
    assert (out / "summary.md").read_text() == summary_before
    assert "summary:" in done.stdout


def test_reproduce_vgg_cifar10_on_small_files(tmp_path: Path) -> None:
    data = write_cifar10_like(tmp_path / "cifar", n_per_batch=20)
    out = tmp_path / "run"
    args = ["reproduce", "vgg-cifar10", "--data-dir", str(data), "--steps", "4", "--lr", "0.1"]
    args += ["--variants", "standard,batchnorm,noisy-batchnorm", "--wandb", "off"]
    assert main([*args, "--out", str(out), *TINY]) == 0
    run = load_run(out)
    assert run.plan.accelerator == "auto" and run.plan.lrs == (0.1,)
    assert len(run.histories) == 3 and not run.missing
    for history in run.histories.values():
        assert 0 <= history.last("final/val_acc") <= 1
        assert history.get("smoothness/beta_eff")[1].size > 0
    assert not (out / "wandb").exists()  # --wandb off
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {
        "overview_vgg.png",
        "training_vgg.png",
        "ics_vgg.png",
        "noisy_bn_activations_vgg.png",
    } <= figures
    rows = finding_rows((out / "summary.md").read_text())
    assert len(rows) == len(FINDINGS)
    assert rows[-1][2] == "not evaluated"  # no ℓp-norm variant was trained


def test_reproduce_dln(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        main(["reproduce", "dln", "--steps", "8", "--wandb", "off", "--out", str(out), *TINY]) == 0
    )
    run = load_run(out)
    assert run.plan.task == "regression" and run.plan.lrs == (1e-6,)
    assert {h.spec.kind for h in run.histories.values()} == {"standard", "batchnorm"}
    text = (out / "summary.md").read_text()
    rows = finding_rows(text)
    assert len(rows) == len(FINDINGS)
    by_claim = {r[1]: r[2] for r in rows}
    assert by_claim["BatchNorm tolerates a larger learning rate"] == "not evaluated"
    assert any("larger with BatchNorm (deep linear network)" in claim for claim in by_claim)
    assert "final val acc" not in text  # regression: losses only
    assert (out / "figures" / "training_dln.png").is_file()


# --- argument errors ---------------------------------------------------------------------------------
def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reproduce", "imagenet"], "invalid choice: 'imagenet'"),
        (["reproduce", "--lr", "0"], "learning rate > 0"),
        (["reproduce", "--lr", "-0.1"], "learning rate > 0"),
        (["reproduce", "--lr", "fast"], "expected a learning rate"),
        (["reproduce", "--lr", "nan"], "learning rate > 0"),
        (["reproduce", "--lr", "0.1", "inf"], "learning rate > 0"),
        (["reproduce", "--steps", "0"], "positive integer"),
        (["reproduce", "--seed", "-1"], "integer in [0, 2**32 - 1]"),
        (["reproduce", "--variants", "batchnorm,groupnorm"], "comma-separated list"),
        (["reproduce", "digits", "--archs", "vgg"], "architectures of 'digits'"),
        (["reproduce", "vgg-cifar10"], "needs --data-dir"),
        (["reproduce", "digits", "--data-dir", "."], "vgg-cifar10 only"),
        (["plot"], "required"),
    ],
)
def test_invalid_arguments(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    line = _error_line(capsys, argv)
    assert line.startswith("lightning-bn")
    assert message in line


def test_invalid_data_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = _error_line(capsys, ["reproduce", "vgg-cifar10", "--data-dir", str(tmp_path / "x")])
    assert "does not exist" in missing
    partial = write_cifar10_like(tmp_path / "partial", n_per_batch=2)
    (partial / "data_batch_3").unlink()
    assert "data_batch_3" in _error_line(
        capsys, ["reproduce", "vgg-cifar10", "--data-dir", str(partial)]
    )
    broken = write_cifar10_like(tmp_path / "broken", n_per_batch=2)
    (broken / "test_batch").write_bytes(b"not a pickle")
    assert "not a CIFAR-10" in _error_line(
        capsys, ["reproduce", "vgg-cifar10", "--data-dir", str(broken)]
    )


def test_plot_and_out_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "no run.json" in _error_line(capsys, ["plot", str(tmp_path)])
    assert "does not exist" in _error_line(capsys, ["plot", str(tmp_path / "nothing")])
    (tmp_path / "run.json").write_text("{}")
    assert "already holds a run" in _error_line(capsys, ["reproduce", "--out", str(tmp_path)])


def test_error_through_console_script() -> None:
    done = subprocess.run(
        [_script(), "reproduce", "imagenet"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    assert "invalid choice: 'imagenet'" in lines[0]
    assert done.stdout == ""


# --- plan and W&B mode -----------------------------------------------------------------------------
def test_default_plans() -> None:
    quick = build_plan("digits", quick=True)
    assert (quick.archs, quick.lrs, quick.steps) == (("mlp",), (0.1, 1.0), 400)
    assert quick.measure_every == 20 and quick.notes
    full = build_plan("digits")
    assert (full.archs, full.kinds, full.steps) == (("mlp", "cnn"), KINDS, 1000)
    assert len(full.variants()) == 28
    dln = build_plan("dln")
    assert (dln.kinds, dln.lrs, dln.steps, dln.task) == (
        ("standard", "batchnorm"),
        (1e-6,),
        10_000,
        "regression",
    )
    assert dln.step_sizes is not None
    assert dln.step_sizes[0] == pytest.approx(0.01) and dln.step_sizes[-1] == pytest.approx(30)
    vgg = build_plan("vgg-cifar10", data_dir="x", lrs=[0.5, 0.1, 0.5])
    assert vgg.lrs == (0.1, 0.5) and vgg.batch_size == 128
    assert ExperimentPlan.from_dict(vgg.to_dict()) == vgg


def test_wandb_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode("auto") == "offline"  # no key anywhere: offline, never a prompt
    netrc.write_text("machine example.com login user password secret\n")
    assert resolve_wandb_mode("auto") == "offline"
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert resolve_wandb_mode("auto") == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "off"
    assert resolve_wandb_mode("online") == "online"
    with pytest.raises(ValueError, match="one of auto"):
        resolve_wandb_mode("sometimes")


def test_missing_optional_dependency(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a)
    )
    line = _error_line(capsys, ["reproduce", "digits", "--quick"])
    assert "needs scikit-learn" in line and "lightning-bn[examples]" in line
