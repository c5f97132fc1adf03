"""CUDA checks: skipped where no GPU is present (the rest of the suite covers the CPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_bn import ICSCallback, LipschitzCallback, SmoothnessCallback
from tests.support.models import Classifier, MemoryLogger, Recorder, fit, mlp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _callbacks() -> list[Any]:
    return [
        ICSCallback(every_n_steps=1),
        LipschitzCallback(every_n_steps=1),
        SmoothnessCallback(every_n_steps=2, max_iters=10, tol=1e-6),
    ]


def test_cuda_values_equal_cpu_values() -> None:
    """The same float64 run on the GPU and on the CPU logs the same diagnostics."""
    logs = {}
    for accelerator in ("cpu", "cuda"):
        logger = MemoryLogger()
        fit(
            lambda: Classifier(mlp(dropout=0.0).double()),
            _callbacks(),
            steps=3,
            logger=logger,
            accelerator=accelerator,
        )
        logs[accelerator] = logger.history
    assert logs["cpu"].keys() == logs["cuda"].keys()
    for step, values in logs["cpu"].items():
        for key, value in values.items():
            assert logs["cuda"][step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)


def test_bf16_mixed_probe_sees_the_training_precision() -> None:
    """Under bf16-mixed the probe's loss at W^t is the real step's loss (same autocast)."""
    recorder, logger = Recorder(), MemoryLogger()
    fit(
        lambda: Classifier(mlp(dropout=0.3).float()),
        [recorder, *_callbacks()],
        steps=3,
        logger=logger,
        accelerator="cuda",
        precision="bf16-mixed",
        dtype=torch.float32,
    )
    for record in recorder.steps:
        got = logger.history[record["step"]]["lipschitz/loss"]
        assert got == pytest.approx(float(record["loss"]), rel=1e-6)
        assert all(v == v for v in logger.history[record["step"]].values())  # no NaN


def test_cuda_memory_back_to_its_value_after_every_measurement() -> None:
    """Nothing a measurement allocates outlives it (issue 14): ``memory_allocated`` after each
    measurement equals its value before. The first measurement of each callback is left out: it
    may create cuBLAS workspaces, and Smoothness keeps its warm-start eigenvector, which later
    measurements replace by one of the same size."""
    callbacks = _callbacks()
    seen: dict[str, list[tuple[int, int]]] = {}
    for cb in callbacks:
        measure = cb._measure

        def wrapped(trainer: Any, module: Any, _measure: Any = measure, _cb: Any = cb) -> None:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            _measure(trainer, module)
            torch.cuda.synchronize()
            seen.setdefault(type(_cb).__name__, []).append((before, torch.cuda.memory_allocated()))

        cb._measure = wrapped  # type: ignore[method-assign]
    fit(
        lambda: Classifier(mlp(width=256, dropout=0.2)),
        callbacks,
        steps=8,
        logger=MemoryLogger(),
        accelerator="cuda",
        dtype=torch.float32,
    )
    assert set(seen) == {"ICSCallback", "LipschitzCallback", "SmoothnessCallback"}
    for name, pairs in seen.items():
        assert len(pairs) >= 4, name
        assert [after - before for before, after in pairs[1:]] == [0] * (len(pairs) - 1), name
