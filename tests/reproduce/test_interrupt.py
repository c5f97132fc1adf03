"""Ctrl-C (SIGINT) and SIGTERM sent to a real `lightning-bn reproduce`, and its progress display.

Each interrupt test starts the command in a subprocess on a tiny deep-linear plan, waits for
the line of its first finished run, then signals it and checks the exit code, the one line on
stderr, ``run.json`` (status, completed runs, against the CSV files written) and that no process
it started is left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lightning_bn.cli import main
from lightning_bn.logging.csv_log import TruncatedLogError
from lightning_bn.reproduce import load_run
from lightning_bn.reproduce.history import read_metrics_csv
from lightning_bn.reproduce.progress import ProgressDisplay, format_duration

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

#: Six runs (two variants × three seeds) long enough that the signal lands while they train.
PLAN = ["reproduce", "dln", "--tiny", "--steps", "300", "--seeds", "3", "--wandb", "off"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(WANDB_MODE="disabled", WANDB_DIR=str(tmp_path), PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _interrupt(
    tmp_path: Path,
    jobs: int,
    signals: list[int],
    extra: list[str] | None = None,
    command: list[str] | None = None,
) -> tuple[int, list[str], str, Path, set[int]]:
    """Run the plan (with ``command``, default ``python -m lightning_bn.cli``), send ``signals``
    after the first finished run; return the exit code, the stdout lines, stderr, the run folder
    and the processes the command had started."""
    out = tmp_path / "run"
    args = [*PLAN, "--jobs", str(jobs), "--out", str(out), *(extra or [])]
    proc = subprocess.Popen(
        [*(command or [sys.executable, "-m", "lightning_bn.cli"]), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
    )
    lines: list[str] = []
    workers: set[int] = set()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            workers |= _descendants(proc.pid)
            if line.startswith("[1/"):
                break
        else:
            pytest.fail(f"no run finished: {lines} {proc.stderr.read() if proc.stderr else ''}")
        workers |= _descendants(proc.pid)
        for sig in signals:
            os.kill(proc.pid, sig)
            time.sleep(0.05)
        rest, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, lines + rest.splitlines(), stderr, out, workers


def _check_interrupted(out: Path, stdout: list[str], stderr: str, signame: str) -> list[str]:
    """run.json against what the command printed and the CSV files; returns the completed ids."""
    assert [ln for ln in stderr.splitlines() if ln.strip()] == [stderr.strip()], stderr
    assert str(out) in stderr and signame in stderr and "Traceback" not in stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["signal"] == signame
    completed = manifest["completed"]
    all_ids = [r["id"] for r in manifest["runs"]]
    assert len(all_ids) == 6
    # one line per finished run: exactly the runs listed as completed, fewer than planned
    finished = [ln for ln in stdout if ln.startswith("[")]
    assert len(finished) == len(completed) and 1 <= len(completed) < len(all_ids)
    assert f"{len(completed)} of 6 runs finished" in stderr
    assert set(completed) <= set(all_ids)
    for run_id in completed:  # a completed run logged its final metrics
        assert "final/steps" in read_metrics_csv(out / "csv" / run_id / "metrics.csv")
    run = load_run(out)
    # a run whose final metrics were written as the signal came in is complete on disk too
    assert set(completed) <= set(run.histories) < set(all_ids)
    assert set(run.incomplete) == set(all_ids) - set(run.histories)
    for run_id in run.incomplete:  # an interrupted run never logged its final metrics
        csv = out / "csv" / run_id / "metrics.csv"
        if csv.is_file():
            with contextlib.suppress(TruncatedLogError):  # killed while writing
                assert "final/steps" not in read_metrics_csv(csv)
    return list(completed)


def _no_leftovers(workers: set[int]) -> None:
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)], "processes left behind"


def test_sigint_stops_the_worker_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr, out, workers = _interrupt(
        tmp_path, jobs=2, signals=[signal.SIGINT], extra=["--progress-every", "0.5"]
    )
    assert code == 130, stderr
    assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
    _check_interrupted(out, stdout, stderr, "SIGINT")
    _no_leftovers(workers)
    # the progress lines off a terminal: runs done / total
    progress = [ln for ln in stdout if ln.startswith("progress: ")]
    assert progress and all("/6 runs done" in ln for ln in progress)
    # `lightning-bn plot` draws the finished runs and names the others incomplete
    assert main(["plot", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": incomplete") == len(load_run(out).incomplete) > 0


def test_sigkill_of_the_main_process_ends_its_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # SIGKILL runs no cleanup: the workers end by their death signal (Linux) or their watchdog
    code, _, _, out, workers = _interrupt(tmp_path, jobs=2, signals=[signal.SIGKILL])
    assert code == -signal.SIGKILL
    assert len(workers) >= 2
    deadline = time.monotonic() + 30  # a limit for a loaded machine, not a timing claim
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "workers left training under init"
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "running"  # nobody could record the end
    assert main(["plot", str(out)]) == 0
    assert "interrupted (process gone)" in capsys.readouterr().out


def test_sigterm_in_process(tmp_path: Path) -> None:
    code, stdout, stderr, out, workers = _interrupt(
        tmp_path, jobs=1, signals=[signal.SIGTERM], extra=["--no-progress"]
    )
    assert code == 143, stderr
    _check_interrupted(out, stdout, stderr, "SIGTERM")
    assert not [ln for ln in stdout if ln.startswith("progress")]  # --no-progress
    _no_leftovers(workers)


def test_second_sigint(tmp_path: Path) -> None:
    code, stdout, stderr, out, workers = _interrupt(
        tmp_path, jobs=2, signals=[signal.SIGINT, signal.SIGINT]
    )
    assert code == 130, stderr
    _check_interrupted(out, stdout, stderr, "SIGINT")
    _no_leftovers(workers)


def test_a_late_second_sigint_while_the_command_exits_prints_no_traceback(tmp_path: Path) -> None:
    """The second Ctrl-C arrives after the interruption's line is printed, as the interpreter
    shuts down (the command's cleanup was quicker than the user): it is ignored, the exit code
    and the one line stand."""
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from lightning_bn.cli import main
        code = main()
        os.kill(os.getpid(), signal.SIGINT)  # the late second Ctrl-C
        time.sleep(0.5)
        sys.exit(code)
        """
    )
    code, stdout, stderr, out, workers = _interrupt(
        tmp_path, jobs=1, signals=[signal.SIGINT], command=[sys.executable, "-c", script]
    )
    assert code == 130, stderr
    _check_interrupted(out, stdout, stderr, "SIGINT")
    _no_leftovers(workers)


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    """The guard alone: the second signal, during a cleanup that would never end, runs the
    forced-exit actions, prints one line and ends the process with 128 + the first signal."""
    marker = tmp_path / "forced"
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from pathlib import Path
        from lightning_bn.reproduce.interrupt import RunInterrupted, interrupt_guard

        with interrupt_guard() as guard:
            guard.out_dir = Path({str(tmp_path)!r})
            guard.on_force(lambda: Path({str(marker)!r}).write_text("killed"))
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)
            except RunInterrupted as stop:
                print("first", stop.signal_name, stop.exit_code, flush=True)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(60)  # a cleanup that never ends
        print("not reached")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=120,
    )
    assert done.returncode == 143
    assert done.stdout.splitlines() == ["first SIGTERM 143"]
    assert marker.read_text() == "killed"
    assert done.stderr.strip().splitlines() == [
        f"interrupted (SIGTERM); partial results in {tmp_path} (`lightning-bn plot {tmp_path}` "
        "draws the finished runs); stopped at once (second SIGINT)"
    ]


# --- the progress display --------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_off_a_terminal() -> None:
    clock, stream = _Clock(), io.StringIO()
    display = ProgressDisplay(8, stream=stream, tty=False, every=10.0, clock=clock)
    display.tick()  # nothing before `every` seconds
    clock.now += 12.0
    display.tick()
    display.run_done("[1/8] a")
    clock.now += 8.0  # 20 s for 2 runs: 10 s per run, 6 runs left
    display.run_done("[2/8] b")
    display.tick()  # 8 s since the last line: none
    clock.now += 2.5
    display.tick()
    assert stream.getvalue().splitlines() == [
        "progress: 0/8 runs done (0%), 0:12 elapsed, time left unknown",
        "[1/8] a",
        "[2/8] b",
        # 22.5 s for 2 runs, 6 left: 67.5 s
        "progress: 2/8 runs done (25%), 0:23 elapsed, about 1:08 left",
    ]


def test_progress_bar_on_a_terminal() -> None:
    clock, stream = _Clock(), io.StringIO()
    display = ProgressDisplay(4, stream=stream, tty=True, clock=clock)
    clock.now += 30.0
    display.tick(0.5)  # half of the first run in 30 s: 3.5 runs left take 210 s
    assert stream.getvalue() == (
        "\r\x1b[K[###.....................] 0/4 runs done (0%), 0:30 elapsed, about 3:30 left"
    )
    display.run_done("[1/4] a")  # the bar is cleared, the line printed, the bar drawn below
    display.close()
    assert stream.getvalue().endswith(
        "\r\x1b[K[1/4] a\n\r\x1b[K[######..................] 1/4 runs done (25%), "
        "0:30 elapsed, about 1:30 left\n"
    )


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 0.2, 59, 61, 3599.5, 3600, 7322)] == [
        "0:00",
        "0:01",
        "0:59",
        "1:01",
        "1:00:00",
        "1:00:00",
        "2:02:02",
    ]


def test_verbose_is_accepted_and_progress_lines_count_runs(tmp_path: Path) -> None:
    """--verbose (Lightning's bars) with the overall progress as lines; --jobs 1, in process."""
    stdout = io.StringIO()
    out = tmp_path / "run"
    args = ["reproduce", "dln", "--tiny", "--steps", "4", "--seeds", "1", "--wandb", "off"]
    args += ["--jobs", "1", "--verbose", "--progress-every", "0", "--out", str(out)]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["completed"] == [r["id"] for r in manifest["runs"]]
    lines = stdout.getvalue().splitlines()
    assert "progress: 0/2 runs done (0%)" in lines[1]  # before the first run
    assert lines[-1].startswith("total time:")
    # between the runs and after the last, never inside Lightning's bar
    progress = [ln for ln in lines if "progress:" in ln]
    assert [ln.split(" runs done")[0] for ln in progress] == [
        "progress: 0/2",
        "progress: 1/2",
        "progress: 2/2",
    ]
    assert all(ln.startswith("progress: ") for ln in progress)
