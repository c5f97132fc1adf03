r"""Preconditioned sharpness and the optimisers' stability thresholds (the edge of stability).

A step :math:`W \leftarrow W - \eta P^{-1} u` on a quadratic with Hessian :math:`H` (``u`` the
gradient, or its momentum average) is stable while the top eigenvalue of
:math:`P^{-1} H` (that of the symmetric :math:`P^{-1/2} H P^{-1/2}`) stays below a threshold set
by the step size and the momentum (Cohen et al. 2021, 2022):

* SGD (momentum :math:`\mu`, dampening :math:`d`): :math:`P = I`, threshold
  :math:`2(1+\mu) / (\eta(1-d))` (:math:`2/\eta` for plain gradient descent); Nesterov:
  :math:`2(1+\mu) / (\eta(1+2\mu))`.
* RMSprop (momentum :math:`\mu`): :math:`P = \sqrt{v_t} + \epsilon` (centred:
  :math:`\sqrt{v_t - \bar g_t^2} + \epsilon`), threshold :math:`2(1+\mu)/\eta`.
* Adam, AdamW (:math:`\beta_1, \beta_2`): :math:`P = \sqrt{v_t / (1-\beta_2^t)} + \epsilon`,
  threshold :math:`(2+2\beta_1) / ((1-\beta_1)\eta)` (:math:`38/\eta` at :math:`\beta_1 = 0.9`).

:math:`v_t` is the optimiser's own state (``exp_avg_sq`` / ``square_avg``, with its step count for
Adam's bias correction, AMSGrad's ``max_exp_avg_sq`` when on): the preconditioner of the last
update taken. Parameter groups with different learning rates are folded into :math:`P`
(:math:`P_p \to P_p\,\eta/\eta_p`, :math:`\eta` the first group's), so the one threshold of
:math:`\eta` still applies; a parameter no optimiser updates gets :math:`P^{-1} = 0`. Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_bn.diagnostics.paramvec import FlatLayout

__all__ = [
    "Preconditioner",
    "optimizer_preconditioner",
    "scaled_matvec",
    "stability_threshold",
]


@dataclass(frozen=True)
class Preconditioner:
    r"""The diagonal :math:`S = \eta_p / (\eta\,P_p)` on flat vectors and the stability threshold.

    Attributes:
        inverse: flat :math:`S` in the layout of the trainable parameters.
        threshold: the stability threshold of the preconditioned sharpness
            :math:`\lambda_{\max}(S^{1/2} H S^{1/2})`.
        identity: whether :math:`S = I` (SGD with one learning rate: the preconditioned
            sharpness is the top eigenvalue of :math:`H`).
    """

    inverse: Tensor
    threshold: float
    identity: bool


def stability_threshold(optimizer: torch.optim.Optimizer) -> float:
    """The stability threshold of ``optimizer``'s first parameter group (see the module table).

    Raises:
        TypeError: an optimiser other than SGD, RMSprop, Adam, AdamW.
    """
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(group["betas"][0])
        return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
    if isinstance(optimizer, torch.optim.RMSprop):
        return 2.0 * (1.0 + float(group.get("momentum", 0.0))) / lr
    if isinstance(optimizer, torch.optim.SGD):
        mu = float(group.get("momentum", 0.0))
        if group.get("nesterov", False):
            return 2.0 * (1.0 + mu) / (lr * (1.0 + 2.0 * mu))
        damp = float(group.get("dampening", 0.0)) if mu > 0 else 0.0
        return 2.0 * (1.0 + mu) / (lr * (1.0 - damp))
    raise TypeError(
        "Expected an optimiser of type SGD, RMSprop, Adam or AdamW for the preconditioned"
        f" sharpness, but got {type(optimizer).__name__}"
    )


def optimizer_preconditioner(
    optimizer: torch.optim.Optimizer,
    named: Mapping[str, nn.Parameter],
    layout: FlatLayout,
) -> Preconditioner | None:
    r""":math:`S` and the threshold from ``optimizer``'s state (see the module docstring).

    Args:
        optimizer: SGD, RMSprop, Adam or AdamW.
        named: the trainable parameters by name, keys in ``layout``'s order.
        layout: the flat layout of the Hessian-vector products.

    Returns:
        ``None`` when an adaptive optimiser has no state yet (before its first step), or its
        parameter groups disagree on the momentum (no single threshold).

    Raises:
        TypeError: an unsupported optimiser.
    """
    threshold = stability_threshold(optimizer)
    groups = optimizer.param_groups
    lr0 = float(groups[0]["lr"])
    momentum_key = "betas" if "betas" in groups[0] else "momentum"
    if len({str(g.get(momentum_key)) for g in groups}) > 1:
        return None
    by_id = {id(p): g for g in groups for p in g["params"]}
    # each parameter's part is computed in float64 and rounded into one flat vector: one copy
    inverse = torch.empty(layout.numel, dtype=layout.dtype, device=layout.device)
    identity = True
    for key, part in zip(layout.keys, torch.split_with_sizes(inverse, layout.numels), strict=True):
        p = named[key]
        group = by_id.get(id(p))
        if group is None or lr0 == 0:
            part.zero_()
            identity = False
            continue
        ratio = float(group["lr"]) / lr0
        denom = _denominator(optimizer, p, group)
        if denom is None:
            return None
        if isinstance(denom, float):
            part.fill_(ratio / denom)
            identity = identity and ratio == denom == 1.0
        else:
            part.copy_((ratio / denom.to(torch.float64)).reshape(-1))
            identity = False
    return Preconditioner(inverse, threshold, identity)


def _denominator(
    optimizer: torch.optim.Optimizer, p: Tensor, group: Mapping[str, object]
) -> Tensor | float | None:
    """:math:`P_p` of one parameter (``None``: no state yet)."""
    if isinstance(optimizer, torch.optim.SGD):
        return 1.0
    state = optimizer.state.get(p, {})
    eps = float(group["eps"])  # type: ignore[arg-type]
    if isinstance(optimizer, torch.optim.RMSprop):
        if "square_avg" not in state:
            return None
        avg = state["square_avg"].detach().to(torch.float64)
        if group.get("centered", False):
            avg = avg - state["grad_avg"].detach().to(torch.float64) ** 2
        return avg.sqrt() + eps
    if "exp_avg_sq" not in state:
        return None
    steps = float(state["step"])
    if steps == 0:
        return None
    beta2 = float(group["betas"][1])  # type: ignore[index]
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    v = state[key].detach().to(torch.float64)
    return (v / (1.0 - beta2**steps)).sqrt() + eps


def scaled_matvec(
    matvec: Callable[[Tensor], Tensor], inverse: Tensor
) -> Callable[[Tensor], Tensor]:
    r""":math:`v \mapsto S^{1/2} H S^{1/2} v` from :math:`v \mapsto Hv` (flat vectors)."""
    root = inverse.sqrt()

    def product(v: Tensor) -> Tensor:
        return matvec(v * root).mul_(root)

    return product
