"""The argument descriptions the diagnostic callbacks share, written once.

A callback's docstring names a shared entry with a line holding only ``%(entry)s`` (the
convention of MNE-Python's ``fill_doc`` and matplotlib's ``_docstring.interpd``); :func:`fill_doc`
replaces that line with the entry's text at the line's indentation, continuation lines indented
four more, as Google-style argument lists are. ``{cls}`` and ``{key}`` in an entry become the
class's name and its key base (``ics``, ``lipschitz``): the ``name=`` argument, for one, is the
same rule with other words. Only the placeholders are replaced, so a ``%`` elsewhere in a
docstring (``global_step % every_n_steps``) stays as it is.

Plain Python.
"""

from __future__ import annotations

import re
from typing import TypeVar

__all__ = ["ENTRIES", "fill_doc"]

T = TypeVar("T", bound=type)

ENTRIES: dict[str, str] = {
    "every_n_steps": """\
every_n_steps: ``"auto"`` (default) measures whenever the Trainer's shared budget says
    its turn has come, the first time once the budget covers its a-priori cost (more
    often early; see :mod:`lightning_bn.callbacks.schedule`); an ``int`` measures when
    ``global_step % every_n_steps == 0``.""",
    "budget": """\
budget: the share of training time of *all* the Trainer's diagnostic callbacks
    together, in (0, 1]; ``None`` (default) for 0.04, or the value another of them gives.""",
    "step_sizes": """\
step_sizes: the grid; ``None`` for the default above.
relative_to_lr: ``step_sizes`` are multiples of each parameter group's current learning
    rate (else absolute, the same for every parameter).""",
    "loss_fn": """\
loss_fn: ``loss_fn(module, batch) -> Tensor``; default the module's ``training_step``
    (tensor or dict with ``"loss"``), its ``self.log`` calls silenced during the passes.""",
    "hvp_method": """\
hvp_method: ``"reverse"`` (default: reverse-over-reverse on a kept first-order graph, the
    fastest here), ``"auto"`` (``torch.func`` forward-over-reverse with a
    reverse-over-reverse fallback) or ``"forward"``.""",
    "name": """\
name: tells several {cls}s in one Trainer apart: keys ``{key}@<name>/...``
    (unnamed ones get ``{key}@1/...``, ``{key}@2/...``).""",
    "raises": """\
ValueError: bad arguments; at setup, manual optimisation or gradient accumulation (a
    measurement is one optimiser step on one batch: both are refused rather than measured
    wrongly).
NotImplementedError: at setup, a strategy that shards parameters (FSDP, DeepSpeed).""",
}

_PLACEHOLDER = re.compile(r"^( *)%\((\w+)\)s$", re.MULTILINE)


def fill_doc(cls: T) -> T:
    """Replace each ``%(entry)s`` line of ``cls.__doc__`` with :data:`ENTRIES` ``[entry]``.

    Raises:
        KeyError: a placeholder naming no entry (a typo is caught when the class is defined).

    Example:
        >>> @fill_doc
        ... class ToyCallback:
        ...     '''Args:
        ...         %(budget)s
        ...     '''
        ...     key_base = "toy"
        >>> print(ToyCallback.__doc__.splitlines()[2].strip())
        together, in (0, 1]; ``None`` (default) for 0.04, or the value another of them gives.
    """
    key = str(getattr(cls, "key_base", cls.__name__.lower()))

    def expand(match: re.Match[str]) -> str:
        indent, entry = match.group(1), match.group(2)
        text = ENTRIES[entry].format(cls=cls.__name__, key=key)
        return "\n".join(indent + line if line else line for line in text.splitlines())

    if cls.__doc__:
        cls.__doc__ = _PLACEHOLDER.sub(expand, cls.__doc__)
    return cls
