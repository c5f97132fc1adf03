"""What `lightning-bn plot` and the reproduce redraw write: never a file of the user's.

Real CSVLogger runs (a tiny MLP with the diagnostic callbacks) and real files; every refusal is
one line, exit status 2, naming the argument and the value.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_bn import _outputs
from lightning_bn._outputs import RECORD, OutputFolder, folder_state
from lightning_bn.cli import main
from lightning_bn.reproduce import redraw
from tests.plot.test_plot_runs import _reproduce_folder, logs  # noqa: F401  (a fixture)


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


# --- the rule itself ------------------------------------------------------------------------------
def test_output_folder_keeps_what_it_did_not_write(tmp_path: Path) -> None:
    folder = OutputFolder.open(tmp_path / "out")
    a = folder.write_text(tmp_path / "out" / "a.md", "first\n")
    assert folder_state(tmp_path / "out") == "ours"
    folder.write_text(a, "second\n")  # ours and unchanged: replaced, nothing kept
    assert a.read_text() == "second\n" and not folder.notes
    a.write_text("edited by hand\n")
    user = tmp_path / "out" / "b.md"
    user.write_text("the user's own\n")
    again = OutputFolder.open(tmp_path / "out")  # a later process reads the record
    again.write_text(a, "third\n")
    again.write_text(user, "ours\n")
    assert a.read_text() == "third\n" and user.read_text() == "ours\n"
    assert (tmp_path / "out" / "a.kept.md").read_text() == "edited by hand\n"
    assert (tmp_path / "out" / "b.kept.md").read_text() == "the user's own\n"
    assert len(again.notes) == 2 and "kept as a.kept.md" in again.notes[0]
    # the same bytes as the user's file: nothing to keep
    same = tmp_path / "out" / "c.md"
    same.write_text("same\n")
    again.write_text(same, "same\n")
    assert not (tmp_path / "out" / "c.kept.md").exists()
    # a second edit goes to .kept-2, the first kept copy stays
    a.write_text("edited again\n")
    OutputFolder.open(tmp_path / "out").write_text(a, "fourth\n")
    assert (tmp_path / "out" / "a.kept-2.md").read_text() == "edited again\n"
    assert (tmp_path / "out" / "a.kept.md").read_text() == "edited by hand\n"
    # stale files: only ours and unchanged go
    last = OutputFolder.open(tmp_path / "out")
    last.write_text(a, "fifth\n")
    user.write_text("edited\n")
    assert last.remove_stale() == ["c.md"]  # b.md (ours, then edited) stays
    assert user.read_text() == "edited\n" and not same.exists()
    record = json.loads((tmp_path / "out" / RECORD).read_text())["files"]
    assert "c.md" not in record and "a.md" in record


def test_full_disk_names_the_file_and_leaves_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = OutputFolder.open(tmp_path)
    path = folder.write_text(tmp_path / "x.md", "old\n")

    real_fdopen = os.fdopen

    class FullDisk:
        """A file on a full disk: opening works, writing fails (as on ext4 without space)."""

        def __init__(self, fd: int, mode: str = "r") -> None:
            self.file = real_fdopen(fd, mode)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(OSError) as exc:
        folder.write_text(path, "new, much longer\n" * 1000)
    monkeypatch.undo()
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(path)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([RECORD, "x.md"])  # no temp left


# --- plot: where it writes ------------------------------------------------------------------------
def test_plot_default_out_is_inside_the_run_and_never_a_users_folder(
    logs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "version_0"
    shutil.copytree(logs["bn"] / "version_0", run)
    # the user's own lightning-bn-plot/ (and figures/ beside the run) are never touched
    theirs = run / "lightning-bn-plot"
    theirs.mkdir()
    (theirs / "index.md").write_text("my notes\n")
    (theirs / "ics_cos.png").write_bytes(b"my picture")
    beside = tmp_path / "figures"
    beside.mkdir()
    (beside / "index.md").write_text("mine too\n")
    before = _snapshot(tmp_path)
    assert main(["plot", str(run)]) == 0
    out = run / "lightning-bn-plot-2"
    assert f"in {out}" in capsys.readouterr().out
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(k.startswith("version_0/lightning-bn-plot-2/") for k in set(after) - set(before))
    # `plot .` inside the log folder: inside it too, nothing outside
    with contextlib.chdir(run):
        assert main(["plot", "."]) == 0
    assert _snapshot(tmp_path) == after  # lightning-bn-plot-2 is ours: replaced, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "version_0"]


def test_plot_out_refuses_a_users_folder(
    logs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.md").write_text("my notes\n")
    err = _error(["plot", str(logs["plain"]), "--out", str(out)], capsys)
    assert f"--out {str(out)!r} holds files lightning-bn did not write (index.md)" in err
    assert "pass a new or empty folder" in err
    assert _snapshot(out) == {"index.md": b"my notes\n"}
    err = _error(["plot", str(logs["plain"]), "--out", ""], capsys)
    assert "--out" in err and "expected a folder path, got ''" in err
    # an empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(logs["plain"]), "--out", str(empty)]) == 0
    assert (empty / "index.md").is_file()


def test_two_runs_into_one_folder_leave_no_stale_figures(
    logs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "figs"
    assert main(["plot", str(logs["bn"]), "--out", str(out)]) == 0
    first = {p.name for p in out.glob("*.png")}
    # the standard network logs no noise and no BatchNorm-only keys: fewer figures
    assert main(["plot", str(logs["plain"]), "--out", str(out)]) == 0
    second = {p.name for p in out.glob("*.png")}
    assert second < first
    index = (out / "index.md").read_text()
    listed = {line.split("`")[1] for line in index.splitlines() if line.startswith("- [`")}
    assert listed == second
    not_drawn = index.split("Not drawn:")[1]
    assert all(name not in not_drawn for name in second)
    assert not list(out.glob("*.kept*"))
    # a figure edited by hand in between is kept, not removed as stale
    edited = out / sorted(second)[0]
    edited.write_bytes(b"annotated by hand")
    assert main(["plot", str(logs["plain"]), "--out", str(out)]) == 0
    kept = edited.with_name(f"{edited.stem}.kept.png")
    assert kept.read_bytes() == b"annotated by hand"
    assert "kept as" in capsys.readouterr().out


# --- the reproduce redraw -------------------------------------------------------------------------
def test_hand_edited_summary_is_kept(
    logs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    run = _reproduce_folder(tmp_path / "run", logs)
    redraw(run)
    summary = (run / "summary.md").read_text()
    (run / "summary.md").write_text(summary + "\nMy conclusions.\n")
    result = redraw(run)
    assert (run / "summary.kept.md").read_text() == summary + "\nMy conclusions.\n"
    assert (run / "summary.md").read_text() == summary
    assert any("summary.md" in n and "summary.kept.md" in n for n in result.notes)
    result = redraw(run)  # the fresh one is ours: no second copy
    assert not (run / "summary.kept-2.md").exists() and not result.notes


def test_full_disk_while_drawing_still_leaves_findings_and_summary(
    logs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = _reproduce_folder(tmp_path / "run", logs)
    redraw(run)  # the figures of an earlier redraw: a failed write must not cost them
    earlier = _snapshot(run / "figures")
    assert earlier
    real = _outputs._replace_atomically

    def disk_full_for_png(path: Path, data: bytes) -> None:
        if path.suffix == ".png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(_outputs, "_replace_atomically", disk_full_for_png)
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("figure not written: ")]
    assert lines and all(ln.endswith(".png: No space left on device") for ln in lines)
    assert all(str(run / "figures") in ln for ln in lines)
    data = json.loads((run / "findings.json").read_text())
    assert data["findings"]
    summary = (run / "summary.md").read_text()
    assert "## Findings" in summary or "Findings" in summary
    assert ".png" not in summary  # no link to a figure that was not written
    assert _snapshot(run / "figures") == earlier


def test_non_utf8_run_folder(
    logs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    run = _reproduce_folder(Path(os.fsdecode(bytes(tmp_path) + b"/r\xffn")), logs)
    result = redraw(run)
    data = json.loads((run / "findings.json").read_bytes().decode("utf-8"))
    assert data["findings"] and result.figures
    (run / "summary.md").read_bytes().decode("utf-8")  # valid UTF-8
    # plot on a folder with that name: labels drawn, PNGs written
    plain = Path(os.fsdecode(bytes(tmp_path) + b"/pl\xe9in"))
    shutil.copytree(logs["plain"], plain)
    assert main(["plot", str(plain)]) == 0
    assert len(list((plain / "lightning-bn-plot").glob("*.png"))) > 3


# --- plot: unreadable values ----------------------------------------------------------------------
def _rewrite(source: Path, target: Path, value: str) -> None:
    """``source`` with every diagnostic cell replaced by ``value``."""
    lines = source.read_text().splitlines()
    header = lines[0].split(",")
    rows = []
    for line in lines[1:]:
        cells = line.split(",")
        rows.append(
            ",".join(
                value if c and "/" in h and not h.startswith("train/") else c
                for h, c in zip(header, cells, strict=True)
            )
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join([lines[0], *rows]) + "\n")


def test_text_in_numeric_columns_and_huge_values(
    logs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = tmp_path / "text" / "metrics.csv"
    _rewrite(logs["plain"] / "metrics.csv", text, "n/a")
    err = _error(["plot", str(text)], capsys)
    assert str(text) in err and "holds text where numbers are expected" in err and "'n/a'" in err

    huge = tmp_path / "huge" / "metrics.csv"
    _rewrite(logs["plain"] / "metrics.csv", huge, "1e308")
    # the training loss stays finite and is drawn; every figure of 1e308 values is one line
    assert main(["plot", str(huge)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = [ln for ln in captured.out.splitlines() if "matplotlib cannot draw its values" in ln]
    assert lines and all(ln.split(":")[0].endswith(".png") for ln in lines)
    drawn = {p.name for p in (huge.parent / "lightning-bn-plot").glob("*.png")}
    assert drawn == {"train_loss.png"}
    index = (huge.parent / "lightning-bn-plot" / "index.md").read_text()
    assert all(f"- {ln}" in index for ln in lines)
    # nothing drawable at all: one line, exit 2
    _rewrite(logs["plain"] / "metrics.csv", huge, "1e308")
    lines_all = huge.read_text().replace("train/loss", "train/lossx")
    huge.write_text(lines_all)
    err = _error(["plot", str(huge)], capsys)
    assert "no figure could be drawn or written" in err


def test_plot_argument_messages(
    logs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = _reproduce_folder(tmp_path / "run", logs)
    with contextlib.chdir(run):
        err = _error(["plot", "nope"], capsys)
    assert "RUN 'nope': no such file or folder" in err and "--out" not in err
    err = _error(["plot", str(logs["plain"]), "--steps", "1.5:3"], capsys)
    assert "--steps" in err and "'1.5:3'" in err
    for bad in ("{", "[]", '{"plan": 3, "runs": []}'):
        (run / "run.json").write_text(bad)
        err = _error(["plot", str(run)], capsys)
        assert "run.json" in err and "is not a valid run description" in err


def test_run_left_running_by_a_killed_process(
    logs: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    run = _reproduce_folder(tmp_path / "run", logs, status="running")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    manifest = json.loads((run / "run.json").read_text())
    manifest |= {"pid": int(dead.stdout), "host": socket.gethostname(), "completed": []}
    (run / "run.json").write_text(json.dumps(manifest))
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert "interrupted (process gone)" in out
    assert f"process {int(dead.stdout)} has ended" in out
    err = _error(["reproduce", "dln", "--tiny", "--out", str(run)], capsys)
    assert "already holds a run (interrupted (process gone))" in err
    # a live process: still "running"
    manifest["pid"] = os.getpid()
    (run / "run.json").write_text(json.dumps(manifest))
    err = _error(["reproduce", "dln", "--tiny", "--out", str(run)], capsys)
    assert "already holds a run (running)" in err
