"""Argument checks shared by every public constructor and function (plain Python, no torch).

One place for the checks that used to be written out at each call site, with messages in the
torchmetrics style that name the argument and the value::

    Expected argument `every_n_steps` to be a positive integer, but got 0

Numbers reject ``bool`` (``True`` is an ``int`` to Python, never a count or a rate here) and
flags reject anything but ``bool`` (``"no"`` is truthy). A value of the wrong type raises
:class:`ArgumentTypeError`, which is both a :class:`TypeError` and a :class:`ValueError`: the
checks it replaced raised ``ValueError`` for every bad value, and callers that catch that keep
working; a value of the right type out of range raises :class:`ValueError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeVar, overload

from lightning_bn.errors import ArgumentTypeError

__all__ = [
    "ArgumentTypeError",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_step_sizes",
]

_T = TypeVar("_T")


def _fail(name: str, expected: str, value: Any, error: type[Exception] = ValueError) -> Exception:
    return error(f"Expected argument `{name}` to be {expected}, but got {value!r}")


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if maximum is None:
        if minimum is None:
            return "an integer"
        if minimum == 1:
            return "a positive integer"
        return f"an integer >= {minimum}"
    if minimum is None:
        return f"an integer <= {maximum}"
    if maximum >= 2**16 and (maximum + 1) & maximum == 0:  # 2**63 - 1 reads as "[0, 2**63)"
        return f"an integer in [{minimum}, 2**{maximum.bit_length()})"
    return f"an integer in [{minimum}, {maximum}]"


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) in ``[minimum, maximum]``.

    Raises:
        ArgumentTypeError: ``value`` is not an ``int`` or is a ``bool``.
        ValueError: ``value`` is out of range.
    """
    expected = _int_range(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, expected, value, ArgumentTypeError)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(name, expected, value)
    return value


@overload
def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = ...,
    maximum: float | None = ...,
    finite: bool = ...,
    optional: Literal[False] = ...,
) -> float: ...
@overload
def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = ...,
    maximum: float | None = ...,
    finite: bool = ...,
    optional: bool,
) -> float | None: ...
def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    finite: bool = True,
    optional: bool = False,
) -> float | None:
    """Return ``float(value)`` if it is an ``int`` or ``float`` (not a ``bool``), not NaN, finite
    unless ``finite=False``, and in ``[minimum, maximum]``; with ``optional``, ``None`` passes.

    Raises:
        ArgumentTypeError: ``value`` is not a real number or is a ``bool``.
        ValueError: NaN, infinite (with ``finite``) or out of range.
    """
    expected = "a finite number" if finite else "a number"
    if minimum is not None and maximum is not None:
        expected += f" in [{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        expected += f" >= {minimum:g}"
    elif maximum is not None:
        expected += f" <= {maximum:g}"
    if optional:
        if value is None:
            return None
        expected = f"None or {expected}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, expected, value, ArgumentTypeError)
    number = float(value)
    if (
        math.isnan(number)
        or (finite and math.isinf(number))
        or (minimum is not None and number < minimum)
        or (maximum is not None and number > maximum)
    ):
        raise _fail(name, expected, value)
    return number


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``.

    Raises:
        ArgumentTypeError: anything else (``0``, ``"no"``, ``None``: truthiness is not a flag).
    """
    if not isinstance(value, bool):
        raise _fail(name, "a bool", value, ArgumentTypeError)
    return value


def check_choice(name: str, value: _T, choices: Iterable[Any]) -> _T:
    """Return ``value`` if it equals one of ``choices``.

    Raises:
        ValueError: ``value`` is none of them (the message lists them in order).
    """
    options = tuple(choices)
    # ``True in (1, 2)`` holds in Python: a bool is only ever a choice among bools
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in options):
        ok = False
    else:
        try:
            ok = value in options
        except (TypeError, ValueError, RuntimeError):  # e.g. a tensor: no single truth value
            ok = False
    if not ok:
        raise _fail(name, f"one of {', '.join(map(repr, options))}", value)
    return value


def check_step_sizes(step_sizes: Sequence[float] | None) -> tuple[float, ...] | None:
    """Return ``step_sizes`` as a tuple of floats (``None`` stays ``None``: the default grid).

    Raises:
        TypeError: not a sequence of numbers.
        ValueError: empty, or a value that is not positive and finite.
    """
    if step_sizes is None:
        return None
    try:
        grid = tuple(float(s) for s in step_sizes)
    except (TypeError, ValueError):
        raise TypeError(
            f"Expected argument `step_sizes` to be a sequence of numbers, but got {step_sizes!r}"
        ) from None
    if not grid or any(not (math.isfinite(s) and s > 0) for s in grid):
        raise ValueError(
            "Expected argument `step_sizes` to be a non-empty sequence of positive finite numbers,"
            f" but got {step_sizes!r}"
        )
    return grid
