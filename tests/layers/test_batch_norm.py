from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bn import BatchNorm

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = {2: (16, 4), 3: (8, 4, 5), 4: (6, 4, 3, 5), 5: (4, 4, 2, 3, 3)}


def _pair(rank: int, dtype: torch.dtype, **kwargs: object) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = TORCH_BN[rank](4, dtype=dtype, **kwargs)  # type: ignore[arg-type]
    ours = BatchNorm(4, dtype=dtype, **kwargs)  # type: ignore[arg-type]
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
            ours.weight.copy_(ref.weight)
            ours.bias.copy_(ref.bias)
    return ref, ours


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    )


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": None},
        {"affine": False},
        {"track_running_stats": False},
        {"eps": 1e-3, "momentum": 0.3},
    ],
)
def test_matches_torch_over_steps(rank: int, dtype: torch.dtype, kwargs: dict) -> None:
    ref, ours = _pair(rank, dtype, **kwargs)
    tol = _tol(dtype)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(SHAPES[rank], generator=gen, dtype=dtype) * 3 + 1
        x_ref = x.clone().requires_grad_()
        x_ours = x.clone().requires_grad_()
        y_ref, y_ours = ref(x_ref), ours(x_ours)
        torch.testing.assert_close(y_ours, y_ref, **tol)
        upstream = torch.randn(y_ref.shape, generator=gen, dtype=dtype)
        ref_grads = torch.autograd.grad(y_ref, [x_ref, *ref.parameters()], upstream)
        our_grads = torch.autograd.grad(y_ours, [x_ours, *ours.parameters()], upstream)
        for a, b in zip(our_grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, **tol)
    assert ref.state_dict().keys() == ours.state_dict().keys()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, **tol)
    # evaluation mode: running statistics (or batch statistics without them)
    ref.eval()
    ours.eval()
    x = torch.randn(SHAPES[rank], generator=gen, dtype=dtype)
    torch.testing.assert_close(ours(x), ref(x), **tol)


def test_torch_checkpoint_loads() -> None:
    ref = nn.BatchNorm2d(3)
    ref(torch.randn(5, 3, 4, 4) * 2)
    ours = BatchNorm(3)
    ours.load_state_dict(ref.state_dict())
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), ref(x))


def test_channels_last_equals_permuted() -> None:
    x = torch.randn(4, 7, 3)
    ours = BatchNorm(3, channels_last=True)
    ref = nn.BatchNorm1d(3)
    torch.testing.assert_close(ours(x), ref(x.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_bad_inputs() -> None:
    bn = BatchNorm(4)
    with pytest.raises(ValueError, match="Expected input with 4 channels"):
        bn(torch.randn(8, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"expected 2D to 5D input \(got 1D input\)"):
        bn(torch.randn(4))
    bn.eval()
    assert bn(torch.randn(1, 4)).shape == (1, 4)  # one sample is fine in evaluation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 0}, "`num_features` to be a positive integer"),
        ({"num_features": 2.5}, "`num_features` to be a positive integer"),
        ({"num_features": 3, "eps": -1.0}, "`eps` to be a finite number >= 0"),
        ({"num_features": 3, "momentum": 1.5}, "`momentum` to be None or a number in"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchNorm(**kwargs)


def test_eps_zero_matches_algorithm_1() -> None:
    """torch refuses eps = 0 in training; ours allows it (Theorem 4.1 is then an identity)."""
    x = torch.randn(10, 3, 4, dtype=torch.float64) * 2 + 1
    bn = BatchNorm(3, eps=0.0, dtype=torch.float64)
    mu = x.mean(dim=(0, 2), keepdim=True)
    var = ((x - mu) ** 2).mean(dim=(0, 2), keepdim=True)
    torch.testing.assert_close(bn(x), (x - mu) / var.sqrt())
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var.flatten() * 40 / 39)
