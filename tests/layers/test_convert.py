from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lightning_bn import BatchNorm, L1Norm, LayerNorm, LinfNorm, LpNorm, swap_norm_layers


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(width: int = 8, num_classes: int = 10) -> nn.Module:
    """ResNet-18 layout ([2, 2, 2, 2] basic blocks), narrow for tests."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    cin = width
    for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for j in range(2):
            layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def _bn_modules(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _randomise_affine(model: nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "weight", None) is not None and "Norm" in type(m).__name__:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("batchnorm", BatchNorm), ("l1", L1Norm), ("linf", LinfNorm), ("layernorm", LayerNorm)],
)
def test_resnet18_swap(kind: str, cls: type[nn.Module]) -> None:
    model = resnet18()
    _randomise_affine(model)
    old = _bn_modules(model)
    old_affine = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in old]
    n_params = sum(p.numel() for p in model.parameters())
    assert len(old) == 20  # 1 stem + 8 blocks × 2 + 3 downsampling shortcuts
    out = swap_norm_layers(model, kind)
    assert out is model
    new = [m for m in model.modules() if isinstance(m, cls)]
    assert len(new) == 20 and not _bn_modules(model)
    # same number of parameters: every norm layer keeps a (C,) weight and bias
    assert sum(p.numel() for p in model.parameters()) == n_params
    for m, (w, b) in zip(new, old_affine, strict=True):
        torch.testing.assert_close(m.weight, w)
        torch.testing.assert_close(m.bias, b)
    y = model(torch.randn(4, 3, 16, 16))
    assert y.shape == (4, 10) and torch.isfinite(y).all()


def test_swap_to_none_removes_parameters() -> None:
    model = resnet18()
    n_params = sum(p.numel() for p in model.parameters())
    n_bn = sum(2 * m.num_features for m in _bn_modules(model))
    swap_norm_layers(model, "none")
    assert sum(p.numel() for p in model.parameters()) == n_params - n_bn
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_torch_checkpoint_loads_into_swapped_model() -> None:
    torch.manual_seed(0)
    model = resnet18()
    model.train()
    for _ in range(3):  # populate running statistics
        model(torch.randn(8, 3, 16, 16))
    _randomise_affine(model)
    state = model.state_dict()
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    expected = model(x)
    swapped = swap_norm_layers(resnet18(), "batchnorm")
    swapped.load_state_dict(state)
    swapped.eval()
    torch.testing.assert_close(swapped(x), expected, rtol=1e-4, atol=1e-5)


def test_buffers_mode_dtype_carried() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).double()
    model(torch.randn(10, 4, dtype=torch.float64))
    model.eval()
    old = model[1]
    swap_norm_layers(model, "batchnorm")
    new = model[1]
    assert isinstance(new, BatchNorm) and not new.training
    assert new.weight.dtype == torch.float64
    torch.testing.assert_close(new.running_mean, old.running_mean)
    torch.testing.assert_close(new.running_var, old.running_var)
    assert int(new.num_batches_tracked) == 1


def test_transformer_block_swap() -> None:
    torch.manual_seed(0)
    block = TransformerBlock()
    _randomise_affine(block)
    w1, w2 = block.norm1.weight.detach().clone(), block.norm2.weight.detach().clone()
    n_params = sum(p.numel() for p in block.parameters())
    swap_norm_layers(block, "l2")
    assert isinstance(block.norm1, LpNorm) and block.norm1.channels_last
    assert isinstance(block.norm2, LpNorm) and block.norm2.channels_last
    torch.testing.assert_close(block.norm1.weight, w1)
    torch.testing.assert_close(block.norm2.weight, w2)
    assert sum(p.numel() for p in block.parameters()) == n_params
    x = torch.randn(3, 5, 16)
    assert block(x).shape == (3, 5, 16)
    # the channels-last L2 layer normalises each feature over batch × tokens
    torch.testing.assert_close(
        block.norm1(x),
        nn.functional.batch_norm(
            x.transpose(1, 2), None, None, w1, block.norm1.bias, True
        ).transpose(1, 2),
    )


def test_include_glob_and_root() -> None:
    model = resnet18()
    swap_norm_layers(model, "l1", include="3.*")
    swapped = [n for n, m in model.named_modules() if isinstance(m, L1Norm)]
    assert swapped == ["3.bn1", "3.bn2"]
    bn = nn.BatchNorm2d(4).eval()
    new = swap_norm_layers(bn, "layernorm")
    assert isinstance(new, LayerNorm) and not new.channels_last and not new.training


def test_nothing_matched_names_contained_types() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.GroupNorm(1, 3), nn.InstanceNorm1d(3))
    with pytest.raises(ValueError, match="the model contains: GroupNorm, InstanceNorm1d"):
        swap_norm_layers(model, "batchnorm")
    with pytest.raises(ValueError, match=r"matching include='nothing\.\*'"):
        swap_norm_layers(resnet18(), "l1", include="nothing.*")
    with pytest.raises(ValueError, match="Expected argument `kind` to be one of"):
        swap_norm_layers(resnet18(), "weightnorm")


def test_swap_sets_the_layout_flag_without_the_deprecated_alias() -> None:
    import warnings

    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Flatten(), nn.LayerNorm(12))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        swap_norm_layers(net, "layernorm")
    assert isinstance(net[1], LayerNorm) and net[1].channels_last is False
    assert isinstance(net[3], LayerNorm) and net[3].channels_last is True
    x = torch.randn(5, 2, 2, 2)
    # the reference: GroupNorm(1, C) over the map, torch's LayerNorm over the features
    expected = nn.LayerNorm(12)(nn.Flatten()(nn.GroupNorm(1, 3)(net[0](x))))
    assert torch.allclose(net(x), expected, atol=1e-5)


def test_shared_norm_layer_stays_shared() -> None:
    # one BatchNorm used at two places (weight tying): one new layer at both, with its γ, β and
    # running statistics, and the swapped model computes what torch's shared layer computes
    torch.manual_seed(0)
    shared = nn.BatchNorm1d(4)
    with torch.no_grad():
        shared.weight.uniform_(0.5, 1.5)
        shared.bias.uniform_(-0.5, 0.5)
    inner = nn.Sequential(nn.Linear(4, 4), shared)
    model = nn.Sequential(inner, nn.ReLU(), nn.Linear(4, 4), shared)
    reference = copy.deepcopy(model)  # deepcopy keeps the sharing too
    swap_norm_layers(model, "batchnorm")
    assert isinstance(model[3], BatchNorm) and model[0][1] is model[3]
    assert len([m for m in model.modules() if isinstance(m, BatchNorm)]) == 1
    assert len(list(model.parameters())) == len(list(reference.parameters()))
    x = torch.randn(16, 4)
    torch.testing.assert_close(model(x), reference(x))
    torch.testing.assert_close(model[3].running_mean, reference[3].running_mean)
    # selected by one of its names, it is still swapped at both places
    other = nn.Sequential(nn.Sequential(shared), shared)
    swap_norm_layers(other, "l1", include="0.0")
    assert isinstance(other[1], L1Norm) and other[0][0] is other[1]


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "match"),
    [
        ("net", {}, TypeError, "`model` to be an nn.Module, but got str"),
        (None, {}, TypeError, "`model` to be an nn.Module, but got NoneType"),
        (nn.Sequential(nn.BatchNorm1d(3)), {"include": []}, ValueError, "`include`.*got \\[\\]"),
        (nn.Sequential(nn.BatchNorm1d(3)), {"include": ()}, ValueError, "`include`"),
        (nn.Sequential(nn.BatchNorm1d(3)), {"include": 5}, TypeError, "`include`.*got 5"),
        (nn.Sequential(nn.BatchNorm1d(3)), {"include": [""]}, TypeError, "`include`"),
        (nn.Sequential(nn.BatchNorm1d(3)), {"include": ["0", 1]}, TypeError, "`include`"),
    ],
)
def test_swap_rejects_bad_arguments(
    model: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        swap_norm_layers(model, "l1", **kwargs)


def test_swap_refuses_scripted_and_compiled_models() -> None:
    eager = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    message = "scripted/compiled modules cannot be swapped; swap before scripting"
    with pytest.raises(TypeError, match=message):
        swap_norm_layers(torch.jit.script(eager), "l1")
    with pytest.raises(TypeError, match=message):  # a scripted part inside an eager model
        swap_norm_layers(nn.Sequential(torch.jit.script(nn.BatchNorm1d(3))), "l1")
    with pytest.raises(TypeError, match=message):
        swap_norm_layers(torch.compile(eager), "l1")
    assert isinstance(eager[1], nn.BatchNorm1d)  # nothing changed
