"""Ctrl-C (SIGINT) and SIGTERM during ``lightning-bn reproduce``.

The first signal raises :class:`RunInterrupted` in the main thread. It is not a
``KeyboardInterrupt`` on purpose: Lightning answers a ``KeyboardInterrupt`` inside
``Trainer.fit`` with ``sys.exit(1)``, while any other ``BaseException`` is torn down and re-raised,
so the runner gets to stop its worker processes and record ``"status": "interrupted"`` in
``run.json``. A second signal, while that cleanup runs, ends the process at once
(:func:`os._exit`) after the cleanup actions registered with :meth:`InterruptGuard.on_force`
(kill the workers, write ``run.json``).

Worker processes ignore SIGINT (the terminal sends Ctrl-C to the whole process group; the parent
decides) and exit at once on SIGTERM (:func:`worker_signals`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

__all__ = [
    "InterruptGuard",
    "RunInterrupted",
    "block_signals",
    "interrupt_guard",
    "process_gone",
    "worker_signals",
]

#: The signals that stop a reproduce run.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BaseException):
    """A reproduce run stopped by SIGINT or SIGTERM.

    Attributes:
        signum: the signal received first.
        out_dir: the run folder (``None`` when training had not started).
        completed: run ids (:meth:`~lightning_bn.reproduce.VariantSpec.run_id`) that finished.
        total: number of planned runs (0 when unknown).
    """

    def __init__(
        self,
        signum: int,
        out_dir: Path | None = None,
        completed: list[str] | None = None,
        total: int = 0,
    ) -> None:
        super().__init__(signum)
        self.signum = signum
        self.out_dir = out_dir
        self.completed = list(completed or [])
        self.total = total

    @property
    def signal_name(self) -> str:
        """``"SIGINT"`` or ``"SIGTERM"``."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum

    def message(self, out_dir: Path | None = None) -> str:
        """One line for the user: what finished and where the partial results are."""
        folder = self.out_dir or out_dir
        if folder is None:
            return f"interrupted ({self.signal_name}) before training started; nothing written"
        done = f"{len(self.completed)} of {self.total} runs finished; " if self.total else ""
        return (
            f"interrupted ({self.signal_name}); {done}partial results in {folder} "
            f"(`lightning-bn plot {folder}` draws the finished runs)"
        )

    def __str__(self) -> str:
        return self.message()


class InterruptGuard:
    """Signal handlers of a reproduce run; see the module docstring.

    Attributes:
        signum: the first signal received (``None`` until then).
        out_dir: the run folder, for the line a forced exit prints.
        completed: ids of the runs finished so far (kept up to date by the runner).
        total: number of planned runs.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.out_dir: Path | None = None
        self.completed: list[str] = []
        self.total = 0
        self._force: list[Callable[[], None]] = []

    def on_force(self, action: Callable[[], None]) -> Callable[[], None]:
        """Register ``action`` to run before a forced exit; returns a function removing it."""
        self._force.append(action)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._force.remove(action)

        return remove

    def handler(self, signum: int, frame: FrameType | None) -> None:
        """The handler of SIGINT and SIGTERM."""
        if self.signum is None:
            self.signum = signum
            raise RunInterrupted(signum, self.out_dir, self.completed, self.total)
        # second signal: the user does not want to wait for the cleanup
        for action in reversed(self._force):
            with contextlib.suppress(Exception):
                action()
        first = RunInterrupted(self.signum, self.out_dir, self.completed, self.total)
        line = f"{first.message()}; stopped at once (second {signal.Signals(signum).name})\n"
        with contextlib.suppress(OSError):
            os.write(sys.stderr.fileno(), line.encode(errors="replace"))
        os._exit(first.exit_code)


_ACTIVE: InterruptGuard | None = None


@contextlib.contextmanager
def interrupt_guard(*, until_exit: bool = False) -> Iterator[InterruptGuard]:
    """Install :class:`InterruptGuard`'s handler for SIGINT and SIGTERM while the block runs.

    Re-entrant: inside an active guard, the same guard is returned and nothing is installed. Off
    the main thread (where Python cannot install handlers) the guard is inactive.

    With ``until_exit`` (the process ends right after the block: the ``lightning-bn`` command),
    a block that was interrupted leaves SIGINT and SIGTERM ignored instead of restoring their
    handlers: the exit status is decided and the line printed, and a second Ctrl-C arriving
    while the interpreter shuts down would otherwise raise ``KeyboardInterrupt`` in its exit
    handlers and print a traceback.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    guard = InterruptGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _ACTIVE = guard
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, guard.handler)
        yield guard
    finally:
        _ACTIVE = None
        for sig, previous in saved.items():
            if until_exit and guard.signum is not None:
                signal.signal(sig, signal.SIG_IGN)
            elif previous is not None:
                signal.signal(sig, previous)


@contextlib.contextmanager
def block_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs (delivered when it ends).

    Processes started inside the block inherit the blocked mask, so a worker cannot be hit by
    Ctrl-C before :func:`worker_signals` has set it up (its start imports torch: seconds).
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    os._exit(128 + signum)


#: Seconds between two checks of the worker watchdog that its parent is alive.
WATCHDOG_EVERY = 1.0


def _die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` ends, even by SIGKILL (no cleanup can run there).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, the kernel's own death signal. Everywhere, also
    a daemon thread that polls the parent's pid every :data:`WATCHDOG_EVERY` seconds and exits
    once this process has been re-parented (to init or a subreaper).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1  # <linux/prctl.h>
            libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent ended before the death signal was set
        os._exit(128 + int(signal.SIGKILL))

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(WATCHDOG_EVERY)
        os._exit(128 + int(signal.SIGKILL))

    threading.Thread(target=watch, name="lightning-bn-parent-watchdog", daemon=True).start()


def worker_signals(parent_pid: int | None = None) -> None:
    """Initializer of the worker processes: ignore SIGINT, exit at once on SIGTERM, and end
    with the parent process ``parent_pid`` (see :func:`_die_with_parent`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if parent_pid is not None:
        _die_with_parent(parent_pid)


def process_gone(manifest: dict[str, object]) -> str | None:
    """One line when ``run.json`` says ``"running"`` but the process that wrote it is gone (a
    run killed by SIGKILL, a power cut), else ``None``.

    The process is looked up by the ``"pid"`` and ``"host"`` that ``run.json`` records; on
    another host, or without them (an older run), it cannot be told and ``None`` is returned.
    """
    if manifest.get("status") != "running":
        return None
    pid, host = manifest.get("pid"), manifest.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        done = manifest.get("completed")
        count = len(done) if isinstance(done, list) else 0
        return (
            f"run.json: interrupted (process gone): status 'running' but process {pid} has "
            f"ended; {count} run(s) had finished"
        )
    except OSError:  # PermissionError: alive, another user's
        return None
    return None
