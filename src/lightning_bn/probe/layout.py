"""How a probe puts a parameter point into a module and keeps its evaluation from leaving traces.

Plain torch. :class:`Layout` finds every parameter and buffer slot of a module once;
:class:`Silenced` shadows ``self.log`` and saves and restores torchmetrics metrics around an
evaluation; :class:`UseTrace` records the order in which a forward pass first uses each parameter;
:func:`loss_from_output` reads the loss out of what ``training_step`` returned.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torchmetrics import Metric

from lightning_bn.probe.record import _PROBE_DEPTH

__all__ = ["Layout", "Silenced", "UseTrace", "loss_from_output"]


_METRIC_BOOKKEEPING = ("_update_count", "_computed", "_forward_cache", "_update_called")


class Silenced:
    """Keep a probe from leaving traces outside the model.

    ``module.log`` / ``module.log_dict`` are shadowed with no-ops (instance attributes), and
    every :class:`torchmetrics.Metric` inside the module is saved and restored, so a metric
    updated in ``training_step`` does not count probe passes: its states (``metric_state``,
    copied, since updates add in place) and the bookkeeping that ``forward``/``update`` change
    besides them (:data:`_METRIC_BOOKKEEPING`; torchmetrics has no public setter for these).
    """

    _NAMES = ("log", "log_dict")

    def __init__(self, module: nn.Module, metrics: list[Metric]) -> None:
        self.module = module
        self.metrics = metrics
        self.installed: list[str] = []
        self.saved: list[tuple[Metric, dict[str, Any], dict[str, Any]]] = []
        self._token: contextvars.Token[int] | None = None

    def __enter__(self) -> None:
        self._token = _PROBE_DEPTH.set(_PROBE_DEPTH.get() + 1)  # `in_probe()` is True
        for name in self._NAMES:
            if callable(getattr(self.module, name, None)) and name not in self.module.__dict__:
                object.__setattr__(self.module, name, _noop)
                self.installed.append(name)
        for m in self.metrics:
            states = {k: _copy_state(v) for k, v in m.metric_state.items()}
            extra = {k: _copy_state(m.__dict__[k]) for k in _METRIC_BOOKKEEPING if k in m.__dict__}
            self.saved.append((m, states, extra))

    def __exit__(self, *exc: object) -> None:
        for name in self.installed:
            object.__delattr__(self.module, name)
        self.installed.clear()
        for m, states, extra in self.saved:
            for name, value in states.items():
                setattr(m, name, value)  # add_state attributes are plain attributes
            m.__dict__.update(extra)
        self.saved.clear()
        if self._token is not None:
            _PROBE_DEPTH.reset(self._token)
            self._token = None


class Layout:
    """What a probe needs to know of the module's structure, gathered once per probe.

    Every buffer by its qualified name with its owner (read at each evaluation, so an in-place
    update or a reassignment is seen), the torchmetrics metrics to save and restore, whether any
    parameter or buffer is shared, and where every parameter and buffer lives: for each name of
    ``named_parameters()`` / ``named_buffers()`` the ``(dict, key)`` slots of all its aliases
    (a tied weight has several), so that :meth:`swapped` can put a parameter point into the
    module with plain dict writes.
    """

    def __init__(self, module: nn.Module) -> None:
        # one entry per buffer tensor, under its name in `named_buffers()` (a shared submodule or
        # a tensor registered twice is one buffer; `slots` holds all its aliases)
        self.buffers: list[tuple[str, nn.Module, str]] = []
        seen: set[int] = set()
        for prefix, owner in module.named_modules():
            for attr, buf in owner._buffers.items():
                if buf is not None and id(buf) not in seen:
                    seen.add(id(buf))
                    self.buffers.append((f"{prefix}.{attr}" if prefix else attr, owner, attr))
        self.metrics = [m for m in module.modules() if isinstance(m, Metric)]
        canonical = {id(t): n for n, t in module.named_parameters()}
        canonical.update({id(t): n for n, t in module.named_buffers()})
        # the module tree and the tensor in every slot as gathered (`stale` compares them), and
        # the slots of every parameter and buffer by its canonical name
        self.edges: list[tuple[dict[str, Any], str, nn.Module | None]] = []
        self.contents: list[tuple[dict[str, Any], str, Any]] = []
        self.slots: dict[str, list[tuple[dict[str, Any], str]]] = {}
        for _, owner in module.named_modules(remove_duplicate=False):
            self.edges.extend(
                (owner._modules, attr, child) for attr, child in owner._modules.items()
            )
            for store in (owner._parameters, owner._buffers):
                for attr, tensor in store.items():
                    self.contents.append((store, attr, tensor))
                    name = canonical.get(id(tensor)) if tensor is not None else None
                    if name is not None:
                        self.slots.setdefault(name, []).append((store, attr))

    def stale(self) -> bool:
        """Whether the module changed since the layout was gathered: a submodule replaced (a new
        head, a swapped layer), a parameter or buffer reassigned or tied anew. A few identity
        checks per module, cheap next to a forward pass."""
        return any(store.get(attr) is not child for store, attr, child in self.edges) or any(
            store.get(attr) is not tensor for store, attr, tensor in self.contents
        )

    def current_buffers(self) -> dict[str, Tensor]:
        """Every buffer the module holds now, by qualified name (the tensors, not copies)."""
        out: dict[str, Tensor] = {}
        for name, owner, attr in self.buffers:
            buf = owner._buffers.get(attr)
            if buf is not None:
                out[name] = buf
        return out

    def fresh_buffers(self) -> dict[str, Tensor]:
        """A copy of every buffer (running statistics of the probe pass land in the copies)."""
        return {name: buf.clone() for name, buf in self.current_buffers().items()}

    def knows(self, names: Iterable[str]) -> bool:
        """Whether every name is a parameter or buffer of the module as gathered."""
        return all(n in self.slots for n in names)

    @contextlib.contextmanager
    def swapped(self, state: Mapping[str, Tensor]) -> Iterator[None]:
        """The module with the tensors of ``state`` in place of its parameters and buffers.

        What :func:`torch.func.functional_call` does (every alias of a tied tensor gets the
        new tensor, the originals come back afterwards, also on an exception), with the owners
        looked up once per layout instead of by qualified name on every call: on a small model
        that look-up cost about a third of a forward pass. Every name must be known
        (:meth:`knows`).
        """
        saved: list[tuple[dict[str, Any], str, Any]] = []
        try:
            for name, tensor in state.items():
                for store, attr in self.slots[name]:
                    saved.append((store, attr, store[attr]))
                    store[attr] = tensor
            yield
        finally:
            for store, attr, original in reversed(saved):
                store[attr] = original

    def put(self, state: Mapping[str, Tensor]) -> None:
        """Inside :meth:`swapped`: put ``state``'s tensors back into their slots (a forward pass
        that reassigned a buffer, ``self.ema = ...``, must not hand it to the next point)."""
        for name, tensor in state.items():
            for store, attr in self.slots[name]:
                store[attr] = tensor


def _copy_state(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copy_state(v) for v in value]
    return value


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def loss_from_output(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise TypeError(
        "Expected `training_step` to return a loss tensor or a dict with a 'loss' tensor, "
        f"but got {type(output).__name__}; pass `loss_fn` to the callback instead"
    )


class UseTrace(TorchFunctionMode):
    """Record the first use of each parameter tensor of a ``functional_call`` state.

    Identity (``id``) of the tensors handed to ``functional_call`` names them: inside the call
    the module's attributes are these very tensors. Only calls that return a tensor count.
    """

    def __init__(self, state: Mapping[str, Tensor], names: Sequence[str]) -> None:
        super().__init__()
        wanted = set(names)
        self.ids = {
            id(t): n
            for key, t in state.items()
            if (n := key.removeprefix("module.")) in wanted and isinstance(t, Tensor)
        }
        self.order: list[str] = []
        self.seen: set[str] = set()
        # call index of each parameter's first and last use (a tied weight is used twice or more)
        self.spans: dict[str, tuple[int, int]] = {}
        self._calls = 0

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # `.size()` returns a tuple of ints, `.shape`/`.dtype` no tensor: metadata, not a use
        if isinstance(out, Tensor) or (
            isinstance(out, (tuple, list)) and any(isinstance(o, Tensor) for o in out)
        ):
            self._calls += 1
            for leaf in tree_flatten((args, kwargs))[0]:
                name = self.ids.get(id(leaf)) if isinstance(leaf, Tensor) else None
                if name is None:
                    continue
                self.spans[name] = (self.spans.get(name, (self._calls, 0))[0], self._calls)
                if name not in self.seen:
                    self.seen.add(name)
                    self.order.append(name)
        return out
