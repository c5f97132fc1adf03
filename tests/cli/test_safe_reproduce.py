"""`lightning-bn reproduce` never writes into a folder of the user's, checks derived ranges before
anything runs, and leaves ``findings.json`` and ``summary.md`` when the figures cannot be written.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from pathlib import Path

import pytest

from lightning_bn import _outputs
from lightning_bn.cli import main

#: The smallest real run: the deep linear networks, tiny, 4 steps, one seed.
TINY_RUN = ["reproduce", "dln", "--tiny", "--steps", "4", "--seeds", "1", "--wandb", "off"]
TINY_RUN += ["--jobs", "1", "--no-progress"]


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_out_refusals_create_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with contextlib.chdir(tmp_path):
        err = _error([*TINY_RUN, "--out", ""], capsys)
        assert "argument --out: expected a folder path, got ''" in err
        assert list(tmp_path.iterdir()) == []

    mine = tmp_path / "mine"
    (mine / "csv" / "a").mkdir(parents=True)
    files = {"summary.md": b"my summary", "findings.json": b"{}", "csv/a/metrics.csv": b"x"}
    for name, data in files.items():
        (mine / name).write_bytes(data)
    err = _error([*TINY_RUN, "--out", str(mine)], capsys)
    assert f"--out {str(mine)!r} holds files lightning-bn did not write" in err
    assert "pass a new or empty folder" in err
    assert {p.relative_to(mine).as_posix() for p in mine.rglob("*") if p.is_file()} == set(files)
    assert all((mine / n).read_bytes() == d for n, d in files.items())

    # seed + seeds - 1 past 2**32 - 1: refused before the run folder exists
    out = tmp_path / "seeds"
    argv = ["reproduce", "dln", "--tiny", "--seed", "4294967295", "--seeds", "2", "--out", str(out)]
    err = _error(argv, capsys)
    assert "--seed 4294967295 with 2 seeds uses seeds up to 4294967296" in err
    assert "<= 4294967295" in err and not out.exists()


def test_non_utf8_out_and_full_disk_leave_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    real = _outputs._replace_atomically

    def disk_full_for_png(path: Path, data: bytes) -> None:
        if path.suffix == ".png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(_outputs, "_replace_atomically", disk_full_for_png)
    out = Path(os.fsdecode(bytes(tmp_path) + b"/run-\xff"))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*TINY_RUN, "--out", str(out)]) == 0
    printed = stdout.getvalue()
    failed = [ln for ln in printed.splitlines() if ln.startswith("figure not written: ")]
    assert failed and all("No space left on device" in ln for ln in failed)
    data = json.loads((out / "findings.json").read_bytes().decode("utf-8"))
    assert data["findings"] and data["runs"]
    summary = (out / "summary.md").read_bytes().decode("utf-8")
    assert "Findings" in summary and ".png" not in summary
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
