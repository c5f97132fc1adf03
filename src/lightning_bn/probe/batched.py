r"""Evaluate a probe's grid of parameter points in chunks with :func:`torch.func.vmap`.

Plain torch (no Lightning import). :meth:`Probe.losses_along
<lightning_bn.probe.Probe.losses_along>` and :meth:`Probe.loss_and_grad_along
<lightning_bn.probe.Probe.loss_and_grad_along>` evaluate the model at the points
:math:`W - \eta_j d` of a grid. The points are independent, so instead of one training step per
point, :func:`batched_along` stacks ``chunk`` of them along a new leading dimension and runs the
training step once under :func:`torch.func.vmap` over that dimension:

- the moved parameters (and the ones a gradient is taken for) are stacked per point, written
  with the formula of the sequential path (``W + (-eta) d``, one rounding); the other
  parameters are shared, unbatched;
- every buffer is a per-point copy (``in_dims=0``), so BatchNorm's in-place running-statistics
  update lands in the copies and the module's buffers stay untouched, as in the sequential path;
- the random state of the measured step is replayed before each chunk and random ops draw once
  for the whole chunk (``randomness="same"``), so every point sees the dropout masks of the real
  step, as in the sequential path. This holds for most random ops (``nn.Dropout``, attention
  dropout) but not all (a draw can be laid out differently under ``vmap``, as for the dropout
  of ``nn.TransformerEncoderLayer``), so the first grid that draws random numbers is checked
  once per probe against a sequential evaluation of its first point (a mismatch falls back);
- gradients come from one :func:`torch.autograd.grad` of the sum of the chunk's losses w.r.t. the
  stacked parameters: the points are independent, so the gradient w.r.t. point j's slice is the
  gradient of point j's loss.

**Arbitrary points.** :func:`batched_points` evaluates any list of points (a base point with
per-point overrides) the same way, with the gradient w.r.t. a union ``wrt`` and hooks run inside
the vmapped function (their tensors come back per point); :func:`compute_ics
<lightning_bn.diagnostics.ics.compute_ics>` evaluates its G′ passes so. The grid is the special
case whose points are :math:`W - \eta_j d`, written into the stacked tensors chunk by chunk.

**Chunk size and memory.** A chunk holds ``chunk`` copies of the stacked parameters (and of their
gradients) and the activations of ``chunk`` training steps at once. An ``int`` bounds the points
per chunk directly. ``"auto"`` (on CUDA) starts with the whole grid, capped so that the stacked
parameter copies and their gradients take at most :data:`AUTO_MEMORY_FRACTION` of the device's
free memory, and halves the chunk after an out-of-memory error (remembered by the probe).

**Fallback.** A model that ``vmap`` cannot run (data-dependent control flow, ``.item()``, an
in-place update of an unbatched tensor with a batched one, e.g. a torchmetrics metric updated in
``training_step``, random ops on batched inputs, an op without a batching rule) raises inside
``vmap``; the probe then evaluates the grid sequentially, remembers it (it does not try again)
and warns once (:class:`BatchedFallbackWarning`). Each rank decides locally; the values are the
same either way, so no collective is needed.

**When it wins.** On CPU (one thread, ``benchmarks/batched_probes.py``) it halves the grid's
time for the digits MLP, saves 5-25% for the 13-conv ResNet and costs about 1.4 times as much
for BERT-small, so ``"auto"`` batches on CUDA only (where the many small kernels of the
sequential path are expected to cost most; not yet measured there); an ``int`` batches anywhere.
The ICS G′ passes lose on CPU (each batched point takes a full backward where the sequential
pass stops at its layer): about 1.0 times the sequential time for the digits MLP and 1.4 for the
13-conv ResNet.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_bn._types import Params, scalar_loss
from lightning_bn._validation import check_int
from lightning_bn.errors import ArgumentTypeError, BatchedFallbackWarning
from lightning_bn.probe.layout import Layout, Silenced
from lightning_bn.probe.record import RNGState, StepRecord, copy_batch

__all__ = [
    "AUTO_MEMORY_FRACTION",
    "BatchedFallbackWarning",
    "VmapChunkSize",
    "batched_along",
    "batched_points",
    "check_vmap_chunk_size",
    "uses_vmap",
]

#: ``None`` (sequential), ``"auto"`` (vmap on CUDA only) or the most points per vmap call.
VmapChunkSize = int | Literal["auto"] | None

#: Share of the device's free memory that the stacked parameter copies (and their gradients) of
#: one chunk may take when the chunk size is ``"auto"``.
AUTO_MEMORY_FRACTION = 0.25


def check_vmap_chunk_size(value: Any) -> VmapChunkSize:
    """Return ``value`` if it is ``None``, ``"auto"`` or a positive ``int``.

    Raises:
        ArgumentTypeError: anything else of the wrong type.
        ValueError: an ``int`` below 1 or another string.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(
                "Expected argument `vmap_chunk_size` to be None, 'auto' or a positive integer,"
                f" but got {value!r}"
            )
        return "auto"
    try:
        return check_int("vmap_chunk_size", value, minimum=1)
    except ArgumentTypeError:
        raise ArgumentTypeError(
            "Expected argument `vmap_chunk_size` to be None, 'auto' or a positive integer,"
            f" but got {value!r}"
        ) from None


@dataclass
class VmapState:
    """What a probe remembers between grids: the fallback and the chunk an OOM left.

    Each :class:`~lightning_bn.probe.Probe` holds one (``probe._vmap``), so it lives and dies
    with the probe.
    """

    failed: bool = False
    chunk_cap: int | None = None
    verified: bool = False  # batched random draws were checked against a sequential pass


class ProbeLike(Protocol):
    """What the batched path uses of a :class:`~lightning_bn.probe.Probe` (no import of it, so
    the probe can import this module)."""

    module: Any
    vmap_chunk_size: VmapChunkSize
    _vmap: VmapState

    context: Callable[[], contextlib.AbstractContextManager[Any]]

    @property
    def _layout(self) -> Layout: ...

    def _layout_knowing(self, names: Iterable[str], layout: Layout | None = None) -> Layout: ...

    def _step(self, batch: Any, batch_idx: int) -> Any: ...

    def loss(self, params: Mapping[str, Tensor], step: StepRecord) -> Tensor: ...


def uses_vmap(probe: ProbeLike, device: torch.device) -> bool:
    """Whether ``probe`` evaluates a grid on ``device`` under ``vmap`` (its setting, the device,
    and no earlier fallback)."""
    setting = probe.vmap_chunk_size
    if setting is None or probe._vmap.failed:
        return False
    return setting != "auto" or device.type == "cuda"


def _chunk_size(probe: ProbeLike, points: int, per_point_bytes: int, device: torch.device) -> int:
    setting = probe.vmap_chunk_size
    if isinstance(setting, int):
        return min(setting, points)
    chunk = points
    if device.type == "cuda" and per_point_bytes > 0:
        free, _ = torch.cuda.mem_get_info(device)
        chunk = min(chunk, max(1, int(AUTO_MEMORY_FRACTION * free) // per_point_bytes))
    cap = probe._vmap.chunk_cap
    return min(chunk, cap) if cap is not None else chunk


@dataclass
class _Points:
    """Parameter points to evaluate: ``base`` everywhere except the names in ``names``, which are
    stacked per point (the ones that vary and the ones a gradient is taken for) and whose value at
    point ``j`` ``fill(j, name, out)`` writes into ``out`` (under ``no_grad``)."""

    base: dict[str, Tensor]
    names: list[str]
    count: int
    fill: Callable[[int, str, Tensor], None]

    def at(self, j: int) -> dict[str, Tensor]:
        """Point ``j`` as one dict (for a sequential evaluation)."""
        point = dict(self.base)
        with torch.no_grad():
            for n in self.names:
                out = torch.empty_like(self.base[n])
                self.fill(j, n, out)
                point[n] = out
        return point


#: ``hooks(store)`` registers hooks that write tensors (computed from the forward pass) into
#: ``store`` and returns their handles; under ``vmap`` they come back per point.
Hooks = Callable[[dict[str, Tensor]], list[RemovableHandle]]

#: Per point: the loss, the gradients w.r.t. ``wrt`` and what the hooks stored.
PointValue = tuple[Tensor, Params, dict[str, Tensor]]


def batched_along(
    probe: ProbeLike,
    params: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    step_sizes: Sequence[float],
    step: StepRecord,
    wrt: list[str] | None,
) -> list[tuple[Tensor, Params]] | None:
    """The values of ``Probe._along`` computed in vmapped chunks, or ``None`` when the probe does
    not batch (its setting, the device) or ``vmap`` failed (then it warns once and never tries
    again for this probe); the caller evaluates sequentially on ``None``."""
    etas = [float(e) for e in step_sizes]
    base = {n: t.detach() for n, t in params.items()}
    moves = {n: d.detach() for n, d in direction.items()}

    def fill(j: int, name: str, out: Tensor) -> None:
        if name in moves:  # as the sequential path writes its slots
            torch.add(base[name], moves[name], alpha=-etas[j], out=out)
        else:
            out.copy_(base[name])

    names = list(dict.fromkeys([*direction, *(wrt or [])]))
    values = _guarded(probe, _Points(base, names, len(etas), fill), step, wrt, None, "grid")
    return None if values is None else [(loss, grads) for loss, grads, _ in values]


def batched_points(
    probe: ProbeLike,
    base: Mapping[str, Tensor],
    overrides: Sequence[Mapping[str, Tensor]],
    step: StepRecord,
    wrt: Sequence[str] | None,
    hooks: Hooks | None = None,
) -> list[PointValue] | None:
    """Loss, gradients w.r.t. ``wrt`` (``None``: no gradient) and the tensors ``hooks`` store, at
    each point ``{**base, **overrides[j]}``, in vmapped chunks; ``None`` when the probe does not
    batch or ``vmap`` failed (as :func:`batched_along`: the caller evaluates sequentially).

    A name of ``wrt`` or of any override is stacked per point (a chunk holds that many copies);
    the other parameters are shared. ``hooks`` (e.g. forward pre-hooks capturing a layer's input)
    run inside the vmapped function, so what they store is per point: point j's tensors are
    ``values[j][2]``, with the shapes a sequential pass would store.
    """
    points = [dict(o) for o in overrides]
    fixed = {n: t.detach() for n, t in base.items()}
    names = list(dict.fromkeys([*(n for o in points for n in o), *(wrt or [])]))
    unknown = sorted(set(names) - set(fixed))
    if unknown:
        raise ValueError(
            f"Expected `overrides` and `wrt` to name keys of `base`, but got {unknown}"
        )

    def fill(j: int, name: str, out: Tensor) -> None:
        out.copy_(points[j].get(name, fixed[name]))

    names_wrt = list(wrt) if wrt is not None else None
    return _guarded(
        probe, _Points(fixed, names, len(points), fill), step, names_wrt, hooks, "points"
    )


def _guarded(
    probe: ProbeLike,
    points: _Points,
    step: StepRecord,
    wrt: list[str] | None,
    hooks: Hooks | None,
    what: str,
) -> list[PointValue] | None:
    """:func:`_run`, or ``None`` (sequential) when the probe does not batch or ``vmap`` failed."""
    some = next(iter(points.base.values()), None)
    device = some.device if some is not None else torch.device("cpu")
    if points.count == 0 or not uses_vmap(probe, device):
        return None
    try:
        return _run(probe, points, step, wrt, hooks, device)
    except Exception as exc:  # the sequential path gives the values (or raises the user's error)
        probe._vmap.failed = True
        warnings.warn(
            f"{type(probe.module).__name__}: the probe cannot evaluate its {what} under"
            f" torch.func.vmap ({type(exc).__name__}: {exc}); it evaluates grids and points one"
            " by one from now on (same values, sequential speed)",
            BatchedFallbackWarning,
            stacklevel=5,
        )
        return None


def _run(
    probe: ProbeLike,
    points: _Points,
    step: StepRecord,
    wrt: list[str] | None,
    hooks: Hooks | None,
    device: torch.device,
) -> list[PointValue]:
    point = points.base
    stacked_names = points.names
    layout = probe._layout
    buffers = layout.current_buffers()
    per_point = sum(point[n].numel() * point[n].element_size() for n in stacked_names)
    per_point *= 2 if wrt is not None else 1
    per_point += sum(b.numel() * b.element_size() for b in buffers.values())
    # every chunk replays one random state: the step's, or (without one) the current state,
    # so that every point sees the same draws as in a sequential pass from a replayed state
    rng = step.rng if step.rng is not None else RNGState.capture()
    moving = set(stacked_names)
    shared = {n: t for n, t in point.items() if n not in moving}
    layout = probe._layout_knowing([*shared, *stacked_names, *buffers], layout)

    def loss_at(
        stacked: dict[str, Tensor], bufs: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        state = {**shared, **stacked, **bufs}
        store: dict[str, Tensor] = {}
        handles = hooks(store) if hooks is not None else []
        try:
            with layout.swapped(state):  # what functional_call does, by the probe's slot table
                loss = scalar_loss(probe._step(copy_batch(step.batch), step.batch_idx))
        finally:
            for h in handles:
                h.remove()
        return loss, store

    vmapped = torch.func.vmap(loss_at, in_dims=(0, 0), randomness="same")

    def chunk_values(start: int, k: int) -> list[PointValue]:
        with torch.no_grad():
            stacked: dict[str, Tensor] = {}
            for n in stacked_names:
                p = point[n]
                out = p.new_empty((k, *p.shape))
                for j in range(k):
                    points.fill(start + j, n, out[j])
                stacked[n] = out
            bufs = {n: b.unsqueeze(0).expand(k, *b.shape).clone() for n, b in buffers.items()}
        if wrt is not None:
            for n in wrt:
                stacked[n].requires_grad_(True)
        with rng.replay(), torch.set_grad_enabled(wrt is not None):
            with warnings.catch_warnings():  # "performance drop ... batching rule for aten::..."
                warnings.filterwarnings("ignore", message=_SLOW_FALLBACK)
                losses, stores = vmapped(stacked, bufs)
            if not state.verified and _drew(rng):
                pending.append((start, losses[0].detach()))
            grads: Sequence[Tensor | None] = []
            if wrt is not None:
                grads = torch.autograd.grad(
                    losses.sum(), [stacked[n] for n in wrt], allow_unused=True
                )
        per_name = {
            n: (g if g is not None else torch.zeros_like(stacked[n])).unbind(0)
            for n, g in zip(wrt or [], grads, strict=True)
        }
        per_key = {key: t.detach().unbind(0) for key, t in stores.items()}
        return [
            (
                loss,
                {n: per_name[n][j] for n in per_name},
                {key: per_key[key][j] for key in per_key},
            )
            for j, loss in enumerate(losses.detach().unbind(0))
        ]

    results: list[PointValue] = []
    state = probe._vmap
    pending: list[tuple[int, Tensor]] = []  # (point, batched loss) to check against sequential
    with probe.context(), Silenced(probe.module, layout.metrics):
        start = 0
        while start < points.count:
            size = _chunk_size(probe, points.count - start, per_point, device)
            try:
                results.extend(chunk_values(start, size))
            except torch.cuda.OutOfMemoryError:
                if size == 1 or probe.vmap_chunk_size != "auto":
                    raise
                state.chunk_cap = max(1, size // 2)  # remembered: later grids start there
                continue
            start += size
    if pending:
        _check_draws(probe, points, step, *pending[0])
        state.verified = True
    return results


#: The start of torch's warning that an op runs under vmap by a loop (no batching rule).
_SLOW_FALLBACK = "There is a performance drop because we have not yet implemented the batching rule"


def _drew(rng: RNGState) -> bool:
    """Whether the block that started from ``rng`` drew random numbers (the state moved)."""
    if not torch.equal(torch.get_rng_state(), rng.cpu):
        return True
    return bool(rng.cuda) and any(
        not torch.equal(now, then)
        for now, then in zip(torch.cuda.get_rng_state_all(), rng.cuda, strict=False)
    )


def _check_draws(
    probe: ProbeLike, points: _Points, step: StepRecord, j: int, batched: Tensor
) -> None:
    """Compare the batched loss of point ``j`` of a model with random ops with the sequential one.

    ``randomness="same"`` draws each random tensor once for the chunk, which gives the
    sequential path's masks for most ops (``nn.Dropout``, attention dropout), but a draw can be
    laid out differently under ``vmap`` (e.g. dropout of a non-contiguous activation in
    ``nn.TransformerEncoderLayer``). The first evaluation that draws is checked once per probe.

    Raises:
        RuntimeError: the losses differ beyond float tolerance (the caller falls back).
    """
    with torch.no_grad():
        expected = probe.loss(points.at(j), step).detach()
    tol = 1e-4 * max(1.0, float(expected.abs()))
    if not float((batched.to(expected.dtype) - expected).abs()) <= tol:
        raise RuntimeError(
            "its random draws under vmap differ from the sequential pass (loss"
            f" {float(batched):.6g} vs {float(expected):.6g})"
        )
