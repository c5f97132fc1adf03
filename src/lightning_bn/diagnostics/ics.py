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

import numpy as np
import torch
from torch import Tensor, nn

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


def input_units(module: nn.Module, x: Tensor) -> Tensor:
    """Reshape a layer's input to ``(units, values)``: a unit is a channel (dimension 1) for a
    convolution and a feature (last dimension) otherwise; values run over batch (× positions)."""
    x = x.detach()
    if isinstance(module, nn.modules.conv._ConvNd):
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    return x.reshape(-1, x.shape[-1]).transpose(0, 1)


def unit_shift(before: Tensor, after: Tensor) -> dict[str, float]:
    r"""Distributional shift between two ``(units, values)`` tensors with the same number of values.

    .. math::
        \text{mean\_shift} = \frac1U \sum_u |\bar x'_u - \bar x_u|, \quad
        \text{std\_shift} = \frac1U \sum_u |s'_u - s_u|, \quad
        \text{emd} = \frac1U \sum_u \frac1n \sum_r |x'_{u,(r)} - x_{u,(r)}|,

    with :math:`s` the population (biased) standard deviation and :math:`x_{u,(r)}` the r-th
    smallest value of unit u: in one dimension the earth mover's (Wasserstein-1) distance between
    two empirical distributions of n values is the mean absolute difference of their sorted values.
    """
    values = _unit_shift_tensor(before, after).tolist()
    return dict(zip(_SHIFT_KEYS, values, strict=True))


_SHIFT_KEYS = ("mean_shift", "std_shift", "emd")


def _unit_shift_tensor(before: Tensor, after: Tensor) -> Tensor:
    """:func:`unit_shift`'s three values as one tensor (no host synchronisation on a GPU)."""
    both = torch.stack([before, after])  # (2, units, values): one kernel call per statistic
    var, mean = torch.var_mean(both, dim=2, correction=0)
    if both.device.type == "cpu":  # numpy sorts short rows about 20x faster than torch on CPU
        data = both if both.dtype in (torch.float32, torch.float64) else both.float()
        ordered = torch.from_numpy(np.sort(data.numpy(), axis=2))
    else:
        ordered = both.sort(dim=2).values
    emd = (ordered[1] - ordered[0]).abs().mean(dim=1)
    return torch.stack(
        [
            (mean[1] - mean[0]).abs().mean().double(),
            (var[1].sqrt() - var[0].sqrt()).abs().mean().double(),
            emd.mean().double(),
        ]
    )


def _flat64(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors flattened and concatenated, in float64 (on the first one's device)."""
    device = tensors[0].device
    return torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])


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
    chosen = _as_layers(probe.module, layers, set(probe.trainable_names()))
    order = coll.guard(lambda: probe.use_order(before, step))
    # a tied parameter sits at its last use (the output layer), every other one at its first
    spans, tied = probe.use_spans(before, step), tied_aliases(probe.module)
    at = {n: (spans[n][1] if n in tied else spans[n][0], i) for i, n in enumerate(order)}
    order = sorted(order, key=at.__getitem__)
    seq = {n: i for i, n in enumerate(order)}
    first = {
        lay.name: min(seq[p] for p in lay.params if p in seq)
        for lay in chosen
        if any(p in seq for p in lay.params)
    }
    chosen = sorted((lay for lay in chosen if lay.name in first), key=lambda lay: first[lay.name])
    if not chosen:  # no measured parameter is used by this forward pass
        return {}
    inputs0: dict[str, Tensor] = {}

    def capture(store: dict[str, Tensor], key: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            if key in store or not args or not isinstance(args[0], Tensor):
                return
            if args[0].is_floating_point():
                store[key] = input_units(mod, args[0])

        return hook

    # pass at W^t: every G and every layer's input
    all_wrt = [p for layer in chosen for p in layer.params]

    def first_pass() -> Params:
        handles = [
            lay.module.register_forward_pre_hook(capture(inputs0, lay.name)) for lay in chosen
        ]
        try:
            return probe.loss_and_grad(before, step, wrt=all_wrt)[1]
        finally:
            for h in handles:
                h.remove()

    grads0: Params = coll.guard(first_pass)

    def earlier_than(lay: ICSLayer) -> set[str]:
        own = set(lay.params)
        return {p for p in order if seq[p] < first[lay.name] and p not in own}

    def mixed_pass(lay: ICSLayer) -> tuple[Params, Tensor | None]:
        earlier = earlier_than(lay)
        if not earlier:  # nothing is used before this layer: G' = G, same input
            return {p: grads0[p] for p in lay.params}, inputs0.get(lay.name)
        point = {p: (after[p] if p in earlier else before[p]) for p in before}
        store: dict[str, Tensor] = {}
        handle = lay.module.register_forward_pre_hook(capture(store, lay.name))
        try:
            _, g = probe.loss_and_grad(point, step, wrt=list(lay.params))
        finally:
            handle.remove()
        return g, store.get(lay.name)

    def mixed_batched() -> list[tuple[Params, Tensor | None]] | None:
        """Every G' (and mixed input) in vmapped chunks: the gradient w.r.t. the union of the
        layers' parameters at each layer's point, of which layer i's block is G'_i."""
        earlier = {lay.name: earlier_than(lay) for lay in chosen}
        todo = [lay for lay in chosen if earlier[lay.name]]
        if not todo:
            return None

        def hooks(store: dict[str, Tensor]) -> list[Any]:
            return [lay.module.register_forward_pre_hook(capture(store, lay.name)) for lay in todo]

        values = batched_points(
            probe,
            before,
            [{p: after[p] for p in earlier[lay.name]} for lay in todo],
            step,
            list(dict.fromkeys(p for lay in todo for p in lay.params)),
            hooks if distributional else None,
        )
        if values is None:  # not batching (setting, device) or vmap failed: sequential
            return None
        at = {lay.name: value for lay, value in zip(todo, values, strict=True)}
        out: list[tuple[Params, Tensor | None]] = []
        for lay in chosen:
            if lay.name not in at:  # nothing is used before this layer: G' = G, same input
                out.append(({p: grads0[p] for p in lay.params}, inputs0.get(lay.name)))
                continue
            _, grads, stored = at[lay.name]
            out.append(({p: grads[p] for p in lay.params}, stored.get(lay.name)))
        return out

    def mixed_passes() -> list[tuple[Params, Tensor | None]]:
        # batched only with the step's random state (without it each sequential pass draws
        # anew, which a batched evaluation cannot reproduce)
        use_vmap = probe.vmap_chunk_size is not None and step.rng is not None
        batched = mixed_batched() if use_vmap else None
        return batched if batched is not None else [mixed_pass(lay) for lay in chosen]

    mixed = coll.guard(mixed_passes)
    # every gradient averaged over ranks in one all-reduce (G of all layers, then each G'; a
    # layer with nothing used before it has G' = G, the very tensors, averaged once)
    flat: dict[str, Tensor] = {f"g:{p}": t for p, t in grads0.items()}
    for i, (g_mixed_local, _) in enumerate(mixed):
        flat.update({f"{i}:{p}": t for p, t in g_mixed_local.items() if t is not grads0.get(p)})
    averaged = coll.mean_dict(flat)
    rows: list[Tensor] = []
    keys: list[tuple[str, tuple[str, ...]]] = []
    for i, (lay, (_, x_mixed)) in enumerate(zip(chosen, mixed, strict=True)):
        # in float64: G and G' are close, and their difference is the logged quantity; the
        # layer's parameters flattened into one vector each (a handful of kernels per layer)
        g = _flat64([averaged[f"g:{p}"] for p in lay.params])
        gp = _flat64([averaged.get(f"{i}:{p}", averaged[f"g:{p}"]) for p in lay.params])
        diff = torch.linalg.vector_norm(g - gp)
        g_norm = torch.linalg.vector_norm(g)
        gp_norm = torch.linalg.vector_norm(gp)
        # rounding can put the quotient a few ulps outside [-1, 1]
        cos = (torch.dot(g, gp) / torch.clamp(g_norm * gp_norm, min=_EPS)).clamp(-1.0, 1.0)
        row = [diff, cos, diff / torch.clamp(g_norm, min=_EPS)]
        names: tuple[str, ...] = ("l2", "cos", "l2_rel")
        x0 = inputs0.get(lay.name)
        if distributional and x0 is not None and x_mixed is not None:
            # gather along the values axis: the union of the ranks' batches
            x0_all = coll.gather(x0.transpose(0, 1)).transpose(0, 1)
            x1_all = coll.gather(x_mixed.transpose(0, 1)).transpose(0, 1)
            row.extend(_unit_shift_tensor(x0_all, x1_all).unbind())
            names += _SHIFT_KEYS
        rows.append(torch.stack(row))
        keys.append((lay.name, names))
    # one transfer to the host for every value of every layer
    values = torch.cat([row.to(rows[0].device) for row in rows]).tolist()  # model parallel
    results: dict[str, dict[str, float]] = {}
    offset = 0
    for name, names in keys:
        results[name] = dict(zip(names, values[offset : offset + len(names)], strict=True))
        offset += len(names)
    return results
