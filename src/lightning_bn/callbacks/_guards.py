"""Checks of the diagnostic callbacks that keep a value from passing for a measurement: a model the
probes cannot evaluate (a ``torch.compile``'d submodule), a step-size grid that does not move."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_bn.errors import DiagnosticWarning

__all__ = ["drop_empty_grid", "refuse_compiled_submodules"]


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    dynamo = getattr(torch, "_dynamo", None)
    wrapper = getattr(getattr(dynamo, "eval_frame", None), "OptimizedModule", None)
    return wrapper is not None and isinstance(module, wrapper)


def refuse_compiled_submodules(name: str, module: nn.Module) -> None:
    """Refuse a model with a ``torch.compile``'d submodule, in one line.

    Raises:
        NotImplementedError: ``module`` holds an ``OptimizedModule``.
    """
    compiled = [n or "the module" for n, m in module.named_modules() if _is_compiled(m)]
    if compiled:
        raise NotImplementedError(
            f"{name} does not support torch.compile'd submodules ({', '.join(compiled[:3])}):"
            " its probes evaluate the model at other parameter values and differentiate"
            " twice, which a compiled graph refuses (donated buffers) or recompiles for at"
            " every point. Measure an uncompiled model (remove torch.compile from the modules"
            " for the runs you measure)"
        )


def drop_empty_grid(
    owner: Any,
    metrics: dict[str, float],
    steps: list[float],
    scales: Mapping[str, float] | None,
    keys: tuple[str, ...],
    step: int,
    warned: bool,
) -> tuple[dict[str, float], bool]:
    """``metrics`` without the step-size grid's ``keys`` when every point of the grid is the
    current weights (every learning rate is 0, as at the start of a warm-up, with relative step
    sizes): a loss range of 0 and a NaN effective smoothness there would read as measurements.
    Unless ``warned``, one warning says so. Returns the metrics and whether it has been said.
    """
    moves = any(s != 0 for s in steps) and (scales is None or any(v != 0 for v in scales.values()))
    if moves:
        return metrics, warned
    if not warned:
        names = ", ".join(f"{owner.key_prefix}/{k}" for k in keys)
        warnings.warn(
            f"{type(owner).__name__}: every optimiser learning rate is 0 at step {step} (a"
            " warm-up start?), so every step size relative to it is 0 and the grid is the"
            f" current weights only; {names} are not logged at such steps (the other values"
            " are). Pass `relative_to_lr=False` with absolute `step_sizes` to measure there.",
            DiagnosticWarning,
            stacklevel=4,
        )
    return {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] not in keys}, True
