"""Checkpoints between torch's BatchNorm and the package's layers (the README's layer section)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_bn import BatchNorm, L1Norm, L2Norm, LayerNorm, LinfNorm, LpNorm, swap_norm_layers


def _trained_bn(cls: type[nn.Module] = nn.BatchNorm1d, c: int = 4) -> nn.Module:
    """A BatchNorm with non-trivial γ, β and running statistics."""
    torch.manual_seed(0)
    bn = cls(c).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    for _ in range(3):
        bn(torch.randn(16, c, dtype=torch.float64) * 3 + 1)
    return bn.eval()


@pytest.mark.parametrize("target", [BatchNorm, L2Norm, lambda c: LpNorm(c, 2)])
def test_torch_batchnorm_checkpoint_loads_strictly_and_computes_the_same(target) -> None:
    bn = _trained_bn()
    ours = target(4).double().eval()
    ours.load_state_dict(bn.state_dict())  # strict
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), bn(x), rtol=1e-14, atol=1e-14)
    if isinstance(ours, LpNorm):
        torch.testing.assert_close(ours.running_divisor, bn.running_var.sqrt())
    bn.train(), ours.train()
    torch.testing.assert_close(ours(x), bn(x), rtol=1e-12, atol=1e-12)


def test_l2_checkpoint_loads_strictly_into_torch_batchnorm_and_round_trips() -> None:
    l2 = L2Norm(4).double()
    with torch.no_grad():
        l2.weight.uniform_(0.5, 1.5)
    for _ in range(3):
        l2(torch.randn(16, 4, dtype=torch.float64) * 3 + 1)
    l2.eval()
    state = l2.state_dict()
    assert list(state) == list(nn.BatchNorm1d(4).state_dict())  # BatchNorm's keys, same order
    torch.testing.assert_close(state["running_var"], l2.running_divisor.square())
    bn = nn.BatchNorm1d(4).double().eval()
    bn.load_state_dict(state)  # strict
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(bn(x), l2(x), rtol=1e-14, atol=1e-14)
    again = L2Norm(4).double()
    again.load_state_dict(state)
    assert torch.equal(again.running_divisor, l2.running_divisor)  # sqrt(d²) == d exactly
    legacy = {("running_divisor" if k == "running_var" else k): v for k, v in state.items()}
    legacy["running_divisor"] = l2.running_divisor.clone()
    again.load_state_dict(legacy)  # checkpoints written with the buffer's own name still load
    assert torch.equal(again.running_divisor, l2.running_divisor)


@pytest.mark.parametrize(("kind", "cls"), [("l1", L1Norm), ("linf", LinfNorm)])
def test_l1_linf_load_non_strict_keeping_affine_and_mean(kind: str, cls: type) -> None:
    bn = _trained_bn()
    ours = cls(4).double()
    result = ours.load_state_dict(bn.state_dict(), strict=False)
    assert result.missing_keys == ["running_divisor"]
    assert result.unexpected_keys == ["running_var"]
    for name in ("weight", "bias", "running_mean", "num_batches_tracked"):
        assert torch.equal(getattr(ours, name), getattr(bn, name)), name
    assert torch.equal(ours.running_divisor, torch.ones(4, dtype=torch.float64))  # not derivable
    with pytest.raises(RuntimeError, match="running_divisor"):
        cls(4).double().load_state_dict(bn.state_dict())


def test_layernorm_and_none_load_non_strict() -> None:
    bn = _trained_bn()
    ln = LayerNorm(4).double()
    result = ln.load_state_dict(bn.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == [
        "num_batches_tracked",
        "running_mean",
        "running_var",
    ]
    assert torch.equal(ln.weight, bn.weight) and torch.equal(ln.bias, bn.bias)
    net = nn.Sequential(nn.Linear(3, 4), copy.deepcopy(bn))
    swapped = swap_norm_layers(copy.deepcopy(net), "none")
    result = swapped.load_state_dict(net.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == sorted(
        k for k in net.state_dict() if k.startswith("1.")
    )


@pytest.mark.parametrize("kind", ["batchnorm", "l2"])
def test_whole_model_checkpoint_loads_into_the_swapped_model(kind: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).double()
    for _ in range(3):
        net(torch.randn(4, 2, 5, 5, dtype=torch.float64) * 2 + 1)
    net.eval()
    checkpoint = copy.deepcopy(net.state_dict())
    swapped = swap_norm_layers(copy.deepcopy(net), kind)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    # the swap itself carries the running statistics over (L2: the divisor from running_var)
    torch.testing.assert_close(swapped(x), net(x), rtol=1e-14, atol=1e-14)
    fresh = swap_norm_layers(
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).double(), kind
    ).eval()
    fresh.load_state_dict(checkpoint)  # strict
    torch.testing.assert_close(fresh(x), net(x), rtol=1e-14, atol=1e-14)
    back = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).double().eval()
    back.load_state_dict(fresh.state_dict())  # and back into the torch model
    torch.testing.assert_close(back(x), net(x), rtol=1e-14, atol=1e-14)
