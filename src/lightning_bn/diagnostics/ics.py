r"""Internal covariate shift: the gradient form of Santurkar et al. (Def. 2.1) and the distributional one.

Plain torch. For layers :math:`i = 1..k` (parameterised modules in forward-execution order), weights
:math:`W^t` before and :math:`W^{t+1}` after the real optimiser step, and the step's batch:

.. math::
    G_{t,i} = \nabla_{W_i} L(W_1^t, \dots, W_k^t), \qquad
    G'_{t,i} = \nabla_{W_i} L(W_1^{t+1}, \dots, W_{i-1}^{t+1}, W_i^t, \dots, W_k^t).

One pass at :math:`W^t` gives every :math:`G_{t,i}` (and every layer's input); the first layer's
:math:`G'` equals its :math:`G`; each other :math:`G'_{t,i}` takes one pass whose backward stops at
layer i. k layers therefore cost k gradient evaluations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_bn.paramvec import dict_dot, dict_norm, dict_sub
from lightning_bn.probe import (
    Collective,
    Params,
    Probe,
    StepRecord,
    accepts_batch_triple,
    execution_order,
)
from lightning_bn.selection import match_modules

__all__ = ["ICSLayer", "compute_ics", "input_units", "resolve_layers", "unit_shift"]

_EPS = 1e-12


@dataclass(frozen=True)
class ICSLayer:
    """A measured layer: its qualified name and the names of its trainable parameters."""

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
    both = torch.stack([before, after])  # (2, units, values): one kernel call per statistic
    var, mean = torch.var_mean(both, dim=2, correction=0)
    if both.device.type == "cpu":  # numpy sorts short rows about 20x faster than torch on CPU
        data = both if both.dtype in (torch.float32, torch.float64) else both.float()
        ordered = torch.from_numpy(np.sort(data.numpy(), axis=2))
    else:
        ordered = both.sort(dim=2).values
    emd = (ordered[1] - ordered[0]).abs().mean(dim=1)
    return {
        "mean_shift": float((mean[1] - mean[0]).abs().mean()),
        "std_shift": float((var[1].sqrt() - var[0].sqrt()).abs().mean()),
        "emd": float(emd.mean()),
    }


# the layers ICS measures when none are chosen: every Linear and Conv1d/2d/3d
_DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


def resolve_layers(
    module: nn.Module, selectors: Sequence[str | type[nn.Module]] | None
) -> list[tuple[str, nn.Module]]:
    """Modules chosen by qualified-name globs or types (default: Linear and Conv1d/2d/3d).

    Selection is :func:`lightning_bn.selection.match_modules` (a union, in registration order).

    Raises:
        ValueError: a selector matches no module (names the selector).
    """
    selection = match_modules(module, selectors, default=_DEFAULT_LAYER_TYPES)
    if selection.unmatched:
        sel = selection.unmatched[0]
        what = repr(sel) if isinstance(sel, str) else sel.__name__
        names = [n for n, _ in module.named_modules() if n]
        raise ValueError(
            f"Layer selector {what} matches no module of {type(module).__name__}; "
            f"module names look like {names[:5]}"
        )
    return selection.modules


def _owner(param_name: str) -> str:
    return param_name.rpartition(".")[0]


@accepts_batch_triple(4)
def compute_ics(
    probe: Probe,
    layers: Sequence[tuple[str, nn.Module]],
    before: Params,
    after: Params,
    step: StepRecord,
    collective: Collective | None = None,
    distributional: bool = True,
) -> dict[str, dict[str, float]]:
    r"""Gradient-based and distributional ICS of each layer between ``before`` and ``after``.

    Args:
        probe: evaluates the model's loss at a parameter point.
        layers: ``(qualified name, module)`` of the measured layers.
        before: :math:`W^t` (every parameter of the model).
        after: :math:`W^{t+1}`, what the optimiser step produced.
        step: the measured step: its batch, batch index and random state (same dropout
            masks); the older form ``batch, batch_idx, rng`` in its place still works.
        collective: averages gradients over ranks before any norm (DDP semantics) and gathers
            the layers' inputs (the union of the ranks' batches).
        distributional: also compare each layer's input at the two parameter points.

    Returns:
        ``{layer name: {"l2", "cos", "l2_rel", "mean_shift", "std_shift", "emd"}}`` with
        ``l2`` = :math:`\|G - G'\|_2`, ``cos`` = :math:`\langle G, G'\rangle/(\|G\|\|G'\|)`,
        ``l2_rel`` = :math:`\|G - G'\|_2 / \|G\|_2` over all trainable parameters of the layer
        (weight and bias flattened together), and the input shifts of :func:`unit_shift`.
        Layers that did not run in the forward pass are left out.
    """
    coll = collective if collective is not None else Collective()
    trainable = set(probe.trainable_names())
    lookup = {id(m): n for n, m in probe.module.named_modules()}
    chosen: list[ICSLayer] = []
    for name, mod in layers:
        own = tuple(f"{name}.{p}" for p, _ in mod.named_parameters() if f"{name}.{p}" in trainable)
        if own and id(mod) in lookup:
            chosen.append(ICSLayer(name, mod, own))
    inputs0: dict[str, Tensor] = {}

    def capture(store: dict[str, Tensor], key: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            if key not in store and args and isinstance(args[0], Tensor):
                store[key] = input_units(mod, args[0])

        return hook

    # pass at W^t: every G and every layer's input, and the forward-execution order
    all_wrt = [p for layer in chosen for p in layer.params]
    grads0: Params = {}

    def first_pass() -> None:
        handles = [
            lay.module.register_forward_pre_hook(capture(inputs0, lay.name)) for lay in chosen
        ]
        try:
            nonlocal grads0
            _, grads0 = probe.loss_and_grad(before, step, wrt=all_wrt)
        finally:
            for h in handles:
                h.remove()

    order = coll.guard(lambda: execution_order(probe.module, first_pass))
    rank = {n: i for i, n in enumerate(order)}
    chosen = [lay for lay in chosen if lay.name in rank]
    chosen.sort(key=lambda lay: rank[lay.name])

    def mixed_pass(lay: ICSLayer) -> tuple[Params, Tensor | None]:
        subtree = set(lay.params) | {f"{lay.name}.{p}" for p, _ in lay.module.named_parameters()}
        earlier = {
            p
            for p in before
            if p not in subtree and rank.get(_owner(p), len(rank)) < rank[lay.name]
        }
        if not earlier:  # nothing runs before this layer: G' = G, same input
            return {p: grads0[p] for p in lay.params}, inputs0.get(lay.name)
        point = {p: (after[p] if p in earlier else before[p]) for p in before}
        store: dict[str, Tensor] = {}
        handle = lay.module.register_forward_pre_hook(capture(store, lay.name))
        try:
            _, g = probe.loss_and_grad(point, step, wrt=list(lay.params))
        finally:
            handle.remove()
        return g, store.get(lay.name)

    mixed = coll.guard(lambda: [mixed_pass(lay) for lay in chosen])
    g_all = coll.mean_dict(grads0)
    results: dict[str, dict[str, float]] = {}
    for lay, (g_mixed_local, x_mixed) in zip(chosen, mixed, strict=True):
        g_mixed = coll.mean_dict(g_mixed_local)
        # in float64: G and G' are close, and their difference is the logged quantity
        g = {p: g_all[p].double() for p in lay.params}
        gp = {p: g_mixed[p].double() for p in lay.params}
        diff = dict_norm(dict_sub(g, gp))
        g_norm = dict_norm(g)
        gp_norm = dict_norm(gp)
        cos = dict_dot(g, gp) / torch.clamp(g_norm * gp_norm, min=_EPS)
        out = {
            "l2": float(diff),
            "cos": float(cos),
            "l2_rel": float(diff / torch.clamp(g_norm, min=_EPS)),
        }
        x0 = inputs0.get(lay.name)
        if distributional and x0 is not None and x_mixed is not None:
            # gather along the values axis: the union of the ranks' batches
            x0_all = coll.gather(x0.transpose(0, 1)).transpose(0, 1)
            x1_all = coll.gather(x_mixed.transpose(0, 1)).transpose(0, 1)
            out.update(unit_shift(x0_all, x1_all))
        results[lay.name] = out
    return results
