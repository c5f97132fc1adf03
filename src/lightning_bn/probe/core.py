"""Evaluate a model's loss and gradients at any parameter point, without touching the model.

Plain torch (no Lightning import). Every diagnostic of this package goes through :class:`Probe`:

- the parameter point and copies of the buffers are put into the module for the evaluation (as
  :func:`torch.func.functional_call` does, with the tensors' owners looked up once per layout)
  and the module's own tensors put back afterwards, so norm layers use batch statistics (train
  mode) and their running statistics stay untouched;
- the random state of the real training step is replayed inside :func:`torch.random.fork_rng`, so
  dropout masks equal the real step's and the training RNG stream is unchanged afterwards;
- ``.grad``, optimiser state and module mode are never changed (gradients come from
  :func:`torch.autograd.grad` on fresh leaf tensors).

The loss is the module's own ``training_step(batch, batch_idx)`` (a tensor or a dict with
``"loss"``), with its ``self.log`` / ``self.log_dict`` calls silenced during probes, unless a
``loss_fn(module, batch) -> Tensor`` is given.

Each evaluation gets its own copy of the batch (:func:`copy_batch`), so a ``training_step`` that
changes its batch in place (``x.div_(2)``) changes neither the real step's batch nor the next
evaluation's. While an evaluation runs, :func:`in_probe` is ``True``: user code can skip side
effects of its own (counters, caches, prints) there.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = [
    "Collective",
    "DiagnosticSkipped",
    "Params",
    "Probe",
    "RNGState",
    "StepRecord",
    "accepts_batch_triple",
    "copy_batch",
    "execution_order",
    "in_probe",
]

#: A parameter point: qualified parameter name -> tensor.
Params = dict[str, Tensor]
LossFn = Callable[[nn.Module, Any], Tensor]


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


class DiagnosticSkipped(RuntimeError):
    """Raised on every rank when a diagnostic pass failed on some rank (see :meth:`Collective.guard`)."""


@dataclass
class RNGState:
    """The random state of the CPU and of every visible CUDA device at one moment."""

    cpu: Tensor
    cuda: list[Tensor] = field(default_factory=list)

    @classmethod
    def capture(cls) -> RNGState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the global state is restored afterwards."""
        with self.fork():
            self.restore()
            yield

    def fork(self) -> contextlib.AbstractContextManager[Any]:
        """A block after which the global random state (CPU and this state's CUDA devices) is
        what it was before it; inside, :meth:`restore` may set this state any number of times."""
        return torch.random.fork_rng(devices=list(range(len(self.cuda))))

    def restore(self) -> None:
        """Set the global random state to this one (inside :meth:`fork`)."""
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)


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


class Collective:
    """Cross-process reductions with DDP semantics (a no-op in a single process).

    ``mean`` averages a tensor over ranks, as DDP averages gradients; ``gather`` concatenates
    tensors along dimension 0 (the union of the ranks' batches). ``guard`` runs a local stage of a
    diagnostic and then agrees on success with every rank, so a failure on one rank makes every rank
    raise :class:`DiagnosticSkipped` instead of leaving the others waiting in a collective.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group

    @property
    def world_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size(self.group))
        return 1

    def mean(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out / self.world_size

    def mean_dict(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Average every tensor of a dict in one flat all-reduce per device and dtype."""
        if self.world_size == 1:
            return dict(tensors)
        groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for k, t in tensors.items():
            groups.setdefault((t.device, t.dtype), []).append(k)
        out: dict[str, Tensor] = {}
        for keys in groups.values():
            flat = self.mean(torch.cat([tensors[k].detach().reshape(-1) for k in keys]))
            offset = 0
            for k in keys:
                n = tensors[k].numel()
                out[k] = flat[offset : offset + n].view_as(tensors[k])
                offset += n
        return {k: out[k] for k in tensors}

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate the ranks' tensors along dimension 0 (sizes may differ)."""
        if self.world_size == 1:
            return tensor
        # torchmetrics pads the ranks' tensors to a common shape, gathers and trims them again
        parts = gather_all_tensors(tensor.detach().contiguous(), group=self.group)
        return torch.cat(parts)

    def guard(self, stage: Callable[[], Any]) -> Any:
        """Run ``stage`` locally, then make every rank agree that it succeeded.

        Raises:
            DiagnosticSkipped: on every rank when the stage raised on any rank (the local
                exception is chained on the rank where it happened).
        """
        error: BaseException | None = None
        result = None
        try:
            result = stage()
        except Exception as exc:
            error = exc
        if self.world_size > 1:
            flag = torch.tensor([0.0 if error is None else 1.0], device=self._device())
            dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self.group)
            failed = int(flag.item())
        else:
            failed = 0 if error is None else 1
        if error is not None:
            raise DiagnosticSkipped(f"{type(error).__name__}: {error}") from error
        if failed:
            raise DiagnosticSkipped(f"a diagnostic pass failed on {failed} other rank(s)")
        return result

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group) if dist.is_initialized() else "gloo"
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


#: What ``Metric.forward``/``update`` change besides the states: the update count (a "mean"
#: state is reduced with it), the cached ``compute`` and ``forward`` results (Lightning logs an
#: ``on_step`` metric from ``_forward_cache`` at ``self.log`` time, so restoring it is only for
#: code that reads it later) and the "update was called" flag.
_METRIC_BOOKKEEPING = ("_update_count", "_computed", "_forward_cache", "_update_called")


class _Silenced:
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


class _Layout:
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


def _loss_from_output(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise TypeError(
        "Expected `training_step` to return a loss tensor or a dict with a 'loss' tensor, "
        f"but got {type(output).__name__}; pass `loss_fn` to the callback instead"
    )


class Probe:
    """Loss and gradients of ``module`` at any parameter point, the module itself untouched.

    Args:
        module: the model (usually a ``LightningModule``: its ``training_step`` gives the loss).
        loss_fn: ``loss_fn(module, batch) -> Tensor``; when given, used instead of ``training_step``.
        context: a zero-argument callable returning the context every evaluation runs in, e.g.
            the trainer's precision context (``trainer.precision_plugin.train_step_context``),
            so that under mixed precision a probe computes what the training step computes.
        vmap_chunk_size: how :meth:`losses_along` and :meth:`loss_and_grad_along` evaluate
            their grid, and :func:`~lightning_bn.diagnostics.ics.compute_ics` its G′ passes
            (:mod:`lightning_bn.batched`): ``None`` point by point, an ``int``
            under :func:`torch.func.vmap` with at most that many points per call, ``"auto"``
            (default) under ``vmap`` on CUDA and point by point elsewhere. Same values either
            way (to float tolerance); a model ``vmap`` cannot run falls back to point by point.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        >>> probe = Probe(net, loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> loss, grads = probe.loss_and_grad(probe.parameters(), StepRecord(batch))
        >>> sorted(grads)[:2]
        ['0.bias', '0.weight']
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn | None = None,
        context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        vmap_chunk_size: int | Literal["auto"] | None = "auto",
    ) -> None:
        if loss_fn is None and not callable(getattr(module, "training_step", None)):
            raise TypeError(
                f"{type(module).__name__} has no `training_step`; pass `loss_fn(module, batch)`"
            )
        self.module = module
        self.loss_fn = loss_fn
        self.context = context if context is not None else contextlib.nullcontext
        from lightning_bn.batched import check_vmap_chunk_size  # (imports this module)

        self.vmap_chunk_size = check_vmap_chunk_size(vmap_chunk_size)
        self._param_names = [n for n, _ in module.named_parameters()]
        self._layout_cache: _Layout | None = None
        self._trace_names: list[str] | None = None  # set while `use_order` traces a pass
        self._trace_result: list[str] = []
        self._use_orders: dict[tuple[Any, ...], list[str]] = {}

    # --- parameter points ---------------------------------------------------------------
    def parameters(self) -> Params:
        """A detached copy of the current parameters (trainable and frozen)."""
        return {n: p.detach().clone() for n, p in self.module.named_parameters()}

    @property
    def parameter_names(self) -> list[str]:
        return list(self._param_names)

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.module.named_parameters() if p.requires_grad]

    @property
    def _layout(self) -> _Layout:
        # gathered at the first evaluation, after Lightning's ``configure_model`` has run
        if self._layout_cache is None or self._layout_cache.stale():
            self._layout_cache = _Layout(self.module)
        return self._layout_cache

    # --- order of use -------------------------------------------------------------------------
    @accepts_batch_triple(2)
    def use_order(self, params: Mapping[str, Tensor], step: StepRecord) -> list[str]:
        """Trainable parameter names in the order the forward pass first *uses* them.

        A parameter is used by a torch function (``F.linear``, ``torch.addmm``,
        ``F.multi_head_attention_forward``, ``Tensor.T``, ...) that receives it and returns a
        tensor; metadata reads (``.shape``, ``.dtype``) are not uses. Parameters handed to one
        call count in the order of its arguments (``F.multi_head_attention_forward`` takes
        ``in_proj_weight`` before ``out_proj.weight``). A parameter shared by several modules
        (tied weights) appears once, under its name in ``named_parameters()``, at its first use.
        Parameters the pass never uses are left out.

        The trace (a :class:`~torch.overrides.TorchFunctionMode` around one forward pass at
        ``params``, parameters requiring grad as in training, so that modules take their
        training path) runs once per layout: the result is kept, keyed by the trainable
        parameters' names and shapes, and returned again without a pass.
        """
        trainable = self.trainable_names()
        key = tuple((n, tuple(params[n].shape)) for n in trainable if n in params)
        cached = self._use_orders.get(key)
        if cached is not None:
            return list(cached)
        point = {n: t.detach() for n, t in params.items()}
        for n in trainable:
            if n in point:
                point[n] = point[n].clone().requires_grad_(True)
        self._trace_names = trainable
        try:
            with torch.enable_grad():
                self.loss(point, step)
            order = list(self._trace_result)
        finally:
            self._trace_names = None
            self._trace_result = []
        self._use_orders[key] = order
        return list(order)

    # --- evaluation -------------------------------------------------------------------------
    def _step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(self.module, batch)
        step: Callable[[Any, int], Any] = getattr(self.module, "training_step")  # noqa: B009
        return _loss_from_output(step(batch, batch_idx))

    @accepts_batch_triple(2)
    def loss(self, params: Mapping[str, Tensor], step: StepRecord) -> Tensor:
        """The loss at ``params`` on the step's batch (differentiable w.r.t. ``params``' tensors).

        Parameters missing from ``params`` take the module's current values; every buffer is a
        fresh copy, so running statistics are not updated. ``step.rng`` replays the real step's
        random state (dropout masks). Every method of the probe takes the step as one
        :class:`StepRecord`; a bare batch stands for ``StepRecord(batch)``.
        """
        layout = self._layout
        state = layout.fresh_buffers()
        state.update(params)
        layout = self._layout_knowing(state, layout)
        ctx = step.rng.replay() if step.rng is not None else contextlib.nullcontext()
        trace = _UseTrace(state, self._trace_names) if self._trace_names is not None else None
        with (
            ctx,
            self.context(),
            _Silenced(self.module, layout.metrics),
            trace if trace is not None else contextlib.nullcontext(),
            layout.swapped(state),
        ):
            out = self._step(copy_batch(step.batch), step.batch_idx)
        if trace is not None:
            self._trace_result = trace.order
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise TypeError(f"Expected a scalar loss, got {out!r}")
        return out.reshape(())

    @accepts_batch_triple(2)
    def loss_and_grad(
        self,
        params: Mapping[str, Tensor],
        step: StepRecord,
        wrt: Sequence[str] | None = None,
        create_graph: bool = False,
    ) -> tuple[Tensor, Params]:
        """The loss and its gradient w.r.t. the parameters named in ``wrt`` (default: trainable).

        Backpropagation stops as early as the requested parameters allow (autograd prunes the
        graph), so the gradient of one early layer costs a full backward but that of a late layer
        only part of one.
        """
        names = list(wrt) if wrt is not None else self.trainable_names()
        point = {n: t.detach() for n, t in params.items()}
        leaves = {n: point[n].clone().requires_grad_(True) for n in names}
        point.update(leaves)
        with torch.enable_grad():
            loss = self.loss(point, step)
            grads = torch.autograd.grad(
                loss, [leaves[n] for n in names], allow_unused=True, create_graph=create_graph
            )
        out = {
            n: (g if g is not None else torch.zeros_like(leaves[n]))
            for n, g in zip(names, grads, strict=True)
        }
        return (loss if create_graph else loss.detach()), out

    @accepts_batch_triple(4)
    def losses_along(
        self,
        params: Mapping[str, Tensor],
        direction: Mapping[str, Tensor],
        step_sizes: Sequence[float],
        step: StepRecord,
    ) -> Tensor:
        r"""The losses :math:`L(W - \eta d)` for every :math:`\eta` in ``step_sizes``, no gradient.

        The same values as ``[self.loss(W - eta * d) for eta in step_sizes]`` (every point sees
        fresh copies of the buffers and the replayed random state), but the model is
        reparametrised once for the whole grid and each point is written into the same tensors,
        which saves the per-call swap of the module's tensors and the allocations.

        Args:
            params: the point :math:`W` (parameters missing from it take the module's values).
            direction: :math:`d`, a subset of the keys of ``params``.
            step_sizes: the :math:`\eta` values.

        Returns:
            ``(len(step_sizes),)``, detached.
        """
        results = self._along(params, direction, step_sizes, step, None)
        return torch.stack([loss for loss, _ in results])

    @accepts_batch_triple(4)
    def loss_and_grad_along(
        self,
        params: Mapping[str, Tensor],
        direction: Mapping[str, Tensor],
        step_sizes: Sequence[float],
        step: StepRecord,
        wrt: Sequence[str] | None = None,
    ) -> list[tuple[Tensor, Params]]:
        r"""The loss and its gradient at :math:`W - \eta d` for every :math:`\eta`, in order.

        The same values as :meth:`loss_and_grad` at each point (gradients w.r.t. ``wrt``, default
        the trainable parameters), with one reparametrisation for the whole grid as in
        :meth:`losses_along`.
        """
        names = list(wrt) if wrt is not None else self.trainable_names()
        return self._along(params, direction, step_sizes, step, names)

    def _along(
        self,
        params: Mapping[str, Tensor],
        direction: Mapping[str, Tensor],
        step_sizes: Sequence[float],
        step: StepRecord,
        wrt: list[str] | None,
    ) -> list[tuple[Tensor, Params]]:
        unknown = sorted(set(direction) - set(params))
        if unknown:
            raise ValueError(f"Expected `direction` to have keys of `params`, but got {unknown}")
        # --- batched (torch.func.vmap) evaluation of the grid, see lightning_bn.batched ---
        # (without the step's random state each sequential point draws anew from the advancing
        # global state, which a batched evaluation cannot do: those grids stay sequential)
        if self.vmap_chunk_size is not None and step.rng is not None:
            from lightning_bn.batched import batched_along

            batched = batched_along(self, params, direction, step_sizes, step, wrt)
            if batched is not None:
                return batched
        # --- sequential evaluation ---
        point = {n: t.detach() for n, t in params.items()}
        # Every moved parameter, and every parameter a gradient is taken for, gets a tensor of its
        # own (a leaf), overwritten in place (under no_grad) for each point of the grid.
        slot_names = list(dict.fromkeys([*direction, *(wrt or [])]))
        slots = {n: point[n].clone() for n in slot_names}
        if wrt is not None:
            for n in wrt:
                slots[n].requires_grad_(True)
        point.update(slots)
        origins = [params[n].detach() for n in direction]
        steps = [d.detach() for d in direction.values()]
        moved = [slots[n] for n in direction]
        layout = self._layout
        buffers = layout.current_buffers()
        fresh = {n: b.clone() for n, b in buffers.items()}
        state = {**point, **fresh}
        layout = self._layout_knowing(state, layout)
        originals, copies = list(buffers.values()), list(fresh.values())
        results: list[tuple[Tensor, Params]] = []

        rng = step.rng

        def run() -> None:
            for eta in step_sizes:
                with torch.no_grad():
                    if moved:  # W - eta d, written into the slots
                        torch._foreach_copy_(moved, origins)
                        torch._foreach_add_(moved, steps, alpha=-eta)
                    if copies:  # every point starts from the module's buffers, as in `loss`
                        torch._foreach_copy_(copies, originals)
                layout.put(state)
                if rng is not None:  # every point replays the step's random state
                    rng.restore()
                with torch.set_grad_enabled(wrt is not None):
                    loss = _scalar_loss(self._step(copy_batch(step.batch), step.batch_idx))
                    if wrt is None:
                        results.append((loss.detach(), {}))
                        continue
                    grads = torch.autograd.grad(loss, [slots[n] for n in wrt], allow_unused=True)
                results.append(
                    (
                        loss.detach(),
                        {
                            n: g if g is not None else torch.zeros_like(slots[n])
                            for n, g in zip(wrt, grads, strict=True)
                        },
                    )
                )

        fork = rng.fork() if rng is not None else contextlib.nullcontext()
        swap = layout.swapped(state)
        with fork, self.context(), _Silenced(self.module, layout.metrics), swap:
            run()
        return results

    def _layout_knowing(self, names: Iterable[str], layout: _Layout | None = None) -> _Layout:
        """The probe's layout, gathered again if it does not know one of ``names`` (a parameter
        or buffer registered after the probe's first evaluation, e.g. by a lazy module).
        ``layout``: the layout already checked in this evaluation (default: checked here).

        Raises:
            ValueError: a name is neither a parameter nor a buffer of the module.
        """
        layout = layout if layout is not None else self._layout
        if not layout.knows(names):
            layout = self._layout_cache = _Layout(self.module)
            unknown = sorted(n for n in names if n not in layout.slots)
            if unknown:
                raise ValueError(
                    f"Expected names of parameters or buffers of {type(self.module).__name__},"
                    f" but got {unknown[:5]}"
                )
        return layout


class _UseTrace(TorchFunctionMode):
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
            for leaf in tree_flatten((args, kwargs))[0]:
                name = self.ids.get(id(leaf)) if isinstance(leaf, Tensor) else None
                if name is not None and name not in self.seen:
                    self.seen.add(name)
                    self.order.append(name)
        return out


def _scalar_loss(out: Any) -> Tensor:
    if not isinstance(out, Tensor) or out.numel() != 1:
        raise TypeError(f"Expected a scalar loss, got {out!r}")
    return out.reshape(())


def execution_order(
    module: nn.Module, run: Callable[[], Any], modules: Sequence[nn.Module] | None = None
) -> list[str]:
    """Qualified names of ``modules`` (default: every submodule) in the order of their first call.

    ``run`` performs one forward pass (e.g. a :meth:`Probe.loss` call); forward pre-hooks record
    the order and are removed afterwards, also when ``run`` raises.
    """
    names = {id(m): n for n, m in module.named_modules()}
    targets = list(modules) if modules is not None else [m for _, m in module.named_modules()]
    order: list[str] = []
    seen: set[int] = set()

    def hook(mod: nn.Module, args: Any) -> None:
        if id(mod) not in seen:
            seen.add(id(mod))
            order.append(names[id(mod)])

    handles = [m.register_forward_pre_hook(hook) for m in targets]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order
