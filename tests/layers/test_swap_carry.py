"""swap_norm_layers keeps what the user set on the old layer: frozen parameters, hooks, a missing
bias and parametrisations; each checked against the original module's outputs and gradients."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_bn.layers import BatchNorm, LayerNorm, swap_norm_layers


def _net(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), norm, nn.ReLU(), nn.Linear(4, 2)).double()


def _x() -> Tensor:
    return torch.randn(16, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _outputs_and_grads(net: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
    out = net(_x())
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(out.square().sum(), list(params.values()))
    return out.detach(), dict(zip(params, grads, strict=True))


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    out_a, grads_a = _outputs_and_grads(a)
    out_b, grads_b = _outputs_and_grads(b)
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    assert grads_b.keys() == grads_a.keys()
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["batchnorm", BatchNorm])
def test_frozen_norm_layer_stays_frozen(kind: Any) -> None:
    ref = _net(nn.BatchNorm1d(4))
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 2.0)
        ref[1].bias.uniform_(-1.0, 1.0)
    ref[1].requires_grad_(False)
    swapped = swap_norm_layers(copy.deepcopy(ref), kind)
    assert isinstance(swapped[1], BatchNorm)
    assert not swapped[1].weight.requires_grad and not swapped[1].bias.requires_grad
    _assert_same(ref, swapped)


def test_partly_frozen_layer_keeps_each_flag() -> None:
    ref = _net(nn.LayerNorm(4))
    with torch.no_grad():
        ref[1].bias.uniform_(-1.0, 1.0)
    ref[1].bias.requires_grad_(False)
    swapped = swap_norm_layers(copy.deepcopy(ref), "layernorm")
    assert isinstance(swapped[1], LayerNorm)
    assert swapped[1].weight.requires_grad and not swapped[1].bias.requires_grad
    _assert_same(ref, swapped)


def test_forward_hooks_move_with_the_layer() -> None:
    calls: list[str] = []
    ref = _net(nn.BatchNorm1d(4))

    def pre(module: nn.Module, args: Any) -> Any:
        calls.append("pre")
        return (args[0] * 2,)

    def post(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        calls.append("post")
        return output + 1

    def pre_kw(module: nn.Module, args: Any, kwargs: Any) -> Any:
        calls.append("pre_kw")
        return args, kwargs

    ref[1].register_forward_pre_hook(pre)
    ref[1].register_forward_pre_hook(pre_kw, with_kwargs=True)
    handle = ref[1].register_forward_hook(post)
    expected = _net(BatchNorm(4))  # BatchNorm(x * 2) + 1 by hand
    expected[1].register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    expected[1].register_forward_hook(lambda m, a, o: o + 1)
    swapped = swap_norm_layers(ref, "batchnorm")
    assert isinstance(swapped[1], BatchNorm)
    calls.clear()
    _assert_same(expected, swapped)
    assert calls == ["pre", "pre_kw", "post"]
    handle.remove()  # the handle the user kept still removes it from the new layer
    calls.clear()
    swapped(_x())
    assert calls == ["pre", "pre_kw"]


def test_layer_norm_without_bias_gets_no_trainable_bias() -> None:
    ref = _net(nn.LayerNorm(4, bias=False))
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 2.0)
    net = _net(nn.LayerNorm(4, bias=False))
    net.load_state_dict(ref.state_dict())
    swapped = swap_norm_layers(net, "layernorm")
    assert isinstance(swapped[1], LayerNorm)
    assert [n for n, _ in swapped[1].named_parameters()] == ["weight"]
    assert set(swapped.state_dict()) == set(ref.state_dict())
    _assert_same(ref, swapped)
    # and to a batch layer: no shift there either
    bn = swap_norm_layers(_net(nn.LayerNorm(4, bias=False)), "l2")
    assert [n for n, _ in bn[1].named_parameters()] == ["weight"]
    assert not bn[1].bias.any()


class _Positive(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.softplus(x) * 3


def test_parametrised_gamma_is_kept() -> None:
    ref = _net(nn.BatchNorm1d(4))
    parametrize.register_parametrization(ref[1], "weight", _Positive())
    with torch.no_grad():
        ref[1].parametrizations.weight.original.uniform_(1.0, 4.0)
    expected = _net(BatchNorm(4))
    parametrize.register_parametrization(expected[1], "weight", _Positive())
    with torch.no_grad():
        expected[1].parametrizations.weight.original.copy_(ref[1].parametrizations.weight.original)
    swapped = swap_norm_layers(ref, "batchnorm")
    assert parametrize.is_parametrized(swapped[1], "weight")
    torch.testing.assert_close(swapped[1].weight, expected[1].weight)
    _assert_same(expected, swapped)


def test_parametrisation_of_a_tensor_the_new_layer_lacks_is_refused() -> None:
    net = _net(nn.BatchNorm1d(4))
    parametrize.register_parametrization(net[1], "weight", _Positive())
    with pytest.raises(ValueError, match=r"parametrisation of `weight` of `1`.*keep `affine=True`"):
        swap_norm_layers(net, "batchnorm", affine=False)


def test_state_dict_hooks_are_refused_in_one_line() -> None:
    net = _net(nn.BatchNorm1d(4))
    net[1]._register_state_dict_hook(lambda *a: None)
    before = net[1]
    with pytest.raises(ValueError, match=r"cannot carry the state-dict hooks of `1`") as info:
        swap_norm_layers(net, "l2")
    assert "\n" not in str(info.value)
    assert net[1] is before  # nothing replaced
