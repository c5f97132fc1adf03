from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_bn import BatchNorm, L1Norm, L2Norm, LayerNorm, LinfNorm, create_norm_layer


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("batchnorm", BatchNorm),
        ("l1", L1Norm),
        ("l2", L2Norm),
        ("linf", LinfNorm),
        ("layernorm", LayerNorm),
        ("none", nn.Identity),
        ("BatchNorm", BatchNorm),
        (nn.BatchNorm1d, nn.BatchNorm1d),
    ],
)
def test_create(kind: str | type, cls: type) -> None:
    layer = create_norm_layer(kind, 6)
    assert type(layer) is cls
    x = torch.randn(4, 6)
    assert layer(x).shape == x.shape


def test_kwargs_forwarded() -> None:
    layer = create_norm_layer("linf", 3, eps=1e-3, momentum=None, affine=False)
    assert isinstance(layer, LinfNorm)
    assert (layer.eps, layer.momentum, layer.affine, layer.p) == (1e-3, None, False, math.inf)


def test_unknown_kind_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="'batchnorm', 'l1', 'l2', 'linf', 'layernorm', 'none'"):
        create_norm_layer("groupnorm", 4)
    with pytest.raises(TypeError, match="Expected argument `kind`"):
        create_norm_layer(3, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["batchnorm", "l1", "l2", "linf", "layernorm"])
def test_common_signature(kind: str) -> None:
    """Every layer takes the same keyword arguments, so any one replaces any other."""
    layer = create_norm_layer(
        kind,
        5,
        eps=1e-4,
        momentum=0.2,
        affine=True,
        track_running_stats=True,
        device="cpu",
        dtype=torch.float64,
    )
    assert layer.weight.dtype == torch.float64
    assert layer.weight.shape == (5,)
