"""`lightning-bn reproduce` and `lightning-bn plot` end to end, on tiny budgets.

The runs use the hidden ``--tiny`` flag (small models, four diagnostic measurements) and a few
steps, so that every experiment runs through the real Trainer, callbacks, CSV and W&B (offline)
loggers in seconds. Argument errors are checked in-process and once through the installed
console script.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_bn.cli import main
from lightning_bn.experiments import write_cifar10_like
from lightning_bn.reproduce import FINDINGS, VariantSpec, build_plan, load_run
from lightning_bn.reproduce.plan import KINDS, ExperimentPlan
from lightning_bn.reproduce.runner import resolve_wandb_mode
from tests.reproduce.test_plotting import (
    EXPECTED_FIGURES,
    assert_findings_schema,
    assert_valid_png,
    finding_rows,
)
from tests.support.wandb_offline import OfflineRun, WandbFileError, read_run

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


#: The variants of the tiny end-to-end run: every finding needs one of these.
E2E_VARIANTS = "standard,batchnorm,noisy-batchnorm,l1,layernorm"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`lightning-bn reproduce digits --quick` on a tiny budget: 2 seeds (the default)."""
    root = tmp_path_factory.mktemp("digits")
    out = root / "run"
    stdout = io.StringIO()
    args = ["reproduce", "digits", "--quick", "--steps", "10", "--variants", E2E_VARIANTS]
    args += ["--wandb", "off", "--jobs", "1", "--out", str(out), *TINY]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        _isolate_wandb(mp, root)
        status = main(args)
    assert status == 0
    return out, stdout.getvalue()


def test_reproduce_digits_quick_end_to_end(digits_run: tuple[Path, str]) -> None:
    out, stdout = digits_run
    run = load_run(out)
    plan = run.plan
    runs = plan.runs()
    assert plan.quick and plan.archs == ("mlp",) and plan.seeds == 2 and plan.init == "kaiming"
    # 5 kinds at lr 0.1, standard and BN at lr 1, 2 × 2 scaled inits, BN and LN at batch 4
    assert len(plan.variants()) == 5 + 2 + 4 + 2 and len(runs) == 2 * 13
    assert run.seeds == [0, 1] and not run.missing
    # one progress line per finished run, then the findings
    assert len([ln for ln in stdout.splitlines() if ln.startswith("[")]) == len(runs)
    assert "Findings (median over seeds" in stdout

    # findings.json: every finding evaluated, with the schema
    data = json.loads((out / "findings.json").read_text())
    assert_findings_schema(data, n_runs=len(runs))
    assert {f["id"] for f in data["findings"]} == {f"{name}/mlp" for name in FINDINGS}
    assert data["not_evaluated"] == []
    assert all(f["seeds"] == 2 for f in data["findings"])
    assert data["seeds"] == [0, 1] and data["init"] == "kaiming"
    by_id = {r["id"]: r for r in data["runs"]}
    assert by_id["mlp_batchnorm_lr0.1_bs4_seed1"]["batch_size"] == 4
    assert by_id["mlp_standard_lr0.1_init4_seed0"]["init_scale"] == 4.0

    # every figure, each a valid non-empty PNG
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert figures == EXPECTED_FIGURES
    for name in figures:
        assert_valid_png(out / "figures" / name)

    # summary.md: one row per finding, each with a verdict, a median and an interval
    text = (out / "summary.md").read_text()
    rows = finding_rows(text)
    assert len(rows) == len(FINDINGS)
    for row in rows:
        assert row[3] in ("**reproduced**", "**not reproduced**", "*inconclusive*"), row
        assert "[" in row[4] and any(ch.isdigit() for ch in row[4]), row
        assert row[6], row
    for spec, seed in runs:
        assert (out / "csv" / spec.run_id(seed) / "metrics.csv").is_file()
    assert not (out / "wandb").exists()  # --wandb off

    # `lightning-bn plot` (the installed script) redraws the same figures, summary and findings
    summary_before, findings_before = text, (out / "findings.json").read_text()
    for png in (out / "figures").glob("*.png"):
        png.unlink()
    (out / "summary.md").unlink()
    (out / "findings.json").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run(
        [_script(), "plot", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (out / "figures").glob("*.png")} == figures
    assert (out / "summary.md").read_text() == summary_before
    assert (out / "findings.json").read_text() == findings_before
    assert "summary:" in done.stdout


def test_reproduce_vgg_cifar10_on_small_files(tmp_path: Path) -> None:
    data = write_cifar10_like(tmp_path / "cifar", n_per_batch=20)
    out = tmp_path / "run"
    args = ["reproduce", "vgg-cifar10", "--data-dir", str(data), "--steps", "4", "--lr", "0.1"]
    args += ["--variants", "standard,batchnorm,noisy-batchnorm", "--wandb", "off", "--seeds", "1"]
    assert main([*args, "--out", str(out), *TINY]) == 0
    run = load_run(out)
    assert run.plan.accelerator == "auto" and run.plan.lrs == (0.1,)
    # 3 kinds, and standard and BN with the initial weights ×0.25 and ×4 (no LayerNorm: no
    # batch-size variants)
    assert len(run.histories) == 3 + 4 and not run.missing
    for history in run.histories.values():
        assert 0 <= history.last("final/val_acc") <= 1
    assert run.find("vgg", "batchnorm", 0.1).get("smoothness/beta_eff")[1].size > 0  # type: ignore[union-attr]
    assert not (out / "wandb").exists()  # --wandb off
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {
        "overview_vgg.png",
        "training_vgg.png",
        "ics_vgg.png",
        "noisy_bn_activations_vgg.png",
    } <= figures
    data = json.loads((out / "findings.json").read_text())
    skipped = {f["id"] for f in data["not_evaluated"]}
    assert skipped == {"bn_larger_lr/vgg", "lp_norms/vgg", "small_batch/vgg"}


def test_reproduce_dln_two_processes_with_wandb(tmp_path: Path) -> None:
    """Two seeds through the worker pool (--jobs 2), each run a finished offline W&B run."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, tmp_path)
        args = ["reproduce", "dln", "--steps", "8", "--seeds", "2", "--jobs", "2"]
        assert main([*args, "--wandb", "offline", "--out", str(out), *TINY]) == 0
    run = load_run(out)
    assert run.plan.task == "regression" and run.plan.lrs == (1e-6,)
    assert sorted(run.histories) == sorted(
        f"dln_{k}_lr1e-06_seed{s}" for k in ("standard", "batchnorm") for s in (0, 1)
    )
    assert run.manifest["jobs"] == 2 and run.manifest["train_cpu_seconds"] > 0
    data = json.loads((out / "findings.json").read_text())
    assert "larger with BatchNorm" in " ".join(f["title"] for f in data["findings"])
    skipped = {f["id"] for f in data["not_evaluated"]}
    assert "bn_larger_lr/dln" in skipped and "steps_to_accuracy/dln" in skipped
    text = (out / "summary.md").read_text()
    assert "final val acc" not in text  # regression: losses only
    assert (out / "figures" / "training_dln.png").is_file()

    # a finished offline W&B run per training run, holding the diagnostics
    run_files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 4
    names = set()
    for path in run_files:
        wandb_run = _finished_wandb_run(path)
        variant = wandb_run.config["variant"]
        names.add(f"{variant['id']}_seed{variant['seed']}")
        keys: set[str] = set().union(*wandb_run.history)
        assert {"train/loss", "smoothness/beta_eff", "lipschitz/loss_range"} <= keys
        assert any(k.startswith("ics/") for k in keys)
        assert "final/val_loss" in wandb_run.summary
    assert names == set(run.histories)

    # a run depends on its variant and seed only: trained again here, in this process, it
    # ends with the same losses as in the worker process
    from lightning_bn.reproduce.runner import run_variant

    spec = VariantSpec("dln", "batchnorm", 1e-6)
    again = run_variant(
        run.plan, spec, tmp_path / "again", wandb_mode="off", progress=False, seed=1
    )
    worker = run.histories[spec.run_id(1)]
    for key in ("final/train_loss", "final/mean_train_loss", "final/val_loss"):
        assert again.final[key] == worker.last(key), key


def test_init_default_keeps_the_plateau_setting(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["reproduce", "digits", "--steps", "4", "--variants", "standard,batchnorm"]
    args += ["--archs", "mlp", "--lr", "0.1", "--seeds", "1", "--init", "default"]
    assert main([*args, "--wandb", "off", "--jobs", "1", "--out", str(out), *TINY]) == 0
    assert load_run(out).plan.init == "default"
    assert "PyTorch's default (`--init default`" in (out / "summary.md").read_text()
    assert json.loads((out / "findings.json").read_text())["init"] == "default"


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
        (["reproduce", "--seeds", "0"], "positive integer"),
        (["reproduce", "--jobs", "0"], "positive integer"),
        (["reproduce", "--init", "xavier"], "invalid choice: 'xavier'"),
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
    # a folder without run.json is read as a CSVLogger folder (lightning-bn plot on any log)
    assert "no metrics.csv in this folder" in _error_line(capsys, ["plot", str(tmp_path)])
    assert "no such file or folder" in _error_line(capsys, ["plot", str(tmp_path / "nothing")])
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
    assert (quick.archs, quick.lrs, quick.steps, quick.seeds) == (("mlp",), (0.1, 1.0), 300, 2)
    assert quick.measure_every == 15 and quick.notes and quick.init == "kaiming"
    assert len(quick.variants()) == 7 + 2 + 4 + 2 and len(quick.runs()) == 30
    assert quick.seed_list == [0, 1]
    full = build_plan("digits", seed=1)
    assert (full.archs, full.kinds, full.steps, full.seeds) == (("mlp", "cnn"), KINDS, 1000, 3)
    assert full.seed_list == [1, 2, 3]
    # MLP: 7 + 2 + 4 + 2 variants; CNN: 7 + 2 (the initialisation and batch runs: MLP only)
    assert len(full.variants()) == 15 + 9 and len(full.runs()) == 3 * 24
    assert [s.id for s in full.variants() if s.arch == "cnn" and s.lr == 1.0] == [
        "cnn_standard_lr1",
        "cnn_batchnorm_lr1",
    ]
    diagnosed = {s.id for s in full.variants() if full.diagnosed(s)}
    assert diagnosed == {
        f"{a}_{k}_lr{lr}"
        for a in ("mlp", "cnn")
        for k in ("standard", "batchnorm")
        for lr in ("0.1", "1")
    }
    dln = build_plan("dln")
    assert (dln.kinds, dln.lrs, dln.steps, dln.task) == (
        ("standard", "batchnorm"),
        (1e-6,),
        10_000,
        "regression",
    )
    assert dln.init_scales == () and dln.small_batches == ()
    assert dln.step_sizes is not None
    assert dln.step_sizes[0] == pytest.approx(0.01) and dln.step_sizes[-1] == pytest.approx(30)
    vgg = build_plan("vgg-cifar10", data_dir="x", lrs=[0.5, 0.1, 0.5])
    assert vgg.lrs == (0.1, 0.5) and vgg.batch_size == 128
    for plan in (quick, full, dln, vgg):
        assert ExperimentPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match="init"):
        build_plan("digits", init="xavier")
    with pytest.raises(ValueError, match="seeds"):
        build_plan("digits", seeds=0)


def test_init_choices_match_the_models() -> None:
    from lightning_bn.experiments import INIT_SCHEMES
    from lightning_bn.reproduce.plan import INITS

    assert INITS == INIT_SCHEMES


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
