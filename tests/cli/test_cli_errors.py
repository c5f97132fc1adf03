"""`lightning-bn reproduce` refuses bad input before it writes anything (issue 14), through a
subprocess: one line on stderr naming the argument and the value, exit status 2, no traceback,
and nothing left behind that would block the same ``--out`` afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--tiny", "--no-progress", "--wandb", "off"]


def _run(args: list[str], cwd: Path, code: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env["WANDB_MODE"] = "disabled"
    command = (
        [sys.executable, "-c", code, *args]
        if code is not None
        else [sys.executable, "-m", "lightning_bn.cli", *args]
    )
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(done: subprocess.CompletedProcess[str], *names: str) -> str:
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def _nothing_written(root: Path, before: set[Path]) -> None:
    assert set(root.rglob("*")) == before


def test_out_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    before = set(tmp_path.rglob("*"))
    out = tmp_path / "file" / "sub" / "run"
    line = _one_error_line(
        _run(["reproduce", *TINY, "--out", str(out)], tmp_path), "--out", str(out)
    )
    assert "under the file" in line and str(tmp_path / "file") in line
    _nothing_written(tmp_path, before)


def test_out_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file"
    line = _one_error_line(
        _run(["reproduce", *TINY, "--out", str(out)], tmp_path), "--out", str(out)
    )
    assert "not a folder" in line
    assert out.read_text() == "x"


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder the process cannot write in: permission bits, or for root (whom they do not
    bind) a folder of a file system that refuses new entries."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        tempfile.mkdtemp(dir="/sys")
    except OSError:
        return Path("/sys")
    pytest.skip("running as root and /sys is writable: no read-only folder to try")


def test_read_only_out(tmp_path: Path) -> None:
    folder = _read_only_folder(tmp_path)
    before = set(folder.iterdir())
    try:
        for out in (folder, folder / "new" / "run"):
            line = _one_error_line(
                _run(["reproduce", *TINY, "--out", str(out)], tmp_path), "--out", str(out)
            )
            # a folder holding files is refused for that before any write is tried
            why = "holds files lightning-bn did not write" if out == folder and before else ""
            assert (why or "cannot write in") in line and str(folder) in line
        assert set(folder.iterdir()) == before
    finally:
        if folder.is_relative_to(tmp_path):
            folder.chmod(0o755)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--accelerator", "bogus"], ["--accelerator", "'bogus'", "cpu"]),
        (["--accelerator", "CPU"], ["--accelerator", "'CPU'"]),
        (["--seed", str(2**32)], ["--seed", str(2**32), "2**32 - 1"]),
        (["--seed", str(2**70)], ["--seed", str(2**70)]),
    ],
)
def test_bad_values_write_nothing(tmp_path: Path, args: list[str], names: list[str]) -> None:
    out = tmp_path / "run"
    _one_error_line(_run(["reproduce", *TINY, "--out", str(out), *args], tmp_path), *names)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_gpu_without_gpu_then_the_same_out_works(tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["reproduce", "digits", *TINY, "--quick", "--steps", "4", "--out", str(out)]
    small = ["--variants", "standard", "--archs", "mlp", "--lr", "0.1"]
    line = _one_error_line(_run([*base, *small, "--accelerator", "gpu"], tmp_path), "--accelerator")
    assert "'gpu'" in line and "no such device" in line
    assert not out.exists()
    done = _run([*base, *small, "--accelerator", "cpu"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "run.json").is_file()
    assert '"status": "finished"' in (out / "run.json").read_text()


def test_internal_error_keeps_its_traceback(tmp_path: Path) -> None:
    # a bug is not a user error: the traceback stays, the exit status is Python's 1
    code = (
        "import sys, lightning_bn.reproduce as r\n"
        "def broken(*a, **k):\n"
        "    raise RuntimeError('internal bug')\n"
        "r.reproduce = broken\n"
        "from lightning_bn.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = _run(["reproduce", *TINY, "--out", str(tmp_path / "run")], tmp_path, code=code)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: internal bug" in done.stderr
