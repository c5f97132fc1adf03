"""An empty batch (size 0) behaves as in torch's layers, in training and evaluation (issue 14)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_bn import BatchNorm, L1Norm, L2Norm, LayerNorm, LinfNorm

BATCH_LAYERS = [BatchNorm, L1Norm, L2Norm, LinfNorm]
SHAPES = [(0, 3), (0, 3, 5), (0, 3, 2, 2)]


def _torch_bn(shape: tuple[int, ...], **kwargs: bool) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    return cls(3, **kwargs)


def _run(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
        y.sum().backward()
    assert x.grad is not None
    return y, x.grad, [str(w.message) for w in caught]


@pytest.mark.parametrize("cls", BATCH_LAYERS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_batch_layers_on_an_empty_batch_match_torch(
    cls: Callable[..., nn.Module], shape: tuple[int, ...], training: bool, track: bool
) -> None:
    ours, ref = cls(3, track_running_stats=track), _torch_bn(shape, track_running_stats=track)
    with torch.no_grad():  # non-trivial state, so that "untouched" means something
        for layer in (ours, ref):
            layer.weight.fill_(1.5)
            layer.bias.fill_(-0.25)
            if track:
                layer.running_mean.fill_(0.5)
                assert layer.num_batches_tracked is not None
                layer.num_batches_tracked.fill_(7)
    ours.train(training)
    ref.train(training)
    x = torch.randn(*shape)
    y, gx, warned = _run(ours, x)
    y_ref, gx_ref, warned_ref = _run(ref, x)
    assert y.shape == y_ref.shape == x.shape and y.dtype == y_ref.dtype
    assert gx.shape == gx_ref.shape
    assert warned == warned_ref == []
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)  # zeros, not None
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    if track:
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.num_batches_tracked, ref.num_batches_tracked)
        scale = ours.running_var if isinstance(ours, BatchNorm) else ours.running_divisor
        torch.testing.assert_close(scale, torch.ones(3))  # as ref.running_var: untouched


def test_one_value_per_channel_still_raises_like_torch() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel") as ref:
        nn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel") as ours:
        BatchNorm(3)(torch.randn(1, 3))
    assert str(ours.value) == str(ref.value)


@pytest.mark.parametrize("training", [True, False])
def test_layer_norm_on_an_empty_batch_matches_torch(training: bool) -> None:
    x = torch.randn(0, 5, 3)
    pairs = [
        (LayerNorm(3), nn.LayerNorm(3)),
        (LayerNorm(5, channels_last=False), nn.GroupNorm(1, 5)),
    ]
    for ours, ref in pairs:
        ours.train(training)
        ref.train(training)
        y, gx, warned = _run(ours, x)
        y_ref, gx_ref, warned_ref = _run(ref, x)
        assert y.shape == y_ref.shape == x.shape and gx.shape == gx_ref.shape
        assert warned == warned_ref == []
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
