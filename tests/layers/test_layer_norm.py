from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bn import LayerNorm


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 6), (2, 3, 4, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_matches_torch_layer_norm(
    shape: tuple[int, ...], dtype: torch.dtype, affine: bool, train: bool
) -> None:
    torch.manual_seed(0)
    ref = nn.LayerNorm(6, elementwise_affine=affine, dtype=dtype)
    ours = LayerNorm(6, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
        ours.load_state_dict(ref.state_dict())
    ref.train(train)
    ours.train(train)
    x = (torch.randn(shape, dtype=dtype) * 3 + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y_ref, y_ours = ref(x), ours(x2)
    torch.testing.assert_close(y_ours, y_ref)
    up = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], up)
    g_ours = torch.autograd.grad(y_ours, [x2, *ours.parameters()], up)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (4, 3, 7), (4, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_first_matches_group_norm(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ref = nn.GroupNorm(1, 3, dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours = LayerNorm(3, channels_last=False, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape, dtype=dtype) * 2 - 1
    torch.testing.assert_close(ours(x), ref(x))


def test_bad_feature_size() -> None:
    with pytest.raises(ValueError, match="Expected input with 6 features in the last dimension"):
        LayerNorm(6)(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"Expected input of shape \(N, 3, \*\)"):
        LayerNorm(3, channels_last=False)(torch.randn(2, 4, 5))
