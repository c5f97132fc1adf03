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
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict, TypeVar, overload

from typing_extensions import Unpack

from lightning_bn.errors import ArgumentTypeError

__all__ = [
    "MAX_STEP_SIZE",
    "ArgumentTypeError",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_selection",
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


class FloatBounds(TypedDict, total=False):
    """The bounds of :func:`check_float`: ``minimum``, ``maximum`` (``None``: none) and ``finite``."""

    minimum: float | None
    maximum: float | None
    finite: bool


@overload
def check_float(
    name: str, value: Any, *, optional: Literal[False] = ..., **bounds: Unpack[FloatBounds]
) -> float: ...
@overload
def check_float(
    name: str, value: Any, *, optional: bool, **bounds: Unpack[FloatBounds]
) -> float | None: ...
def check_float(
    name: str, value: Any, *, optional: bool = False, **bounds: Unpack[FloatBounds]
) -> float | None:
    """Return ``float(value)`` if it is an ``int`` or ``float`` (not a ``bool``), not NaN, finite
    unless ``finite=False``, and in ``[minimum, maximum]``; with ``optional``, ``None`` passes.

    Raises:
        ArgumentTypeError: ``value`` is not a real number or is a ``bool``.
        ValueError: NaN, infinite (with ``finite``) or out of range.
    """
    minimum, maximum = bounds.get("minimum"), bounds.get("maximum")
    finite = bounds.get("finite", True)
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


#: The largest step size a grid may hold. Steps are multiples of the learning rate (or absolute
#: steps); at a million learning rates the point :math:`W - \eta g` is far outside the region a
#: loss landscape along the gradient describes, and beyond it the moved weights overflow float16
#: (largest value 65504) for any gradient entry above ~0.07 and float32 soon after: the losses
#: there are ``inf``/NaN, not a measurement.
MAX_STEP_SIZE = 1e6


def check_selection(
    name: str, value: Any, module_type: type, type_name: str = "torch.nn.Module"
) -> list[Any] | None:
    """Return a selection of modules as a list: ``None`` stays ``None`` (the default layers); a
    name (a glob such as ``"encoder.*"``) or a subclass of ``module_type`` stands for a list of
    one; otherwise a non-empty sequence of these.

    Raises:
        ArgumentTypeError: not ``None``, a name, a type or a sequence of them (``123``, a dict,
            an entry that is an instance rather than a type).
        ValueError: an empty sequence (``None`` is the way to ask for the default layers).
    """
    expected = f"None, a module name (glob) or a {type_name} subclass, or a non-empty list of these"
    if value is None:
        return None
    if isinstance(value, (str, type)):
        value = [value]
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise _fail(name, expected, value, ArgumentTypeError)
    items = list(value)
    for item in items:
        if not (
            isinstance(item, str) or (isinstance(item, type) and issubclass(item, module_type))
        ):
            raise ArgumentTypeError(
                f"Expected argument `{name}` to be {expected}, but got {value!r}"
                f" (the entry {item!r} is neither a name nor a {type_name} subclass)"
            )
    if not items:
        raise ValueError(
            f"Expected argument `{name}` to be {expected}, but got {value!r} (pass None for the"
            " default layers)"
        )
    return items


def check_step_sizes(step_sizes: Any) -> tuple[float, ...] | None:
    """Return ``step_sizes`` as a tuple of floats (``None`` stays ``None``: the default grid).

    A grid is a list or tuple (or any other sequence, a numpy array or a 1-d tensor) of real
    numbers; a string (``"123"``), a mapping, a set and ``bool`` entries are refused, as they
    would silently become a grid of their characters, keys or ones.

    Raises:
        TypeError: not a sequence of real numbers.
        ValueError: empty, or a value that is not positive, finite and at most
            :data:`MAX_STEP_SIZE`.
    """
    if step_sizes is None:
        return None
    expected = "a non-empty sequence of positive finite numbers"
    if isinstance(step_sizes, (str, bytes, Mapping, set, frozenset)) or not isinstance(
        step_sizes, Iterable
    ):
        raise ArgumentTypeError(
            f"Expected argument `step_sizes` to be {expected} (a list or tuple), but got"
            f" {step_sizes!r}"
        )
    values = list(step_sizes)
    grid: list[float] = []
    for value in values:
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy or torch scalar
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArgumentTypeError(
                f"Expected argument `step_sizes` to be {expected}, but got {step_sizes!r}"
                f" (the entry {value!r} is not a real number)"
            )
        grid.append(float(value))
    if not grid:
        raise ValueError(f"Expected argument `step_sizes` to be {expected}, but got {step_sizes!r}")
    for s in grid:
        if not (math.isfinite(s) and 0 < s <= MAX_STEP_SIZE):
            raise ValueError(
                f"Expected argument `step_sizes` to be {expected} at most {MAX_STEP_SIZE:g}, but got"
                f" {step_sizes!r} (the entry {s!r}"
                + (
                    " moves the weights past the float range)"
                    if math.isfinite(s) and s > 0
                    else " is not positive and finite)"
                )
            )
    return tuple(grid)
