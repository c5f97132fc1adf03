"""Tests of the experiment models: shapes for every norm kind, parameter counts, the DLN map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bn.experiments.deep_linear import DeepLinearNetwork
from lightning_bn.experiments.models import (
    MLP,
    VGG,
    VGG_CONFIGS,
    SmallCNN,
    count_parameters,
    init_weights_,
    make_norm,
)
from lightning_bn.layers import BatchNorm, L1Norm, LayerNorm, LinfNorm
from lightning_bn.layers.convert import swap_norm_layers

NORMS = ["batchnorm", "l1", "l2", "linf", "layernorm", "none"]
NORM_PARAMS_PER_FEATURE = {"batchnorm": 2, "l1": 2, "l2": 2, "linf": 2, "layernorm": 2, "none": 0}


def _check_forward_backward(model: nn.Module, x: torch.Tensor, out_shape: tuple[int, ...]) -> None:
    model.train()
    out = model(x)
    assert out.shape == out_shape and out.dtype == torch.float32
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        assert model(x).shape == out_shape


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_shapes(norm: str) -> None:
    torch.manual_seed(0)
    model = MLP(64, (32, 16), 10, norm=norm, dropout=0.1)
    _check_forward_backward(model, torch.randn(8, 64), (8, 10))
    # Image-shaped inputs are flattened.
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("norm", NORMS)
def test_small_cnn_shapes(norm: str) -> None:
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, norm=norm, widths=(8, 16, 16))
    _check_forward_backward(model, torch.randn(6, 1, 8, 8), (6, 10))


@pytest.mark.parametrize("norm", NORMS)
def test_vgg_shapes(norm: str) -> None:
    torch.manual_seed(0)
    model = VGG(
        [8, "M", 16, 16, "M"], num_classes=7, norm=norm, input_size=8, classifier_hidden=(12,)
    )
    _check_forward_backward(model, torch.randn(5, 3, 8, 8), (5, 7))


@pytest.mark.parametrize("norm", NORMS)
def test_dln_shapes(norm: str) -> None:
    torch.manual_seed(0)
    model = DeepLinearNetwork(depth=6, width=10, norm=norm)
    _check_forward_backward(model, torch.randn(16, 10), (16, 10))
    assert len(model.linears) == 6 and len(model.norms) == 5


def test_vgg11_on_cifar_sized_input() -> None:
    torch.manual_seed(0)
    model = VGG("vgg11", num_classes=10, norm="batchnorm")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # Closed form: each conv 3x3 has 9·c_in·c_out + c_out parameters, each BN 2·c_out, head 512·10 + 10.
    expected, c_in = 0, 3
    for entry in VGG_CONFIGS["vgg11"]:
        if entry != "M":
            assert isinstance(entry, int)
            expected += 9 * c_in * entry + entry + 2 * entry
            c_in = entry
    expected += 512 * 10 + 10
    assert count_parameters(model) == expected


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_parameter_count(norm: str) -> None:
    in_features, hidden, classes = 64, (40, 30, 20), 10
    model = MLP(in_features, hidden, classes, norm=norm)
    expected, d_prev = 0, in_features
    for d in hidden:
        expected += d_prev * d + d + NORM_PARAMS_PER_FEATURE[norm] * d
        d_prev = d
    expected += d_prev * classes + classes
    assert count_parameters(model) == expected


@pytest.mark.parametrize("norm", NORMS)
def test_dln_parameter_count(norm: str) -> None:
    depth, width = 25, 10
    model = DeepLinearNetwork(depth=depth, width=width, norm=norm)
    expected = depth * width * width + (depth - 1) * NORM_PARAMS_PER_FEATURE[norm] * width
    assert count_parameters(model) == expected
    assert all(getattr(linear, "bias", 0) is None for linear in model.linears)


def test_dln_without_norm_is_the_product_of_its_weights() -> None:
    torch.manual_seed(1)
    model = DeepLinearNetwork(depth=25, width=10).double()
    x = torch.randn(32, 10, dtype=torch.float64)
    weights = [model.linears[i].get_parameter("weight").detach() for i in range(25)]
    product = torch.linalg.multi_dot(weights[::-1])  # W_25 ⋯ W_1
    expected = (product @ x.T).T
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.end_to_end_matrix().detach(), product)
    assert not model.has_norm


def test_dln_with_norm_places_a_norm_after_every_layer_but_the_last() -> None:
    model = DeepLinearNetwork(depth=4, width=3, norm="batchnorm")
    names = [name for name, m in model.named_modules() if isinstance(m, BatchNorm)]
    assert names == ["norms.0", "norms.1", "norms.2"]
    assert model.has_norm
    with pytest.raises(RuntimeError, match="norm='none'"):
        model.end_to_end_matrix()


def test_dln_initialisations() -> None:
    torch.manual_seed(0)
    normal = DeepLinearNetwork(depth=25, width=10, init="normal", init_scale=2.0)
    entries = torch.cat([w.detach().flatten() for w in normal.weights()])
    assert abs(entries.std().item() - 2.0 / 10**0.5) < 0.05 * 2.0 / 10**0.5
    ortho = DeepLinearNetwork(depth=3, width=10, init="orthogonal", init_scale=0.5)
    for w in ortho.weights():
        torch.testing.assert_close(w @ w.T, 0.25 * torch.eye(10), atol=1e-5, rtol=0)
    default = DeepLinearNetwork(depth=3, width=10, init="default")
    assert all(w.abs().max() <= 10**-0.5 for w in default.weights())
    with pytest.raises(ValueError, match="init"):
        DeepLinearNetwork(init="xavier")
    with pytest.raises(ValueError, match="init_scale"):
        DeepLinearNetwork(init_scale=0)


def test_layernorm_is_channel_wise_in_conv_nets() -> None:
    model = SmallCNN(norm="layernorm", widths=(4,))
    norm = model.features[0].norm
    assert isinstance(norm, LayerNorm) and not norm.channels_last
    assert isinstance(make_norm("layernorm", 5), LayerNorm)
    assert isinstance(make_norm(L1Norm, 5), L1Norm)
    assert isinstance(make_norm("none", 5), nn.Identity)


def test_module_names_are_the_same_in_every_variant() -> None:
    names = {
        norm: [n for n, _ in MLP(64, (8, 8), 10, norm=norm).named_children()] for norm in NORMS
    }
    assert all(v == names["none"] for v in names.values())
    assert isinstance(MLP(64, (8,), 10, norm="none").blocks[0].norm, nn.Identity)


def test_swapping_norm_layers_gives_the_other_variant() -> None:
    torch.manual_seed(0)
    swapped = swap_norm_layers(MLP(64, (16, 16), 10, norm="batchnorm"), "linf")
    built = MLP(64, (16, 16), 10, norm="linf")
    assert [type(m) for m in swapped.modules()] == [type(m) for m in built.modules()]
    assert isinstance(swapped.get_submodule("blocks.1.norm"), LinfNorm)
    assert count_parameters(swapped) == count_parameters(built)


def test_small_cnn_pools_only_while_the_map_allows() -> None:
    model = SmallCNN(widths=(4, 4, 4, 4), input_size=8)
    pools = [name for name, m in model.named_modules() if isinstance(m, nn.MaxPool2d)]
    assert pools == ["features.0.pool", "features.1.pool", "features.2.pool"]
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MLP(64, (8,), 10, norm="groupnorm"), "kind"),
        (lambda: MLP(64, (0,), 10), "hidden"),
        (lambda: MLP(64, (8,), 10, dropout=1.0), "dropout"),
        (lambda: MLP(0), "in_features"),
        (lambda: SmallCNN(widths=()), "widths"),
        (lambda: VGG("vgg7"), "cfg"),
        (lambda: VGG([8, "X"]), "cfg"),
        (lambda: VGG([8, "M", "M"], input_size=2), "too small"),
        (lambda: DeepLinearNetwork(depth=0), "depth"),
    ],
)
def test_bad_arguments(build: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()  # type: ignore[operator]


# --- init_weights_ ------------------------------------------------------------------------------------
def test_kaiming_init_matches_he_variance() -> None:
    torch.manual_seed(0)
    model = init_weights_(MLP(64, (512, 512), 10, norm="none"), "kaiming")
    linears = [model.blocks[0].linear, model.blocks[1].linear, model.head]
    # hidden layers (followed by ReLU): std sqrt(2 / fan_in); the head: sqrt(1 / fan_in)
    for layer, gain in zip(linears, (2.0, 2.0, 1.0), strict=True):
        expected = (gain / layer.in_features) ** 0.5
        assert layer.weight.std().item() == pytest.approx(expected, rel=0.03)
        assert abs(layer.weight.mean().item()) < 0.05 * expected
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    # He initialisation keeps the second moment of a ReLU network's activations (He et al. 2015)
    x = torch.randn(4096, 64)
    h = model.blocks(x)
    h_first = torch.relu(model.blocks[0].linear(x))
    assert (h**2).mean().item() == pytest.approx((h_first**2).mean().item(), rel=0.15)


def test_kaiming_init_of_convolutions_and_scale() -> None:
    torch.manual_seed(1)
    cnn = init_weights_(SmallCNN(norm="batchnorm", widths=(64, 64)), "kaiming", scale=4.0)
    conv = cnn.features[1].conv
    fan_in = conv.in_channels * 9
    assert conv.weight.std().item() == pytest.approx(4.0 * (2.0 / fan_in) ** 0.5, rel=0.03)
    # the norm layers keep their own initialisation
    assert torch.equal(cnn.features[1].norm.weight, torch.ones(64))


def test_default_init_keeps_pytorch_and_scale_multiplies() -> None:
    torch.manual_seed(2)
    reference = MLP(64, (32,), 10, norm="batchnorm")
    torch.manual_seed(2)
    same = init_weights_(MLP(64, (32,), 10, norm="batchnorm"), "default")
    torch.manual_seed(2)
    scaled = init_weights_(MLP(64, (32,), 10, norm="batchnorm"), "default", scale=0.25)
    for (name, p_ref), p_same, p_scaled in zip(
        reference.named_parameters(), same.parameters(), scaled.parameters(), strict=True
    ):
        assert torch.equal(p_ref, p_same)
        # weights of Linear layers scaled, biases and norm parameters untouched
        factor = 0.25 if name.endswith("linear.weight") or name == "head.weight" else 1.0
        assert torch.equal(p_scaled, p_ref * factor), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init": "xavier"}, "`init`"),
        ({"scale": 0.0}, "`scale`"),
        ({"scale": float("nan")}, "`scale`"),
        ({"scale": True}, "`scale`"),
    ],
)
def test_init_weights_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        init_weights_(MLP(8, (4,), 2), **kwargs)  # type: ignore[arg-type]
