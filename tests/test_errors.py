"""Every public exception and warning lives in `lightning_bn.errors` and keeps its old paths."""

from __future__ import annotations

import importlib
import warnings

import pytest

from lightning_bn import errors


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("lightning_bn", "DiagnosticWarning"),
        ("lightning_bn.callbacks", "DiagnosticWarning"),
        ("lightning_bn.callbacks.base", "DiagnosticWarning"),
        ("lightning_bn.probe", "DiagnosticSkipped"),
        ("lightning_bn.probe.batched", "BatchedFallbackWarning"),
        ("lightning_bn._validation", "ArgumentTypeError"),
        ("lightning_bn.logging.csv_log", "LogFormatError"),
        ("lightning_bn.logging.csv_log", "TruncatedLogError"),
        ("lightning_bn.batched", "BatchedFallbackWarning"),
        ("lightning_bn.csv_log", "LogFormatError"),
    ],
)
def test_old_paths_give_the_same_class(module: str, name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the moved modules warn; see below
        value = getattr(importlib.import_module(module), name)
    assert value is getattr(errors, name)


def test_every_public_exception_and_warning_is_in_errors() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert isinstance(cls, type) and issubclass(cls, Exception), name
        assert cls.__module__ == "lightning_bn.errors", name


def test_not_scalar_is_one_type_for_every_loss() -> None:
    import torch

    from lightning_bn._types import scalar_loss
    from lightning_bn.diagnostics.hvp import hvp

    params = {"w": torch.ones(3)}
    with pytest.raises(errors.NotScalarError, match="`loss_fn` to be a scalar tensor, but got"):
        hvp(lambda p: p["w"] * 2, params, {"w": torch.ones(3)})
    with pytest.raises(TypeError, match=r"scalar tensor, but got \(2,\)"):
        scalar_loss(torch.ones(2))
    with pytest.raises(ValueError, match="but got str"):
        scalar_loss("loss")
    assert scalar_loss(torch.full((1, 1), 3.0)).shape == ()
