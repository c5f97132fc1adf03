"""An optimiser at learning rate 0 (the start of a warm-up): the grid relative to it is the current
weights only, so the loss range and β_eff are not logged there (instead of 0 and NaN presented as
measurements), one warning says so, and every other value is logged as usual."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.errors import DiagnosticWarning
from tests.support.models import Classifier, MemoryLogger, fit, mlp


class WarmUp(Classifier):
    """SGD whose learning rate is 0 at steps 0 and 1, then 0.05 (a warm-up that starts at 0)."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step < 2 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_zero_learning_rate_is_not_a_measurement() -> None:
    logger = MemoryLogger()
    callbacks = [LipschitzCallback(every_n_steps=1), SmoothnessCallback(every_n_steps=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(lambda: WarmUp(mlp().double()), callbacks, steps=4, logger=logger)
    said = [
        w for w in caught if issubclass(w.category, DiagnosticWarning) and "is 0" in str(w.message)
    ]
    assert len(said) == 2, [str(w.message) for w in said]  # one per callback, not one per step
    assert "LipschitzCallback" in str(said[0].message) and "lipschitz/loss_range" in str(
        said[0].message
    )
    assert "SmoothnessCallback" in str(said[1].message) and "smoothness/beta_eff" in str(
        said[1].message
    )
    for step in (0, 1):
        got = logger.history[step]
        for key in ("lipschitz/loss_range", "lipschitz/loss_min", "smoothness/beta_eff"):
            assert key not in got, (step, key)
        assert got["lipschitz/grad_norm"] > 0
        assert math.isfinite(got["smoothness/hessian_top_eig"])
    for step in (2, 3):
        got = logger.history[step]
        assert got["lipschitz/loss_range"] > 0
        assert math.isfinite(got["smoothness/beta_eff"]) and got["smoothness/beta_eff"] > 0
    assert all(math.isfinite(v) for values in logger.history.values() for v in values.values())
