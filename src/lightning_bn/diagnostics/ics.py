r"""Internal covariate shift: the gradient form of Santurkar et al. (Def. 2.1) and the distributional one.

Plain torch. For layers :math:`i = 1..k` (groups of trainable parameters, by default those owned
directly by one module, ordered by the forward pass's first use of their parameters), weights
:math:`W^t` before and :math:`W^{t+1}` after the real optimiser step, and the step's batch:

.. math::
    G_{t,i} = \nabla_{W_i} L(W_1^t, \dots, W_k^t), \qquad
    G'_{t,i} = \nabla_{W_i} L(W_1^{t+1}, \dots, W_{i-1}^{t+1}, W_i^t, \dots, W_k^t).

One pass at :math:`W^t` gives every :math:`G_{t,i}` (and every layer's input); the first layer's
:math:`G'` equals its :math:`G`; each other :math:`G'_{t,i}` takes one pass whose backward stops at
layer i. k layers therefore cost k gradient evaluations.

**Batched G′ passes.** When the probe batches (``Probe.vmap_chunk_size``: an ``int`` always,
``"auto"`` on CUDA only, ``None`` never; :mod:`lightning_bn.probe.batched`), the k - 1 mixed points are
evaluated in chunks under :func:`torch.func.vmap`: one gradient w.r.t. the union of the measured
layers' parameters per point (a full backward, where the sequential pass stops at layer i), of
which layer i's block is :math:`G'_{t,i}`; the forward pre-hooks that capture the layers' inputs
run inside the vmapped function, so the inputs come back per point. Same values (to float
rounding); a model ``vmap`` cannot run falls back to the sequential passes (one
``BatchedFallbackWarning`` per probe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bn.diagnostics.input_shift import (
    _SHIFT_KEYS,
    _unit_shift_tensor,
    input_units,
    unit_shift,
)
from lightning_bn.diagnostics.paramvec import dict_flat, vector_change
from lightning_bn.diagnostics.tied import tied_aliases, tied_owner, warn_left_out_parameters
from lightning_bn.layers.registry import is_norm_layer
from lightning_bn.layers.selection import describe_modules, match_modules
from lightning_bn.probe import Collective, Params, Probe, StepRecord, accepts_batch_triple
from lightning_bn.probe.batched import batched_points

__all__ = [
    "ICSLayer",
    "compute_ics",
    "default_layers",
    "input_units",
    "measured_layers",
    "unit_shift",
    "warn_left_out",
]

_EPS = 1e-12


@dataclass(frozen=True)
class ICSLayer:
    """A measured layer: the qualified name of the module owning its parameters, the module,
    and the qualified names of the trainable parameters measured together."""

    name: str
    module: nn.Module
    params: tuple[str, ...]


def _owned_params(root: nn.Module) -> dict[str, list[tuple[str, Tensor]]]:
    """Trainable and frozen parameters by owner: the module under whose qualified name
    ``root.named_parameters()`` lists them, or for a tied parameter the module holding its last
    alias (:mod:`lightning_bn.diagnostics.tied`)."""
    owned: dict[str, list[tuple[str, Tensor]]] = {}
    tied = tied_owner(root)
    for name, p in root.named_parameters():
        owned.setdefault(tied.get(name, name.rpartition(".")[0]), []).append((name, p))
    return owned


def default_layers(root: nn.Module) -> list[ICSLayer]:
    """The layers ICS measures when none are chosen, in registration order.

    A layer is the trainable parameters owned directly by one module, for every submodule that
    owns a trainable parameter of rank ≥ 2 and is not a normalisation layer
    (:func:`lightning_bn.layers.is_norm_layer`): ``Linear``, ``Conv*``, ``Embedding``,
    ``nn.MultiheadAttention`` (its ``in_proj_weight``/``in_proj_bias``; its ``out_proj`` is a
    layer of its own), Hugging Face's ``Conv1D``, any custom module with a weight matrix.
    Parameters owned by the root module itself are not measured (they have no qualified module
    name); nor are those of normalisation layers, which still count as "earlier" in
    :func:`compute_ics`.
    """
    layers: list[ICSLayer] = []
    owned = _owned_params(root)
    for name, module in root.named_modules():
        own = [(n, p) for n, p in owned.get(name, []) if p.requires_grad]
        if not name or is_norm_layer(module) or not any(p.dim() >= 2 for _, p in own):
            continue
        layers.append(ICSLayer(name, module, tuple(n for n, _ in own)))
    return layers


def _group_selected(
    root: nn.Module, modules: Sequence[tuple[str, nn.Module]]
) -> dict[str, tuple[str, ...]]:
    """Each selected module's trainable parameters: those of its subtree (by their names in
    ``root.named_parameters()``), every parameter to the deepest selected module holding it."""
    names = list(dict.fromkeys(n for n, _ in modules))
    groups: dict[str, list[str]] = {n: [] for n in names}
    aliases = tied_aliases(root)
    for pname, p in root.named_parameters():
        if not p.requires_grad:
            continue
        for alias in reversed(aliases.get(pname, [pname])):  # a tied one: its last holder first
            holders = [n for n in names if not n or alias.startswith(f"{n}.")]
            if holders:  # nested names are prefixes of each other: the longest is the deepest
                groups[max(holders, key=len)].append(pname)
                break
    return {n: tuple(ps) for n, ps in groups.items()}


def measured_layers(
    root: nn.Module, selectors: Sequence[str | type[nn.Module]] | None
) -> list[ICSLayer]:
    """The layers ICS measures: :func:`default_layers`, or those ``selectors`` choose.

    A selected module (by qualified-name glob or type, :func:`lightning_bn.layers.selection.match_modules`)
    is measured with the trainable parameters of its subtree, each parameter under the deepest
    selected module holding it (selecting ``"attn"`` and ``"attn.out_proj"`` measures
    ``out_proj`` on its own and the rest of ``attn`` together). A tied parameter is measured
    under the deepest selected module holding its last alias that any selected module holds.

    Raises:
        ValueError: a selector matches no module; a selector matches only modules without
            trainable parameters of their own (e.g. a ``ReLU``); both messages name the selector
            and list what the model contains.
    """
    if selectors is None:
        return default_layers(root)
    selection = match_modules(root, selectors)
    if selection.unmatched:
        sel = selection.unmatched[0]
        raise ValueError(
            f"Layer selector {_what(sel)} matches no module of {type(root).__name__}."
            f" The model contains: {describe_modules(root)}"
        )
    groups = _group_selected(root, selection.modules)
    trainable = {n for n, p in root.named_parameters() if p.requires_grad}
    for sel in selectors:
        hits = match_modules(root, [sel]).modules
        if not any(pname.startswith(f"{n}.") for n, _ in hits for pname in trainable):
            listed = ", ".join(f"{n} ({type(m).__name__})" for n, m in hits[:5])
            raise ValueError(
                f"Expected every `layers` entry to select a module with trainable parameters, but"
                f" {_what(sel)} selects only {listed}, which own none (a parameter tied to"
                " another module is measured under the module that owns it). The model"
                f" contains: {describe_modules(root)}"
            )
    return [ICSLayer(n, m, groups[n]) for n, m in selection.modules if groups[n]]


def warn_left_out(root: nn.Module, layers: Sequence[ICSLayer]) -> tuple[list[str], list[str]]:
    """Warn once about the trainable parameters none of ``layers`` measures (see
    :func:`~lightning_bn.diagnostics.tied.warn_left_out_parameters`)."""
    norms = [n for n, m in root.named_modules() if n and is_norm_layer(m)]
    measured = {p for lay in layers for p in lay.params}
    return warn_left_out_parameters(root, measured, norms, "ICSCallback")


def _what(sel: str | type[nn.Module]) -> str:
    return repr(sel) if isinstance(sel, str) else sel.__name__


def _as_layers(
    root: nn.Module, layers: Sequence[ICSLayer | tuple[str, nn.Module]], trainable: set[str]
) -> list[ICSLayer]:
    given = [lay for lay in layers if isinstance(lay, ICSLayer)]
    pairs = [lay for lay in layers if not isinstance(lay, ICSLayer)]
    lookup = {id(m) for _, m in root.named_modules()}
    if pairs:
        groups = _group_selected(root, [(n, m) for n, m in pairs if id(m) in lookup])
        given += [ICSLayer(n, m, groups.get(n, ())) for n, m in pairs]
    out = []
    for lay in given:
        own = tuple(p for p in lay.params if p in trainable)
        if own and id(lay.module) in lookup:
            out.append(ICSLayer(lay.name, lay.module, own))
    return out


@accepts_batch_triple(4)
def compute_ics(
    probe: Probe,
    layers: Sequence[ICSLayer | tuple[str, nn.Module]],
    before: Params,
    after: Params,
    step: StepRecord,
    collective: Collective | None = None,
    distributional: bool = True,
) -> dict[str, dict[str, float]]:
    r"""Gradient-based and distributional ICS of each layer between ``before`` and ``after``.

    Layers are ordered by the forward pass's first *use* of their parameters
    (:meth:`~lightning_bn.probe.Probe.use_order`, traced once per layout), and "earlier than
    layer i" means every trainable parameter first used before any parameter of layer i: those
    are at :math:`W^{t+1}` in :math:`G'_{t,i}`, everything else at :math:`W^t`. In
    ``nn.MultiheadAttention`` the order is ``in_proj_weight``, ``in_proj_bias``,
    ``out_proj.weight``, ``out_proj.bias`` (the order in which
    ``F.multi_head_attention_forward`` takes them), so :math:`G'` of ``out_proj`` has
    ``in_proj`` and everything before the attention at :math:`W^{t+1}`, although
    ``out_proj``'s ``forward`` never runs. A tied parameter (an embedding and the output layer
    sharing one weight) is measured once, in the layer of its last holder, at its last use
    (:mod:`lightning_bn.diagnostics.tied`): every parameter used before the output layer is at
    :math:`W^{t+1}` in its :math:`G'`.

    Distributional shifts need the layer's input: the first positional argument of its
    module's ``forward`` (a forward pre-hook). They are reported for a layer whose module's
    ``forward`` is called with a floating-point tensor first; a layer whose parameters are used
    without its ``forward`` running (MHA's ``out_proj``, a weight used by its parent) has no
    observable input of its own and gets the gradient keys only, and so does an embedding
    (integer inputs that no earlier layer changes).

    Args:
        probe: evaluates the model's loss at a parameter point.
        layers: the measured layers: :class:`ICSLayer` (e.g. from :func:`measured_layers`) or
            ``(qualified name, module)`` pairs (measured with the trainable parameters of the
            module's subtree, each under the deepest module given).
        before: :math:`W^t` (every parameter of the model).
        after: :math:`W^{t+1}`, what the optimiser step produced.
        step: the measured step: its batch, batch index and random state (same dropout
            masks); the older form ``batch, batch_idx, rng`` in its place still works.
        collective: averages gradients over ranks before any norm (DDP semantics) and gathers
            the layers' inputs (the union of the ranks' batches).
        distributional: also compare each layer's input at the two parameter points.

    Returns:
        ``{layer name: {"l2", "cos", "l2_rel", "mean_shift", "std_shift", "emd"}}`` with
        ``l2`` = :math:`\|G - G'\|_2`, ``cos`` = :math:`\langle G, G'\rangle/(\|G\|\|G'\|)`
        (clamped to [-1, 1]), ``l2_rel`` = :math:`\|G - G'\|_2 / \|G\|_2` over all trainable
        parameters of the layer (flattened together), and the input shifts of
        :func:`unit_shift` where the input is observable (see above). Layers whose parameters
        the forward pass does not use are left out.
    """
    coll = collective if collective is not None else Collective()
    at = _Points(probe, before, after, step)
    chosen = _as_layers(probe.module, layers, set(probe.trainable_names()))
    order = coll.guard(lambda: _UseOrder.trace(at, chosen))
    chosen = order.sort(chosen)
    if not chosen:  # no measured parameter is used by this forward pass
        return {}
    start: _Start = coll.guard(lambda: _pass_at_start(at, chosen))
    mixed = coll.guard(lambda: _mixed_passes(at, chosen, order, start, distributional))
    averaged = _average_gradients(coll, start, mixed)
    stats = [
        _layer_statistics(
            i, lay, averaged, start.inputs.get(lay.name), x_mixed, coll, distributional
        )
        for i, (lay, (_, x_mixed)) in enumerate(zip(chosen, mixed, strict=True))
    ]
    return _to_host(chosen, stats)


#: A layer's G' (its parameters' gradients at the mixed point) and its input there (if observed).
_Mixed = tuple[Params, Tensor | None]


@dataclass(frozen=True)
class _Points:
    """What every pass of :func:`compute_ics` evaluates at: W^t, W^{t+1} and the step."""

    probe: Probe
    before: Params
    after: Params
    step: StepRecord


@dataclass(frozen=True)
class _UseOrder:
    """The trainable parameters in the order the forward pass first uses them, and each
    measured layer's first use (the position of its earliest parameter)."""

    order: list[str]
    seq: dict[str, int]
    first: dict[str, int]

    @classmethod
    def trace(cls, at: _Points, layers: Sequence[ICSLayer]) -> _UseOrder:
        order = at.probe.use_order(at.before, at.step)
        # a tied parameter sits at its last use (the output layer), every other one at its first
        spans, tied = at.probe.use_spans(at.before, at.step), tied_aliases(at.probe.module)
        pos = {n: (spans[n][1] if n in tied else spans[n][0], i) for i, n in enumerate(order)}
        order = sorted(order, key=pos.__getitem__)
        seq = {n: i for i, n in enumerate(order)}
        first = {
            lay.name: min(seq[p] for p in lay.params if p in seq)
            for lay in layers
            if any(p in seq for p in lay.params)
        }
        return cls(list(order), seq, first)

    def sort(self, layers: Sequence[ICSLayer]) -> list[ICSLayer]:
        """The layers the forward pass uses, by first use."""
        used = (lay for lay in layers if lay.name in self.first)
        return sorted(used, key=lambda lay: self.first[lay.name])

    def earlier_than(self, lay: ICSLayer) -> set[str]:
        """The parameters at W^{t+1} in the layer's G': those first used before it."""
        own = set(lay.params)
        return {p for p in self.order if self.seq[p] < self.first[lay.name] and p not in own}


@dataclass(frozen=True)
class _Start:
    """The pass at W^t: every measured parameter's gradient (G) and every layer's input."""

    grads: Params
    inputs: dict[str, Tensor]

    def unchanged(self, lay: ICSLayer) -> _Mixed:
        """G' of a layer with nothing used before it: G, the very tensors, and the same input."""
        return {p: self.grads[p] for p in lay.params}, self.inputs.get(lay.name)


def _capture(store: dict[str, Tensor], key: str) -> Any:
    """A forward pre-hook storing the module's first floating-point input (once) as
    :func:`input_units` under ``key``."""

    def hook(mod: nn.Module, args: Any) -> None:
        if key in store or not args or not isinstance(args[0], Tensor):
            return
        if args[0].is_floating_point():
            store[key] = input_units(mod, args[0])

    return hook


def _hooked(layers: Sequence[ICSLayer], store: dict[str, Tensor]) -> list[Any]:
    return [lay.module.register_forward_pre_hook(_capture(store, lay.name)) for lay in layers]


def _pass_at_start(at: _Points, layers: Sequence[ICSLayer]) -> _Start:
    """One pass at W^t: every G_{t,i} and every layer's input."""
    inputs: dict[str, Tensor] = {}
    handles = _hooked(layers, inputs)
    try:
        wrt = [p for lay in layers for p in lay.params]
        grads = at.probe.loss_and_grad(at.before, at.step, wrt=wrt)[1]
    finally:
        for h in handles:
            h.remove()
    return _Start(grads, inputs)


def _mixed_pass(at: _Points, lay: ICSLayer, earlier: set[str], start: _Start) -> _Mixed:
    """G'_{t,i} sequentially: one pass at the layer's mixed point, backward to its parameters."""
    if not earlier:
        return start.unchanged(lay)
    point = {p: (at.after[p] if p in earlier else at.before[p]) for p in at.before}
    store: dict[str, Tensor] = {}
    (handle,) = _hooked([lay], store)
    try:
        _, g = at.probe.loss_and_grad(point, at.step, wrt=list(lay.params))
    finally:
        handle.remove()
    return g, store.get(lay.name)


def _mixed_batched(
    at: _Points,
    layers: Sequence[ICSLayer],
    order: _UseOrder,
    start: _Start,
    distributional: bool,
) -> list[_Mixed] | None:
    """Every G' (and mixed input) in vmapped chunks: the gradient w.r.t. the union of the
    layers' parameters at each layer's point, of which layer i's block is G'_i; ``None`` when
    the probe does not batch here or ``vmap`` failed."""
    earlier = {lay.name: order.earlier_than(lay) for lay in layers}
    todo = [lay for lay in layers if earlier[lay.name]]
    if not todo:
        return None
    values = batched_points(
        at.probe,
        at.before,
        [{p: at.after[p] for p in earlier[lay.name]} for lay in todo],
        at.step,
        list(dict.fromkeys(p for lay in todo for p in lay.params)),
        (lambda store: _hooked(todo, store)) if distributional else None,
    )
    if values is None:
        return None
    got = {lay.name: value for lay, value in zip(todo, values, strict=True)}
    out: list[_Mixed] = []
    for lay in layers:
        if lay.name not in got:
            out.append(start.unchanged(lay))
            continue
        _, grads, stored = got[lay.name]
        out.append(({p: grads[p] for p in lay.params}, stored.get(lay.name)))
    return out


def _mixed_passes(
    at: _Points,
    layers: Sequence[ICSLayer],
    order: _UseOrder,
    start: _Start,
    distributional: bool,
) -> list[_Mixed]:
    """Every layer's G' and mixed input: batched where the probe batches, else one pass each."""
    # batched only with the step's random state (without it each sequential pass draws
    # anew, which a batched evaluation cannot reproduce)
    if at.probe.vmap_chunk_size is not None and at.step.rng is not None:
        batched = _mixed_batched(at, layers, order, start, distributional)
        if batched is not None:
            return batched
    return [_mixed_pass(at, lay, order.earlier_than(lay), start) for lay in layers]


def _average_gradients(coll: Collective, start: _Start, mixed: Sequence[_Mixed]) -> Params:
    """Every gradient averaged over ranks in one all-reduce: G of all layers under ``g:<p>``,
    then layer i's G' under ``<i>:<p>`` (a layer with nothing used before it has G' = G, the
    very tensors, averaged once and left out)."""
    flat: dict[str, Tensor] = {f"g:{p}": t for p, t in start.grads.items()}
    for i, (g_mixed, _) in enumerate(mixed):
        flat.update({f"{i}:{p}": t for p, t in g_mixed.items() if t is not start.grads.get(p)})
    return coll.mean_dict(flat)


def _layer_statistics(
    i: int,
    lay: ICSLayer,
    averaged: Params,
    x0: Tensor | None,
    x_mixed: Tensor | None,
    coll: Collective,
    distributional: bool,
) -> tuple[Tensor, tuple[str, ...]]:
    """Layer i's values (one tensor, on its device) and their names: ``l2``, ``cos``,
    ``l2_rel`` from its averaged G and G', and the input shifts where both inputs are observed."""
    # in float64: G and G' are close, and their difference is the logged quantity; the
    # layer's parameters flattened into one vector each (a handful of kernels per layer)
    g = dict_flat({p: averaged[f"g:{p}"] for p in lay.params}, dtype=torch.float64)
    gp = dict_flat(
        {p: averaged.get(f"{i}:{p}", averaged[f"g:{p}"]) for p in lay.params}, dtype=torch.float64
    )
    row = list(vector_change(g, gp, eps=_EPS))
    names: tuple[str, ...] = ("l2", "cos", "l2_rel")
    if distributional and x0 is not None and x_mixed is not None:
        # gather along the values axis: the union of the ranks' batches
        x0_all = coll.gather(x0.transpose(0, 1)).transpose(0, 1)
        x1_all = coll.gather(x_mixed.transpose(0, 1)).transpose(0, 1)
        row.extend(_unit_shift_tensor(x0_all, x1_all).unbind())
        names += _SHIFT_KEYS
    return torch.stack(row), names


def _to_host(
    layers: Sequence[ICSLayer], stats: Sequence[tuple[Tensor, tuple[str, ...]]]
) -> dict[str, dict[str, float]]:
    """One transfer to the host for every value of every layer (model parallel: rows may sit on
    different devices)."""
    rows = [row for row, _ in stats]
    values = torch.cat([row.to(rows[0].device) for row in rows]).tolist()
    results: dict[str, dict[str, float]] = {}
    offset = 0
    for lay, (_, names) in zip(layers, stats, strict=True):
        results[lay.name] = dict(zip(names, values[offset : offset + len(names)], strict=True))
        offset += len(names)
    return results
