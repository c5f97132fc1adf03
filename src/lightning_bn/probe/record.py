"""What a probe needs of one training step: the batch (copied per evaluation), the random state.

Plain torch. :func:`in_probe` tells user code whether it runs inside a probe's evaluation.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import Tensor

from lightning_bn._types import Params

__all__ = ["RNGState", "StepRecord", "accepts_batch_triple", "copy_batch", "in_probe"]


_PROBE_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("lightning_bn_probe", default=0)


def in_probe() -> bool:
    """Whether the calling code runs inside a diagnostic probe's evaluation of the model.

    Diagnostic callbacks evaluate the module's ``training_step`` (or ``loss_fn``) several times
    per measured step, at parameter points that are not the model's. ``self.log`` calls and
    torchmetrics metrics are already silenced there, and the batch is a private copy; anything
    else the step does on the side (a counter, a cache, a print, a file) the user can skip with
    this function. It is ``False`` during the real training step.

    Example:
        >>> from lightning_bn import in_probe
        >>> in_probe()
        False
    """
    return _PROBE_DEPTH.get() > 0


def copy_batch(batch: Any) -> Any:
    """A copy of ``batch`` in which every tensor is a new tensor (``clone``), at any nesting.

    Tuples, lists, dicts (any ``Mapping`` whose type can be rebuilt from its items), named tuples
    and dataclass instances are rebuilt around copied contents; other objects (numbers, strings,
    ``None``, anything else) are shared, as they are in the original. A probe evaluates the
    training step on such a copy, so an in-place change of the batch (``x.div_(2)``) stays in
    the copy.

    Example:
        >>> x = torch.ones(2)
        >>> out = copy_batch({"x": x, "meta": ["id", (x, 3)]})
        >>> _ = out["x"].div_(2)
        >>> out["meta"][1][0] is x, x.tolist()
        (False, [1.0, 1.0])
    """
    if isinstance(batch, Tensor):
        return batch.clone()
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        out = copy.copy(batch)  # keeps fields with init=False and works for frozen dataclasses
        for f in dataclasses.fields(batch):
            if hasattr(batch, f.name):
                object.__setattr__(out, f.name, copy_batch(getattr(batch, f.name)))
        return out
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(copy_batch(v) for v in batch))
    if isinstance(batch, (tuple, list)):
        items = [copy_batch(v) for v in batch]
        if type(batch) in (tuple, list):
            return type(batch)(items)
        try:
            return type(batch)(items)
        except TypeError:
            return tuple(items) if isinstance(batch, tuple) else items
    if isinstance(batch, Mapping):
        pairs = [(k, copy_batch(v)) for k, v in batch.items()]
        if type(batch) is dict or not isinstance(batch, MutableMapping):
            return dict(pairs)
        copied: MutableMapping[Any, Any] = copy.copy(batch)  # OrderedDict, BatchEncoding, ...
        for k, v in pairs:
            copied[k] = v
        return copied
    return batch


@dataclass
class RNGState:
    """The global random state at one moment: torch's (the CPU and every visible CUDA device),
    Python's :mod:`random` and numpy's legacy :mod:`numpy.random` (``np.random.rand``, ...).

    A probe replays this state before each evaluation of the training step and restores the state
    that was current afterwards, so a step that draws from any of the three (dropout, a mixup
    coefficient from ``np.random.beta``, a crop offset from ``random.randint``) sees the real
    step's draws, and the real step is unaffected by the probes. Generators the user creates
    (``torch.Generator``, ``np.random.default_rng()``) are objects of the user's, not global state,
    and are neither replayed nor restored.

    Example:
        >>> state = RNGState.capture()
        >>> with state.replay():
        ...     a = (torch.rand(1).item(), float(np.random.rand()), random.random())
        >>> with state.replay():
        ...     b = (torch.rand(1).item(), float(np.random.rand()), random.random())
        >>> a == b
        True
    """

    cpu: Tensor
    cuda: list[Tensor] = field(default_factory=list)
    python: Any = None
    numpy: Any = None
    _forked: bool = field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def capture(cls) -> RNGState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(
            cpu=torch.get_rng_state(),
            cuda=cuda,
            python=random.getstate(),
            numpy=np.random.get_state(),
        )

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the global state is restored afterwards."""
        with self.fork():
            self.restore()
            yield

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """A block after which the global random state (torch's CPU and this state's CUDA
        devices, Python's and numpy's) is what it was before it; inside, :meth:`restore` may set
        this state any number of times. Inside a fork of the same state, a fork (and so a
        :meth:`replay`) saves nothing: the outer one restores (a measurement forks once for
        all its probe passes; saving and restoring the three states cost about a tenth of a
        small model's forward and backward pass)."""
        if self._forked:
            yield
            return
        python, numpy = random.getstate(), np.random.get_state()
        self._forked = True
        try:
            with torch.random.fork_rng(devices=list(range(len(self.cuda)))):
                yield
        finally:
            self._forked = False
            random.setstate(python)
            np.random.set_state(numpy)

    def restore(self) -> None:
        """Set the global random state to this one (inside :meth:`fork`)."""
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            np.random.set_state(self.numpy)


@dataclass
class StepRecord:
    """What a diagnostic needs of one measured training step, kept between Lightning's hooks.

    Attributes:
        batch: the step's batch, as ``training_step`` receives it.
        batch_idx: its index (passed on to ``training_step``).
        rng: the random state at the start of the step (replayed so probes see the step's dropout
            masks), or ``None`` to use the current state.
        step: the trainer's ``global_step`` of the measured step (the step metrics are logged at;
            the diagnostic callbacks also show it to the module during probes).
        epoch: the trainer's ``current_epoch`` at the measured step.
        before: the weights :math:`W^t` before the optimiser step, for diagnostics that compare
            them with :math:`W^{t+1}` (ICS); ``None`` when not kept.

    Example:
        >>> record = StepRecord(batch=(torch.randn(4, 3), torch.randn(4, 1)), rng=RNGState.capture())
        >>> record.batch_idx, record.step, record.before is None
        (0, 0, True)
    """

    batch: Any
    batch_idx: int = 0
    rng: RNGState | None = None
    step: int = 0
    before: Params | None = None
    epoch: int = 0

    def forked(self) -> contextlib.AbstractContextManager[None]:
        """One :meth:`RNGState.fork` of :attr:`rng` around a whole measurement (every probe
        inside replays ``rng`` without saving the global state again)."""
        return self.rng.fork() if self.rng is not None else contextlib.nullcontext()


_F = TypeVar("_F", bound=Callable[..., Any])


def accepts_batch_triple(index: int) -> Callable[[_F], _F]:
    """Let a function whose positional argument ``index`` is a :class:`StepRecord` also take
    the older form ``(batch, batch_idx, rng)`` in its place (positional or keywords).

    A bare batch (``fn(..., batch, ...)``) stands for ``StepRecord(batch)``; passing ``batch_idx``
    (an ``int`` right after the batch, or a keyword) and ``rng`` separately still works but is
    deprecated (a :class:`DeprecationWarning`).
    """

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if "batch" in kwargs:
                if len(args) != index:
                    raise TypeError(
                        f"{fn.__name__}(): pass the arguments before `batch` positionally"
                    )
                args = (*args, kwargs.pop("batch"))
            if len(args) <= index or isinstance(args[index], StepRecord):
                return fn(*args, **kwargs)
            rest = list(args[index + 1 :])
            # the old form has an int batch index right after the batch; in the new form what
            # follows the step is never an int (step sizes, `wrt`, a Collective, None)
            positional = bool(rest) and isinstance(rest[0], int) and not isinstance(rest[0], bool)
            legacy = positional or "batch_idx" in kwargs or "rng" in kwargs
            batch_idx = rest.pop(0) if positional else kwargs.pop("batch_idx", 0)
            if positional and rest and (rest[0] is None or isinstance(rest[0], RNGState)):
                rng = rest.pop(0)
            else:
                rng = kwargs.pop("rng", None)
            if legacy:
                warnings.warn(
                    f"{fn.__name__}(..., batch, batch_idx, rng, ...) is deprecated: pass one"
                    " `StepRecord(batch, batch_idx, rng)` instead",
                    DeprecationWarning,
                    stacklevel=2,
                )
            record = StepRecord(batch=args[index], batch_idx=batch_idx, rng=rng)
            return fn(*args[:index], record, *rest, **kwargs)

        return cast(_F, inner)

    return wrap
