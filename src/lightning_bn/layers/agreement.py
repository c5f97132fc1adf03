"""Agreement on failure between processes inside a guarded diagnostic stage. Plain torch.

A diagnostic stage (one probe pass) runs locally on every rank and then agrees on success
(:meth:`lightning_bn.probe.Collective.guard`). A synchronised normalisation layer adds collectives
*inside* the stage, so a rank whose pass fails before one of them would leave the others waiting
there (or pair their collective with a different one: a gloo "collective mismatch"). Inside a
guarded stage each such collective is therefore preceded by a one-element all-reduce of a failure
flag, the same one the guard sends when its stage failed: every rank reaches it, a rank that
failed sends 1, and when the sum is positive every rank leaves the stage together
(:class:`PeerFailed`) and skips the measurement. Outside a guarded stage (training) nothing is
added.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["GuardedStage", "PeerFailed", "check_peers", "exchange_failure", "guarded"]


class PeerFailed(BaseException):
    """Another rank's diagnostic pass failed: this rank leaves the stage before the next collective.

    A ``BaseException``, so that code inside the stage that catches ``Exception`` (a fallback from a
    batched to a sequential evaluation) does not swallow it and run into collectives alone.
    """


@dataclass
class GuardedStage:
    """The stage in progress: its process group and whether the failure flags were exchanged."""

    group: Any
    exchanged: int | None = None  # the number of failed ranks, once a flag exchange saw failures


_STAGE: contextvars.ContextVar[GuardedStage | None] = contextvars.ContextVar(
    "lightning_bn_guarded_stage", default=None
)


@contextlib.contextmanager
def guarded(group: Any) -> Iterator[GuardedStage]:
    """Run the block as a guarded stage over ``group`` (``None``: the default group)."""
    stage = GuardedStage(group)
    token = _STAGE.set(stage)
    try:
        yield stage
    finally:
        _STAGE.reset(token)


def exchange_failure(failed: bool, group: Any, device: torch.device) -> int:
    """All-reduce this rank's failure flag; the number of ranks that failed."""
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=group)
    return int(flag.item())


def _same_group(a: Any, b: Any) -> bool:
    world = dist.group.WORLD
    return (a if a is not None else world) is (b if b is not None else world)


def check_peers(group: Any, like: torch.Tensor) -> None:
    """Before a collective over ``group`` inside a guarded stage over the same group: agree that
    no rank failed so far (a no-op outside one).

    Raises:
        PeerFailed: another rank's pass failed; its failure flag was received here.
    """
    stage = _STAGE.get()
    if stage is None or not _same_group(stage.group, group):
        return
    failed = exchange_failure(False, group, like.device)
    if failed:
        stage.exchanged = failed
        raise PeerFailed(f"a diagnostic pass failed on {failed} other rank(s)")
