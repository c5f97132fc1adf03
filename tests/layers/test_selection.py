"""The module selector: names, globs, types, a default, ``within`` and the errors."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest
from torch import nn

from lightning_bn.layers.selection import (
    check_selectors,
    describe_modules,
    match_modules,
    select_modules,
    selector_repr,
)


def _net() -> nn.Module:
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU())
    return nn.Sequential(
        nn.ModuleDict({"stem": nn.Linear(3, 4), "body": block}),
        nn.LayerNorm(4),
        nn.Linear(4, 2),
    )


def _names(pairs: list[tuple[str, nn.Module]]) -> list[str]:
    return [name for name, _ in pairs]


def test_names_globs_and_types_select_a_union_in_registration_order() -> None:
    net = _net()
    # an exact name, a glob and a type; the result is in named_modules() order, each module once
    chosen = select_modules(net, ["2", "0.body.*", nn.LayerNorm, nn.Linear])
    assert _names(chosen) == ["0.stem", "0.body.0", "0.body.1", "0.body.2", "1", "2"]
    assert all(module is net.get_submodule(name) for name, module in chosen)
    # the reference: fnmatchcase on every qualified name
    everything = [n for n, _ in net.named_modules() if n]
    assert _names(select_modules(net, ["*.?"])) == [
        n for n in everything if fnmatch.fnmatchcase(n, "*.?")
    ]


def test_globs_are_case_sensitive_and_match_whole_names() -> None:
    selection = match_modules(_net(), ["0.Stem", "stem", "0.stem"])
    assert _names(selection.modules) == ["0.stem"]
    assert selection.unmatched == ("0.Stem", "stem")


def test_default_is_used_only_without_selectors() -> None:
    net = _net()
    assert _names(select_modules(net, None, default=(nn.Linear,))) == ["0.stem", "0.body.0", "2"]
    assert select_modules(net, None) == []  # no default: nothing
    # explicit selectors replace the default
    assert _names(select_modules(net, [nn.ReLU], default=(nn.Linear,))) == ["0.body.2"]
    assert match_modules(net, None, default=(nn.Conv2d,)).unmatched == ()


def test_within_narrows_and_root_only_when_asked() -> None:
    net = _net()
    chosen = select_modules(net, ["0.*", "1"], within=(nn.BatchNorm1d, nn.LayerNorm))
    assert _names(chosen) == ["0.body.1", "1"]
    norm = nn.BatchNorm1d(3)
    assert select_modules(norm, None, default=(nn.BatchNorm1d,)) == []
    assert select_modules(norm, None, default=(nn.BatchNorm1d,), include_root=True) == [("", norm)]


def test_selectors_matching_nothing_are_reported_and_raise() -> None:
    net = _net()
    selection = match_modules(net, ["nothing.*", nn.Linear, nn.Conv2d])
    assert selection.unmatched == ("nothing.*", nn.Conv2d)
    assert _names(selection.modules) == ["0.stem", "0.body.0", "2"]
    with pytest.raises(
        ValueError,
        match=r"but 'nothing\.\*', torch\.nn\.modules\.conv\.Conv2d matched none\. "
        r"The model contains: 0 \(ModuleDict\), 0\.stem \(Linear\)",
    ):
        select_modules(net, ["nothing.*", nn.Linear, nn.Conv2d])
    # `within` does not hide a selector that matched nothing
    with pytest.raises(ValueError, match=r"but 'zzz' matched none"):
        select_modules(net, ["zzz", "2"], within=(nn.LayerNorm,))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("a.*", ("a.*",)),
        (nn.Linear, (nn.Linear,)),
        (["a", nn.ReLU], ("a", nn.ReLU)),
        (("a",), ("a",)),
    ],
)
def test_check_selectors_accepts(value: Any, expected: Any) -> None:
    assert check_selectors(value) == expected


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ([], ValueError, r"Expected argument `layers` to name at least one module, but got \[\]"),
        ([""], ValueError, r"`layers` to hold non-empty glob strings, but got ''"),
        ([nn.ReLU()], TypeError, r"`layers` to hold glob strings or nn.Module subclasses"),
        ([int], TypeError, r"nn.Module subclasses, but got <class 'int'>"),
        (3, TypeError, r"`layers` to be None, a glob string, an nn.Module subclass or a sequence"),
    ],
)
def test_check_selectors_rejects(value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_selectors(value, "layers")


def test_reprs_for_messages_and_state_keys() -> None:
    assert selector_repr("a.*") == "a.*"
    assert selector_repr(nn.Linear) == "torch.nn.modules.linear.Linear"
    assert describe_modules(nn.ReLU()) == "no submodules (the root is ReLU)"
    many = nn.Sequential(*[nn.ReLU() for _ in range(5)])
    assert describe_modules(many, limit=2) == "0 (ReLU), 1 (ReLU), … and 3 more"
