"""The extra peak memory of one measurement, on the host and on CUDA.

Plain torch. :class:`PeakMemory` is a context manager around one measurement:

- **CUDA**: the peak of :func:`torch.cuda.max_memory_allocated` during the block minus what was
  allocated when it began (torch's peak counter is reset on entry; exact, for the current
  device);
- **host**: the resident set size (``/proc/self/statm``) sampled every ``interval`` seconds by a
  background thread, peak minus the value on entry. Sampled, so a spike shorter than the interval
  can be missed; torch's kernels release the GIL, so the sampler runs while they do. Where
  ``/proc`` is missing (not Linux) the host value is ``nan``.
"""

from __future__ import annotations

import math
import os
import threading
from types import TracebackType

import torch

__all__ = ["PeakMemory"]

_MB = 1024.0 * 1024.0


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Extra peak memory of the enclosed block: :attr:`host_mb` and :attr:`cuda_mb` (MiB).

    Args:
        device: the measurement's device; CUDA is measured only when it is a CUDA device.
        interval: seconds between two host samples.
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.002) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval = interval
        self.host_mb = math.nan
        self.cuda_mb = math.nan
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._cuda0 = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = _rss_bytes()
        if start is not None:
            self._host0 = self._peak = start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            end = _rss_bytes()
            peak = max(self._peak, end if end is not None else 0)
            self.host_mb = (peak - self._host0) / _MB
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_mb = (torch.cuda.max_memory_allocated(self.device) - self._cuda0) / _MB
