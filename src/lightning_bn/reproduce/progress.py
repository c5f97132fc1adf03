"""The overall progress of ``lightning-bn reproduce``: runs done / total and the time left.

On a terminal, one line at the bottom redrawn in place (``\\r``); elsewhere (a log file, a pipe)
a plain line every ``every`` seconds. The line per finished run goes through
:meth:`ProgressDisplay.line`, which clears the bar before and redraws it after.

The time left is ``elapsed / done × (total − done)``, where ``done`` counts the finished runs and
the finished share of the run in progress when it is known (``--jobs 1``): runs of one plan take
similar times, and with ``jobs`` runs at a time the rate already holds the parallelism.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressDisplay", "format_duration"]

#: Seconds between two redraws of the bar on a terminal.
REDRAW_EVERY = 0.5
#: Seconds between two progress lines when the output is not a terminal.
LINE_EVERY = 30.0
_BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss`` (seconds rounded up: a run never shows ``0:00`` left early)."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressDisplay:
    """Runs done / total, elapsed time and time left of a plan.

    Args:
        total: number of runs.
        stream: where the bar or the progress lines go (default ``sys.stdout``).
        echo: where the line per finished run goes (default: ``print`` to ``stream``).
        enabled: ``False`` prints the lines per run only.
        tty: draw a bar redrawn in place (default: ``stream.isatty()``).
        every: seconds between two progress lines when not drawing a bar.
        clock: a monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        echo: Callable[[str], None] | None = None,
        enabled: bool = True,
        tty: bool | None = None,
        every: float = LINE_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self._echo = echo
        self.enabled = enabled
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if tty is None and callable(isatty) else bool(tty)
        self.every = every
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.fraction = 0.0  # finished share of the run in progress (--jobs 1)
        self._last = self.start
        self._drawn = False

    # --- numbers ---------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds since the display was created."""
        return self.clock() - self.start

    def time_left(self) -> float | None:
        """Estimated seconds left, ``None`` before any progress."""
        progress = self.done + min(max(self.fraction, 0.0), 1.0)
        if progress <= 0:
            return None
        return self.elapsed() / progress * max(0.0, self.total - progress)

    def status(self) -> str:
        """``7/26 runs done (27%), 0:42 elapsed, about 1:50 left``."""
        left = self.time_left()
        share = self.done / self.total if self.total else 1.0
        eta = "time left unknown" if left is None else f"about {format_duration(left)} left"
        return (
            f"{self.done}/{self.total} runs done ({share:.0%}), "
            f"{format_duration(self.elapsed())} elapsed, {eta}"
        )

    # --- output ----------------------------------------------------------------------------------
    def _bar(self) -> str:
        progress = (self.done + min(max(self.fraction, 0.0), 1.0)) / max(1, self.total)
        filled = round(_BAR_WIDTH * progress)
        text = f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {self.status()}"
        width = shutil.get_terminal_size((100, 24)).columns
        return text[: max(1, width - 1)]  # a wrapped line cannot be redrawn with \r

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False

    def _draw(self) -> None:
        self.stream.write("\r\x1b[K" + self._bar())
        self.stream.flush()
        self._drawn = True
        self._last = self.clock()

    def line(self, text: str) -> None:
        """Print a line (a finished run), keeping the bar below it."""
        if self.enabled and self.tty:
            self._clear()
            self.stream.flush()
        if self._echo is not None:
            self._echo(text)
        else:
            print(text, file=self.stream, flush=True)
        if self.enabled and self.tty:
            self._draw()

    def run_done(self, text: str) -> None:
        """One more run finished: count it and print its line."""
        self.done += 1
        self.fraction = 0.0
        self.line(text)

    def tick(self, fraction: float | None = None) -> None:
        """Redraw the bar (at most every :data:`REDRAW_EVERY` seconds) or print a progress line
        (every ``every`` seconds); ``fraction`` is the finished share of the run in progress."""
        if fraction is not None:
            self.fraction = fraction
        if not self.enabled:
            return
        since = self.clock() - self._last
        if self.tty:
            if since >= REDRAW_EVERY or not self._drawn:
                self._draw()
        elif since >= self.every:
            self._last = self.clock()
            print(f"progress: {self.status()}", file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar's line (the next output starts on a line of its own)."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
