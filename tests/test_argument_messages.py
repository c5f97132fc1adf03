"""Arguments that used to be silently reinterpreted, or refused with a message from deep inside
torch or Python: each is refused with one message of ours that names the argument, the value and
what is allowed."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_bn import SyncNorm
from lightning_bn._validation import check_step_sizes
from lightning_bn.callbacks.hessian import HessianCallback
from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.layers import BatchNorm, L2Norm, LayerNorm
from lightning_bn.layers.sync import PortableSyncBatchNorm

CASES: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
    # a string, booleans and a dict used to become a grid of characters, ones and keys
    (LipschitzCallback, {"step_sizes": "123"}, TypeError, r"`step_sizes` .* but got '123'"),
    (LipschitzCallback, {"step_sizes": [True, True]}, TypeError, r"the entry True is not"),
    (SmoothnessCallback, {"step_sizes": {1.0: "a", 2.0: "b"}}, TypeError, r"`step_sizes`"),
    (SmoothnessCallback, {"step_sizes": {0.5, 1.0}}, TypeError, r"`step_sizes`"),
    (LipschitzCallback, {"step_sizes": [1.0, 1e300]}, ValueError, r"at most 1e\+06.*1e\+300"),
    (LipschitzCallback, {"step_sizes": [float("inf")]}, ValueError, r"not positive and finite"),
    (LipschitzCallback, {"step_sizes": 2.0}, TypeError, r"`step_sizes` .* but got 2.0"),
    # layers: 123 was "'int' object is not iterable", [] measured nothing with no word
    (ICSCallback, {"layers": 123}, TypeError, r"`layers` to be None, a module name .* got 123"),
    (ICSCallback, {"layers": []}, ValueError, r"`layers` .* got \[\] \(pass None for the default"),
    (ICSCallback, {"layers": [nn.Linear(2, 2)]}, TypeError, r"neither a name nor a torch.nn"),
    (HessianCallback, {"layers": 5}, TypeError, r"`layers` to be None, .* got 5"),
    (HessianCallback, {"layers": ()}, ValueError, r"`layers` .* got \(\)"),
    # layer constructors: torch's "Only Tensors of floating point ... can require gradients"
    (BatchNorm, {"num_features": 4, "dtype": torch.int64}, ValueError, r"`dtype` .* torch.int64"),
    (L2Norm, {"num_features": 4, "dtype": torch.complex64}, ValueError, r"`dtype` .*complex64"),
    (LayerNorm, {"num_features": 4, "dtype": torch.int32}, ValueError, r"`dtype` .* torch.int32"),
    (BatchNorm, {"num_features": 4, "dtype": "float32"}, TypeError, r"`dtype` .* 'float32'"),
    (PortableSyncBatchNorm, {"num_features": 0}, ValueError, r"`num_features` .* positive.*0"),
    (PortableSyncBatchNorm, {"num_features": 4, "eps": -1}, ValueError, r"`eps` .* >= 0.*-1"),
    (PortableSyncBatchNorm, {"num_features": 4, "momentum": 2}, ValueError, r"`momentum`.*2"),
    (PortableSyncBatchNorm, {"num_features": 4, "affine": "y"}, TypeError, r"`affine`.*'y'"),
    (PortableSyncBatchNorm, {"num_features": 4, "dtype": torch.int8}, ValueError, r"`dtype`"),
]


@pytest.mark.parametrize(
    ("target", "kwargs", "error", "match"),
    CASES,
    ids=[f"{t.__name__}-{'-'.join(k)}-{i}" for i, (t, k, _, _) in enumerate(CASES)],
)
def test_refused_with_our_message(
    target: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        target(**kwargs)
    assert "Expected argument `" in str(info.value)
    assert "\n" not in str(info.value)


def test_step_sizes_accept_sequences_and_numeric_scalars() -> None:
    assert check_step_sizes([1, 2.5]) == (1.0, 2.5)
    assert check_step_sizes(np.array([0.5, 1.0])) == (0.5, 1.0)
    assert check_step_sizes(torch.tensor([0.5, 2.0])) == (0.5, 2.0)
    assert check_step_sizes((np.float32(0.5), 1e6)) == (0.5, 1e6)
    assert check_step_sizes(None) is None


def test_layer_selection_accepts_one_name_or_type() -> None:
    assert ICSCallback(layers="net.0").layers == ["net.0"]
    assert ICSCallback(layers=nn.Linear).layers == [nn.Linear]
    assert HessianCallback(layers=("a.*", nn.Conv1d)).layers == ["a.*", nn.Conv1d]


@pytest.mark.parametrize("method", ["apply", "revert"])
def test_sync_norm_refuses_a_non_module(method: str) -> None:
    with pytest.raises(TypeError, match=re.escape(f"`model` of SyncNorm.{method}") + ".*'x'"):
        getattr(SyncNorm(), method)("x")


def test_float_dtypes_still_build() -> None:
    bn = BatchNorm(4, dtype=torch.float64)
    assert bn.weight is not None and bn.weight.dtype == torch.float64
    ref = nn.BatchNorm1d(4, dtype=torch.float64)
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(bn(x), ref(x))
    sync = PortableSyncBatchNorm(4, eps=1e-3, momentum=None, dtype=torch.float64)
    ref = nn.BatchNorm1d(4, eps=1e-3, momentum=None, dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)
