"""The shared argument checks, and the constructors that use them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_bn import (
    BatchNorm,
    ICSCallback,
    L1Norm,
    LipschitzCallback,
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
