"""A run interrupted and resumed from its checkpoint logs what the uninterrupted run logs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_bn import ICSCallback, LipschitzCallback, NoiseInjectionCallback, SmoothnessCallback
from tests.support.models import Classifier, MemoryLogger, loader, mlp, trainer


def _callbacks() -> list[Any]:
    return [
        ICSCallback(every_n_steps=2),
        LipschitzCallback(every_n_steps=2),
        # a loose tolerance: the iterations (and the value) depend on the warm start
        SmoothnessCallback(every_n_steps=3, max_iters=30, tol=1e-4),
        NoiseInjectionCallback(log_every_n_steps=2),
    ]


def _make() -> Classifier:
    return Classifier(mlp(dropout=0.0).double(), optimizer="adam", lr=0.01)


def _fit(
    epochs: int, logger: MemoryLogger, ckpt_path: Path | None = None, save: Path | None = None
) -> list[Any]:
    """Whole epochs of 4 batches: Lightning resumes an epoch boundary exactly (a mid-epoch
    checkpoint restarts the epoch's data, which would change training itself)."""
    pl.seed_everything(0, verbose=False)
    callbacks = _callbacks()
    t = trainer(callbacks, -1, logger=logger, log_every_n_steps=1, max_epochs=epochs)
    t.fit(_make(), loader(n=128, batch_size=32), ckpt_path=ckpt_path)  # 4 batches per epoch
    if save is not None:
        t.save_checkpoint(save)
    return callbacks


def test_resume_logs_the_same_measurements(tmp_path: Path) -> None:
    full = MemoryLogger()
    full_callbacks = _fit(2, full)
    first, second = MemoryLogger(), MemoryLogger()
    _fit(1, first, save=tmp_path / "epoch0.ckpt")
    resumed_callbacks = _fit(2, second, ckpt_path=tmp_path / "epoch0.ckpt")

    def diagnostic_calls(logger: MemoryLogger) -> list[tuple[int, str, float]]:
        return [
            (int(step or 0), key, value)
            for step, metrics in logger.calls
            for key, value in metrics.items()
            if key.split("/")[0] in {"ics", "lipschitz", "smoothness", "noise"}
        ]

    expected = diagnostic_calls(full)
    got = diagnostic_calls(first) + diagnostic_calls(second)
    # no measurement missing or doubled
    assert Counter((s, k) for s, k, _ in got) == Counter((s, k) for s, k, _ in expected)
    assert {s for s, k, _ in got if k == "smoothness/beta_eff"} == {0, 3, 6}
    by_key = {(s, k): v for s, k, v in expected}
    for step, key, value in got:
        assert value == pytest.approx(by_key[(step, key)], rel=1e-9, abs=1e-12), (step, key)
    # the warm-start eigenvector came through the checkpoint
    smooth_full, smooth_resumed = full_callbacks[2], resumed_callbacks[2]
    assert smooth_resumed.measured_steps == [0, 3, 6] == smooth_full.measured_steps
    for k, v in smooth_full.eigenvector.items():
        torch.testing.assert_close(smooth_resumed.eigenvector[k], v)


def test_state_dicts_roundtrip() -> None:
    logger = MemoryLogger()
    callbacks = _fit(1, logger)
    for cb in callbacks:
        state = cb.state_dict()
        fresh = type(cb)()
        fresh.load_state_dict(state)
        again = fresh.state_dict()
        assert again.keys() == state.keys()
        for key in state:
            if isinstance(state[key], torch.Tensor):
                assert torch.equal(again[key], state[key])
