"""The shared argument checks, and the constructors that use them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_bn import (
    BatchNorm,
    ICSCallback,
    L1Norm,
    LayerNorm,
    LipschitzCallback,
    LpNorm,
    NoiseInjectionCallback,
    SmoothnessCallback,
)
from lightning_bn._validation import (
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_float,
    check_int,
)
from lightning_bn.diagnostics.bounds import theorem41_bound
from lightning_bn.experiments import (
    MLP,
    ClassificationModule,
    DeepLinearDataModule,
    DeepLinearNetwork,
    DigitsDataModule,
    RegressionModule,
    SmallCNN,
)

GOOD: list[tuple[Callable[..., Any], Any, dict[str, Any], Any]] = [
    (check_int, 1, {"minimum": 1}, 1),
    (check_int, 0, {"minimum": 0}, 0),
    (check_int, 2**62, {"minimum": 0, "maximum": 2**63 - 1}, 2**62),
    (check_int, -5, {}, -5),
    (check_float, 0, {"minimum": 0}, 0.0),
    (check_float, 2.5, {"minimum": 0, "maximum": 3}, 2.5),
    (check_float, math.inf, {"finite": False}, math.inf),
    (check_float, None, {"optional": True}, None),
    (check_bool, True, {}, True),
    (check_bool, False, {}, False),
    (check_choice, "power", {"choices": ("power", "lanczos")}, "power"),
    (check_choice, 2, {"choices": (1, 2)}, 2),
]


@pytest.mark.parametrize(("check", "value", "kwargs", "expected"), GOOD)
def test_good_values_pass(
    check: Callable[..., Any], value: Any, kwargs: dict[str, Any], expected: Any
) -> None:
    out = check("arg", value, **kwargs)
    assert out == expected and type(out) is type(expected)


BAD: list[tuple[Callable[..., Any], Any, dict[str, Any], type[Exception], str]] = [
    (check_int, 0, {"minimum": 1}, ValueError, "a positive integer, but got 0"),
    (check_int, -1, {"minimum": 0}, ValueError, "an integer >= 0, but got -1"),
    (check_int, 11, {"minimum": 0, "maximum": 10}, ValueError, r"in \[0, 10\], but got 11"),
    (check_int, 11, {"maximum": 10}, ValueError, "an integer <= 10, but got 11"),
    (check_int, True, {"minimum": 1}, ArgumentTypeError, "positive integer, but got True"),
    (check_int, 2.0, {"minimum": 1}, ArgumentTypeError, "but got 2.0"),
    (check_int, "3", {}, ArgumentTypeError, "an integer, but got '3'"),
    (check_int, None, {}, ArgumentTypeError, "but got None"),
    (check_float, -0.5, {"minimum": 0}, ValueError, "a finite number >= 0, but got -0.5"),
    (check_float, 1.5, {"maximum": 1}, ValueError, "a finite number <= 1, but got 1.5"),
    (check_float, math.nan, {}, ValueError, "a finite number, but got nan"),
    (check_float, math.inf, {}, ValueError, "but got inf"),
    (check_float, math.nan, {"finite": False}, ValueError, "a number, but got nan"),
    (check_float, False, {}, ArgumentTypeError, "but got False"),
    (check_float, "1e-3", {}, ArgumentTypeError, "but got '1e-3'"),
    (check_float, 2, {"minimum": 0, "maximum": 1, "optional": True}, ValueError, "None or"),
    (check_bool, 1, {}, ArgumentTypeError, "a bool, but got 1"),
    (check_bool, "no", {}, ArgumentTypeError, "a bool, but got 'no'"),
    (check_bool, None, {}, ArgumentTypeError, "a bool, but got None"),
    (check_choice, "Power", {"choices": ("power", "lanczos")}, ValueError, "'power', 'lanczos'"),
    (check_choice, True, {"choices": (1, 2)}, ValueError, "one of 1, 2, but got True"),
    (check_choice, [1], {"choices": (1, 2)}, ValueError, r"but got \[1\]"),
]


@pytest.mark.parametrize(("check", "value", "kwargs", "error", "match"), BAD)
def test_bad_values_raise_naming_the_argument(
    check: Callable[..., Any],
    value: Any,
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match) as info:
        check("my_arg", value, **kwargs)
    assert type(info.value) is error  # exactly: a range error is not a type error
    assert str(info.value).startswith("Expected argument `my_arg` to be ")


def test_type_errors_are_also_value_errors() -> None:
    # the checks they replaced raised ValueError for every bad value: callers catching it still do
    with pytest.raises(ValueError):
        check_int("n", "x")
    with pytest.raises(TypeError):
        check_int("n", "x")


CONSTRUCTORS: list[tuple[Callable[..., Any], dict[str, Any], type[Exception], str]] = [
    (ICSCallback, {"every_n_steps": 0}, ValueError, "every_n_steps"),
    (ICSCallback, {"every_n_steps": True}, ArgumentTypeError, "every_n_steps"),
    (ICSCallback, {"every_n_steps": 2.0}, ArgumentTypeError, "every_n_steps"),
    (ICSCallback, {"distributional": "no"}, ArgumentTypeError, "distributional"),
    (ICSCallback, {"distributional": 1}, ArgumentTypeError, "distributional"),
    (LipschitzCallback, {"relative_to_lr": "yes"}, ArgumentTypeError, "relative_to_lr"),
    (LipschitzCallback, {"every_n_steps": -3}, ValueError, "every_n_steps"),
    (SmoothnessCallback, {"seed": "x"}, ArgumentTypeError, "seed"),
    (SmoothnessCallback, {"seed": 2.5}, ArgumentTypeError, "seed"),
    (SmoothnessCallback, {"seed": 2**70}, ValueError, "seed"),
    (SmoothnessCallback, {"seed": -1}, ValueError, "seed"),
    (SmoothnessCallback, {"max_iters": 0}, ValueError, "max_iters"),
    (SmoothnessCallback, {"max_iters": True}, ArgumentTypeError, "max_iters"),
    (SmoothnessCallback, {"tol": -1e-3}, ValueError, "tol"),
    (SmoothnessCallback, {"tol": math.nan}, ValueError, "tol"),
    (SmoothnessCallback, {"hessian": "false"}, ArgumentTypeError, "hessian"),
    (SmoothnessCallback, {"hvp_method": "fwd"}, ValueError, "hvp_method"),
    (SmoothnessCallback, {"eig_algorithm": "arnoldi"}, ValueError, "eig_algorithm"),
    (NoiseInjectionCallback, {"seed": True}, ArgumentTypeError, "seed"),
    (NoiseInjectionCallback, {"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
    (BatchNorm, {"num_features": True}, ArgumentTypeError, "num_features"),
    (BatchNorm, {"num_features": 0}, ValueError, "num_features"),
    (BatchNorm, {"num_features": 3, "eps": "1e-5"}, ArgumentTypeError, "eps"),
    (BatchNorm, {"num_features": 3, "momentum": -0.1}, ValueError, "momentum"),
    (L1Norm, {"num_features": 3, "eps": math.inf}, ValueError, "eps"),
]


@pytest.mark.parametrize(("cls", "kwargs", "error", "name"), CONSTRUCTORS)
def test_constructors_reject_bad_arguments(
    cls: Callable[..., Any], kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error) as info:
        cls(**kwargs)
    assert type(info.value) is error
    assert f"`{name}`" in str(info.value)
    assert repr(kwargs[name]) in str(info.value)


def test_theorem41_bound_rejects_bad_eps() -> None:
    y, g = torch.randn(4, 2), torch.randn(4, 2)
    with pytest.raises(ArgumentTypeError, match="`eps` to be a finite number >= 0, but got True"):
        theorem41_bound(y, g, g, None, True)
    with pytest.raises(ValueError, match="`eps` to be a finite number >= 0, but got -1"):
        theorem41_bound(y, g, g, None, -1)


def _functions() -> dict[str, Callable[..., Any]]:
    from lightning_bn import create_norm_layer

    return {"create_norm_layer": create_norm_layer}


# Issue 14: more constructors and functions of the public API; none repeats a case above.
MORE: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], type[Exception], str]] = [
    # the diagnostic callbacks
    (ICSCallback, (), {"every_n_steps": "10"}, ArgumentTypeError, "every_n_steps"),
    (ICSCallback, (), {"every_n_steps": None}, ArgumentTypeError, "every_n_steps"),
    (ICSCallback, (), {"distributional": None}, ArgumentTypeError, "distributional"),
    (ICSCallback, (), {"layers": [3]}, TypeError, "layers"),
    (ICSCallback, (), {"loss_fn": 5}, TypeError, "loss_fn"),
    (ICSCallback, (), {"name": ""}, ValueError, "name"),
    (ICSCallback, (), {"name": "a/b"}, ValueError, "name"),
    (ICSCallback, (), {"name": 3}, ArgumentTypeError, "name"),
    (LipschitzCallback, (), {"step_sizes": []}, ValueError, "step_sizes"),
    (LipschitzCallback, (), {"step_sizes": [1.0, -1.0]}, ValueError, "step_sizes"),
    (LipschitzCallback, (), {"step_sizes": ["a"]}, TypeError, "step_sizes"),
    (LipschitzCallback, (), {"relative_to_lr": 0}, ArgumentTypeError, "relative_to_lr"),
    (LipschitzCallback, (), {"every_n_steps": 1.5}, ArgumentTypeError, "every_n_steps"),
    (SmoothnessCallback, (), {"seed": True}, ArgumentTypeError, "seed"),
    (SmoothnessCallback, (), {"seed": None}, ArgumentTypeError, "seed"),
    (SmoothnessCallback, (), {"tol": "small"}, ArgumentTypeError, "tol"),
    (SmoothnessCallback, (), {"max_iters": 2.5}, ArgumentTypeError, "max_iters"),
    (SmoothnessCallback, (), {"relative_to_lr": "no"}, ArgumentTypeError, "relative_to_lr"),
    (SmoothnessCallback, (), {"hessian": 1}, ArgumentTypeError, "hessian"),
    (NoiseInjectionCallback, (), {"seed": 2**70}, ValueError, "seed"),
    (NoiseInjectionCallback, (), {"seed": "x"}, ArgumentTypeError, "seed"),
    (NoiseInjectionCallback, (), {"seed": -5}, ValueError, "seed"),
    (
        NoiseInjectionCallback,
        (),
        {"log_every_n_steps": True},
        ArgumentTypeError,
        "log_every_n_steps",
    ),
    (NoiseInjectionCallback, (), {"mean_range": -0.1}, ValueError, "mean_range"),
    (NoiseInjectionCallback, (), {"std_range": 0.5}, ValueError, "std_range"),
    (NoiseInjectionCallback, (), {"std_jitter": True}, ArgumentTypeError, "std_jitter"),
    (NoiseInjectionCallback, (), {"targets": []}, ValueError, "targets"),
    (NoiseInjectionCallback, (), {"targets": 5}, TypeError, "targets"),
    # layers
    (BatchNorm, (3,), {"affine": "yes"}, ArgumentTypeError, "affine"),
    (BatchNorm, (3,), {"track_running_stats": 1}, ArgumentTypeError, "track_running_stats"),
    (BatchNorm, (3,), {"channels_last": None}, ArgumentTypeError, "channels_last"),
    (BatchNorm, (3,), {"momentum": 1.5}, ValueError, "momentum"),
    (BatchNorm, (3,), {"eps": -1e-5}, ValueError, "eps"),
    (BatchNorm, (-1,), {}, ValueError, "num_features"),
    (BatchNorm, (3.0,), {}, ArgumentTypeError, "num_features"),
    (L1Norm, (3,), {"centered_divisor": "no"}, ArgumentTypeError, "centered_divisor"),
    (LpNorm, (3,), {"p": 3}, ValueError, "p"),
    (LpNorm, (3,), {"p": True}, ValueError, "p"),
    (LayerNorm, (0,), {}, ValueError, "num_features"),
    (LayerNorm, (4,), {"affine": 1}, ArgumentTypeError, "affine"),
    (LayerNorm, (4,), {"channels_last": "last"}, ArgumentTypeError, "channels_last"),
    (LayerNorm, (4,), {"eps": math.nan}, ValueError, "eps"),
    ("create_norm_layer", ("none", -1), {}, ValueError, "num_features"),
    ("create_norm_layer", ("none", True), {}, ArgumentTypeError, "num_features"),
    ("create_norm_layer", ("groupnorm", 4), {}, ValueError, "kind"),
    ("create_norm_layer", (4, 4), {}, TypeError, "kind"),
    # experiments
    (MLP, (), {"in_features": 0}, ValueError, "in_features"),
    (MLP, (), {"in_features": True}, ArgumentTypeError, "in_features"),
    (MLP, (), {"num_classes": 2.0}, ArgumentTypeError, "num_classes"),
    (MLP, (), {"dropout": 1.0}, ValueError, "dropout"),
    (MLP, (), {"hidden": [4, 0]}, ValueError, "hidden"),
    (SmallCNN, (), {"widths": []}, ValueError, "widths"),
    (SmallCNN, (), {"input_size": -8}, ValueError, "input_size"),
    (DeepLinearNetwork, (), {"depth": 0}, ValueError, "depth"),
    (DeepLinearNetwork, (), {"width": False}, ArgumentTypeError, "width"),
    (DeepLinearDataModule, (), {"seed": 2**70}, ValueError, "seed"),
    (DeepLinearDataModule, (), {"n_samples": "100"}, ArgumentTypeError, "n_samples"),
    (DigitsDataModule, (), {"batch_size": 0}, ValueError, "batch_size"),
    (DigitsDataModule, (), {"val_fraction": 1.0}, ValueError, "val_fraction"),
    (DigitsDataModule, (), {"as_images": "yes"}, ArgumentTypeError, "as_images"),
    (DigitsDataModule, (), {"seed": True}, ArgumentTypeError, "seed"),
    (DigitsDataModule, (), {"num_workers": -1}, ValueError, "num_workers"),
    (ClassificationModule, (nn.Linear(2, 2),), {"lr": 0}, ValueError, "lr"),
    (ClassificationModule, (nn.Linear(2, 2),), {"optimizer": "lbfgs"}, ValueError, "optimizer"),
    (ClassificationModule, (nn.Linear(2, 2),), {"momentum": 1.0}, ValueError, "momentum"),
    (ClassificationModule, ("mlp",), {}, TypeError, "model"),
    (RegressionModule, (nn.Linear(2, 2),), {"weight_decay": -1.0}, ValueError, "weight_decay"),
    (RegressionModule, (nn.Linear(2, 2),), {"reduction": "max"}, ValueError, "reduction"),
]


@pytest.mark.parametrize(
    ("target", "args", "kwargs", "error", "name"),
    MORE,
    ids=[f"{getattr(t, '__name__', t)}-{n}-{i}" for i, (t, _, _, _, n) in enumerate(MORE)],
)
def test_more_constructors_reject_bad_arguments(
    target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    call = _functions()[target] if isinstance(target, str) else target
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    assert isinstance(info.value, error)
    assert f"`{name}`" in str(info.value), str(info.value)


def test_noise_seed_overflow_is_refused_before_the_stream() -> None:
    # 2**63 - 1 is the largest seed the stream can hold; one more is refused with a clear message
    assert NoiseInjectionCallback(seed=2**63 - 1).seed == 2**63 - 1
    with pytest.raises(
        ValueError,
        match=r"`seed` to be an integer in \[0, 2\*\*63\), but got 2\*\*63|9223372036854775808",
    ):
        NoiseInjectionCallback(seed=2**63)
