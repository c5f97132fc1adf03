"""The probes replay numpy's and Python's global random state as they do torch's: a training step
that draws a mixup coefficient from ``np.random`` and a crop from ``random`` trains to the same
weights with and without every diagnostic callback, and the probes see the step's own draws."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_bn.callbacks.hessian import HessianCallback
from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.probe import RNGState
from tests.support.models import Classifier, MemoryLogger, Recorder, fit, mlp


class MixupCrop(Classifier):
    """Mixup with λ ~ Beta(0.4, 0.4) from numpy, a random feature crop from Python's ``random``,
    dropout from torch: the step draws from all three global generators."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        lam = float(np.random.beta(0.4, 0.4))
        start = random.randint(0, 2)
        x = x.clone()
        x[:, :start] = 0.0  # a crop: zero the first `start` features
        perm = torch.arange(x.shape[0]).roll(1)
        mixed = lam * x + (1 - lam) * x[perm]
        logits = self(mixed)
        loss = lam * nn.functional.cross_entropy(logits, y)
        return loss + (1 - lam) * nn.functional.cross_entropy(logits, y[perm])


def _seeded_fit(callbacks: list[Any], logger: Any = False) -> tuple[Any, Any]:
    np.random.seed(3)
    random.seed(3)
    return fit(
        lambda: MixupCrop(mlp(dropout=0.2).double()), callbacks, steps=4, seed=1, logger=logger
    )


def test_numpy_and_python_draws_leave_training_unchanged() -> None:
    plain, _ = _seeded_fit([])
    np_after_plain, py_after_plain = np.random.get_state()[1].copy(), random.getstate()
    callbacks = [
        ICSCallback(every_n_steps=1),
        LipschitzCallback(every_n_steps=1),
        SmoothnessCallback(every_n_steps=1, max_iters=3),
        HessianCallback(every_n_steps=2, top_k=1, max_iters=5, density=False, trace=False),
    ]
    recorder, logger = Recorder(), MemoryLogger()
    observed, _ = _seeded_fit([recorder, *callbacks], logger=logger)
    for key, value in plain.state_dict().items():
        assert torch.equal(observed.state_dict()[key], value), key
    # the global generators end where the plain run left them
    assert np.array_equal(np.random.get_state()[1], np_after_plain)
    assert random.getstate() == py_after_plain
    # every measured step: the probe's L(W^t) is the step's own loss (same λ, crop and masks)
    assert [r["step"] for r in recorder.steps] == [0, 1, 2, 3]
    for record in recorder.steps:
        got = logger.history[record["step"]]["lipschitz/loss"]
        assert got == float(record["loss"]), record["step"]
    for cls in ("ics", "smoothness", "hessian"):
        assert any(k.startswith(cls + "/") for k in logger.history[0]), cls


def test_replay_restores_all_three_generators() -> None:
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    state = RNGState.capture()
    first = (torch.rand(2), np.random.rand(2), random.random())
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with state.replay():
        again = (torch.rand(2), np.random.rand(2), random.random())
        state.restore()
        twice = (torch.rand(2), np.random.rand(2), random.random())
    for a, b, c in zip(first, again, twice, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.array_equal(np.asarray(a), np.asarray(c))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
