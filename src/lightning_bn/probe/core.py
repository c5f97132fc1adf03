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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_bn._types import LossFn, Params, scalar_loss
from lightning_bn.probe.attention import with_math_attention
from lightning_bn.probe.batched import VmapState, batched_along, check_vmap_chunk_size
from lightning_bn.probe.flatgrad import backward_into, flat_views
from lightning_bn.probe.layout import Layout, Silenced, UseTrace, loss_from_output
from lightning_bn.probe.record import StepRecord, accepts_batch_triple, copy_batch

__all__ = ["Probe"]


class Probe:
    """Loss and gradients of ``module`` at any parameter point, the module itself untouched.

    Args:
        module: the model (usually a ``LightningModule``: its ``training_step`` gives the loss).
        loss_fn: ``loss_fn(module, batch) -> Tensor``; when given, used instead of ``training_step``.
        context: a zero-argument callable returning the context every evaluation runs in, e.g.
            the trainer's precision context (``trainer.precision_plugin.train_step_context``),
            so that under mixed precision a probe computes what the training step computes.
            Every evaluation also runs ``scaled_dot_product_attention`` with its math backend
            (:mod:`lightning_bn.probe.attention`), which has second derivatives.
        vmap_chunk_size: how :meth:`losses_along` and :meth:`loss_and_grad_along` evaluate
            their grid, and :func:`~lightning_bn.diagnostics.ics.compute_ics` its G′ passes
            (:mod:`lightning_bn.probe.batched`): ``None`` point by point, an ``int``
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
        # attention under its math backend: the fused kernels have no double backward
        self.context = with_math_attention(
            context if context is not None else contextlib.nullcontext
        )
        self.vmap_chunk_size = check_vmap_chunk_size(vmap_chunk_size)
        self._vmap = VmapState()  # what the batched path learnt about this module (fallback, chunk)
        self._param_names = [n for n, _ in module.named_parameters()]
        self._layout_cache: Layout | None = None
        self._trace_names: list[str] | None = None  # set while `use_order` traces a pass
        self._trace_result: list[str] = []
        self._trace_spans: dict[str, tuple[int, int]] = {}
        self._use_orders: dict[tuple[Any, ...], list[str]] = {}
        self._use_spans: dict[tuple[Any, ...], dict[str, tuple[int, int]]] = {}

    # --- parameter points ---------------------------------------------------------------
    def parameters(self, copy: bool = True) -> Params:
        """The current parameters (trainable and frozen), detached: copies, or with
        ``copy=False`` views of the module's own tensors (no memory; for a measurement during
        which nothing changes the parameters)."""
        return {
            n: p.detach().clone() if copy else p.detach() for n, p in self.module.named_parameters()
        }

    @property
    def parameter_names(self) -> list[str]:
        return list(self._param_names)

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.module.named_parameters() if p.requires_grad]

    @property
    def _layout(self) -> Layout:
        # gathered at the first evaluation, after Lightning's ``configure_model`` has run
        if self._layout_cache is None or self._layout_cache.stale():
            self._layout_cache = Layout(self.module)
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
        self._use_spans[key] = self._trace_uses(params, step, trainable)
        order = sorted(self._use_spans[key], key=lambda n: self._use_spans[key][n][0])
        self._use_orders[key] = order
        return list(order)

    @accepts_batch_triple(2)
    def use_spans(
        self, params: Mapping[str, Tensor], step: StepRecord
    ) -> dict[str, tuple[int, int]]:
        """Each used trainable parameter's first and last use in the forward pass, as indices
        of the torch calls that used it (traced with :meth:`use_order`, from the same pass).
        A tied weight (an embedding and the output layer sharing it) has first < last."""
        trainable = self.trainable_names()
        key = tuple((n, tuple(params[n].shape)) for n in trainable if n in params)
        if key not in self._use_spans:
            self.use_order(params, step)
        return dict(self._use_spans[key])

    def _trace_uses(
        self, params: Mapping[str, Tensor], step: StepRecord, trainable: list[str]
    ) -> dict[str, tuple[int, int]]:
        point = {n: t.detach() for n, t in params.items()}
        for n in trainable:
            if n in point:
                point[n] = point[n].clone().requires_grad_(True)
        self._trace_names = trainable
        try:
            with torch.enable_grad():
                self.loss(point, step)
            return dict(self._trace_spans)
        finally:
            self._trace_names = None
            self._trace_result = []
            self._trace_spans = {}

    # --- evaluation -------------------------------------------------------------------------
    def _step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(self.module, batch)
        step: Callable[[Any, int], Any] = getattr(self.module, "training_step")  # noqa: B009
        return loss_from_output(step(batch, batch_idx))

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
        trace = UseTrace(state, self._trace_names) if self._trace_names is not None else None
        with (
            ctx,
            self.context(),
            Silenced(self.module, layout.metrics),
            trace if trace is not None else contextlib.nullcontext(),
            layout.swapped(state),
        ):
            out = self._step(copy_batch(step.batch), step.batch_idx)
        if trace is not None:
            self._trace_result = trace.order
            self._trace_spans = trace.spans
        return scalar_loss(out)

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
        reduce: Callable[[Params], Any] | None = None,
    ) -> list[tuple[Tensor, Any]]:
        r"""The loss and its gradient at :math:`W - \eta d` for every :math:`\eta`, in order.

        The same values as :meth:`loss_and_grad` at each point (gradients w.r.t. ``wrt``, default
        the trainable parameters), with one reparametrisation for the whole grid as in
        :meth:`losses_along`. With ``reduce``, each point's gradients are replaced by
        ``reduce(gradients)`` as soon as they are computed, so that a long grid holds one
        gradient at a time (point by point; a ``vmap`` chunk holds its points' gradients).
        """
        names = list(wrt) if wrt is not None else self.trainable_names()
        return self._along(params, direction, step_sizes, step, names, reduce)

    def _along(
        self,
        params: Mapping[str, Tensor],
        direction: Mapping[str, Tensor],
        step_sizes: Sequence[float],
        step: StepRecord,
        wrt: list[str] | None,
        reduce: Callable[[Params], Any] | None = None,
    ) -> list[tuple[Tensor, Any]]:
        unknown = sorted(set(direction) - set(params))
        if unknown:
            raise ValueError(f"Expected `direction` to have keys of `params`, but got {unknown}")
        # --- batched (torch.func.vmap) evaluation of the grid, see lightning_bn.probe.batched ---
        # (without the step's random state each sequential point draws anew from the advancing
        # global state, which a batched evaluation cannot do: those grids stay sequential)
        if self.vmap_chunk_size is not None and step.rng is not None:
            batched = batched_along(self, params, direction, step_sizes, step, wrt)
            if batched is not None:
                return batched if reduce is None else [(loss, reduce(g)) for loss, g in batched]
        # --- sequential evaluation ---
        point = {n: t.detach() for n, t in params.items()}
        # Every moved parameter, and every parameter a gradient is taken for, gets a tensor of its
        # own (a leaf), overwritten in place (under no_grad) for each point of the grid.
        slot_names = list(dict.fromkeys([*direction, *(wrt or [])]))
        slots = _copies([point[n] for n in slot_names], slot_names)
        if wrt is not None:
            for n in wrt:
                slots[n].requires_grad_(True)
        point.update(slots)
        # reduced point by point: each point's gradient summed into one buffer kept for the grid
        leaves = [slots[n] for n in wrt] if wrt is not None else []
        grad_buffer = _flat_like(leaves) if reduce is not None else None
        origins = [params[n].detach() for n in direction]
        steps = [d.detach() for d in direction.values()]
        moved = [slots[n] for n in direction]
        layout = self._layout
        buffers = layout.current_buffers()
        fresh = {n: b.clone() for n, b in buffers.items()}
        state = {**point, **fresh}
        layout = self._layout_knowing(state, layout)
        originals, copies = list(buffers.values()), list(fresh.values())
        results: list[tuple[Tensor, Any]] = []
        keep: Callable[[Params], Any] = reduce if reduce is not None else (lambda g: g)

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
                    loss = scalar_loss(self._step(copy_batch(step.batch), step.batch_idx))
                    if wrt is None:
                        results.append((loss.detach(), {}))
                        continue
                    if grad_buffer is not None:
                        backward_into([loss], leaves, grad_buffer)
                        grads = tuple(flat_views(grad_buffer, leaves))
                    else:
                        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                point_grads = {
                    n: g if g is not None else torch.zeros_like(slots[n])
                    for n, g in zip(wrt, grads, strict=True)
                }
                results.append((loss.detach(), keep(point_grads)))
                del point_grads, grads

        fork = rng.fork() if rng is not None else contextlib.nullcontext()
        swap = layout.swapped(state)
        with fork, self.context(), Silenced(self.module, layout.metrics), swap:
            run()
        return results

    def _layout_knowing(self, names: Iterable[str], layout: Layout | None = None) -> Layout:
        """The probe's layout, gathered again if it does not know one of ``names`` (a parameter
        or buffer registered after the probe's first evaluation, e.g. by a lazy module).
        ``layout``: the layout already checked in this evaluation (default: checked here).

        Raises:
            ValueError: a name is neither a parameter nor a buffer of the module.
        """
        layout = layout if layout is not None else self._layout
        if not layout.knows(names):
            layout = self._layout_cache = Layout(self.module)
            unknown = sorted(n for n in names if n not in layout.slots)
            if unknown:
                raise ValueError(
                    f"Expected names of parameters or buffers of {type(self.module).__name__},"
                    f" but got {unknown[:5]}"
                )
        return layout


def _uniform(tensors: Sequence[Tensor]) -> bool:
    return bool(tensors) and all(
        t.dtype == tensors[0].dtype and t.device == tensors[0].device for t in tensors
    )


def _copies(tensors: Sequence[Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """Copies of ``tensors`` by name: views of one flat tensor where they share a dtype and
    device and are contiguous (one allocation, which the allocator hands back whole), else one
    clone each (which keeps each tensor's memory format)."""
    if not _uniform(tensors) or not all(t.is_contiguous() for t in tensors):
        return {n: t.clone() for n, t in zip(names, tensors, strict=True)}
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return dict(zip(names, flat_views(flat, tensors), strict=True))


def _flat_like(tensors: Sequence[Tensor]) -> Tensor | None:
    """An uninitialised flat buffer for ``tensors`` (one dtype and device), else ``None``."""
    if not _uniform(tensors):
        return None
    numel = sum(t.numel() for t in tensors)
    return torch.empty(numel, dtype=tensors[0].dtype, device=tensors[0].device)
