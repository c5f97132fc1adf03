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


def test_norm_type_registry() -> None:
    from lightning_bn.callbacks import DEFAULT_NOISE_TARGETS
    from lightning_bn.diagnostics.landscape import NORM_LAYER_TYPES
    from lightning_bn.layers import (
        BATCH_STAT_NORM_TYPES,
        NORM_TYPES,
        SWAPPABLE_NORM_TYPES,
        LpNorm,
        is_batch_stat_norm,
        is_batchnorm,
        is_norm_layer,
    )
    from lightning_bn.layers.convert import SWAPPABLE_TYPES

    # the three 0.1.0 lists are the registry's
    assert DEFAULT_NOISE_TARGETS is NORM_TYPES and NORM_LAYER_TYPES is NORM_TYPES
    assert SWAPPABLE_TYPES is SWAPPABLE_NORM_TYPES
    assert set(BATCH_STAT_NORM_TYPES) < set(SWAPPABLE_NORM_TYPES) < set(NORM_TYPES)
    cases: list[tuple[nn.Module, bool, bool, bool]] = [  # (module, norm, batch stats, BatchNorm)
        (nn.BatchNorm2d(3), True, True, True),
        (nn.SyncBatchNorm(3), True, True, True),
        (BatchNorm(3), True, True, True),
        (LpNorm(3, p=1), True, True, False),
        (L2Norm(3), True, True, False),
        (LayerNorm(3), True, False, False),
        (nn.LayerNorm(3), True, False, False),
        (nn.GroupNorm(1, 3), True, False, False),
        (nn.InstanceNorm1d(3), True, False, False),
        (nn.InstanceNorm2d(3, affine=True), True, False, False),
        (nn.RMSNorm(3), True, False, False),
        (nn.Linear(3, 3), False, False, False),
    ]
    for module, norm, batch_stat, batchnorm in cases:
        assert (is_norm_layer(module), is_batch_stat_norm(module), is_batchnorm(module)) == (
            norm,
            batch_stat,
            batchnorm,
        ), module


def test_channels_last_is_the_one_layout_flag() -> None:
    from lightning_bn.layers.registry import accepts_channels_last, is_channels_last

    assert [accepts_channels_last(c) for c in (BatchNorm, L1Norm, LayerNorm)] == [True] * 3
    assert not accepts_channels_last(nn.BatchNorm1d) and not accepts_channels_last(nn.Identity)
    for layer, last in [
        (LayerNorm(3), True),
        (LayerNorm(3, channels_last=False), False),
        (BatchNorm(3), False),
        (BatchNorm(3, channels_last=True), True),
        (nn.LayerNorm(3), True),
        (nn.BatchNorm1d(3), False),
    ]:
        assert is_channels_last(layer) is last, layer


def test_layer_norm_channels_first_is_a_deprecated_alias() -> None:
    x = torch.randn(4, 3, 5)
    new = LayerNorm(3, channels_last=False)
    with pytest.warns(DeprecationWarning, match="`channels_first` is deprecated"):
        old = LayerNorm(3, channels_first=True)
    assert old.channels_last is False
    assert torch.equal(old(x), new(x))
    assert torch.allclose(new(x), nn.GroupNorm(1, 3)(x), atol=1e-6)  # over C and the positions
    with pytest.warns(DeprecationWarning):
        assert LayerNorm(5, channels_first=False).channels_last is True
    with pytest.warns(DeprecationWarning):
        assert new.channels_first is True
    assert "channels_last=False" in repr(new)
    with pytest.raises(TypeError, match="both `channels_last` and its deprecated alias"):
        LayerNorm(3, channels_last=True, channels_first=False)
