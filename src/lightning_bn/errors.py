"""Every public exception and warning of lightning-bn, importable from one place.

Plain Python (no torch, no Lightning): catching one of these never loads the rest of the package.
The two that belong to a ``lightning-bn reproduce`` run, ``RunFormatError`` (a reproduce folder
that cannot be read, a :class:`LogFormatError`) and ``RunInterrupted``, live with it in
:mod:`lightning_bn.reproduce`.

Example:
    >>> from lightning_bn.errors import ArgumentTypeError
    >>> issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)
    True
"""

from __future__ import annotations

__all__ = [
    "ArgumentTypeError",
    "BatchedFallbackWarning",
    "DiagnosticSkipped",
    "DiagnosticWarning",
    "LogFormatError",
    "NotScalarError",
    "TruncatedLogError",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (also a ``ValueError``, for callers of the older checks)."""


class NotScalarError(TypeError, ValueError):
    """A loss (``training_step``, ``loss_fn``, ``downstream``) did not return a one-element tensor.

    Both a ``TypeError`` (what the probe raised) and a ``ValueError`` (what the Hessian-vector
    products and Theorem 4.1 raised), so callers of either keep working.
    """


class DiagnosticWarning(UserWarning):
    """A diagnostic measurement was skipped; training went on untouched."""


class DiagnosticSkipped(RuntimeError):
    """Raised on every rank when a diagnostic pass failed on some rank.

    See :meth:`lightning_bn.probe.Collective.guard`.
    """


class BatchedFallbackWarning(UserWarning):
    """A probe could not evaluate its grid under ``vmap`` and evaluates it sequentially."""


class LogFormatError(ValueError):
    """A run cannot be read: the message is one line naming the file and the problem."""


class TruncatedLogError(LogFormatError):
    """The file ends inside a row: its writer stopped mid-way (an interrupted run)."""
