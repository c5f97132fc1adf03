"""A torch.compile'd submodule: the diagnostic callbacks say at setup, in one line, that they do not
support it and what to do instead (it used to fail at every step with "donated buffers")."""

from __future__ import annotations

import pytest
import torch

from lightning_bn.callbacks.hessian import HessianCallback
from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from tests.support.models import Classifier, fit, mlp


@pytest.mark.parametrize(
    "callback", [ICSCallback, LipschitzCallback, SmoothnessCallback, HessianCallback]
)
def test_compiled_submodule_is_refused_at_setup(callback: type) -> None:
    def make() -> Classifier:
        net = mlp().double()
        net[4] = torch.compile(net[4])  # compiling is lazy: nothing is traced before a call
        return Classifier(net)

    with pytest.raises(NotImplementedError, match=r"torch.compile'd submodules \(net\.4\)") as info:
        fit(make, [callback(every_n_steps=1)], steps=1)
    assert "\n" not in str(info.value)
    assert "Measure an uncompiled model" in str(info.value)
