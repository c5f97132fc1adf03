r"""Curvature of the loss along the gradient, :math:`g^\top H g / \lVert g \rVert^2`.

Plain torch. The Hessian-vector products come from :mod:`lightning_bn.diagnostics.hvp` and the
dominant eigenvalue from :mod:`lightning_bn.diagnostics.eigen`; their public names are also
importable from here, where they lived before the split.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from lightning_bn.diagnostics.eigen import EigAlgorithm, EigResult, top_hessian_eigenvalue
from lightning_bn.diagnostics.hvp import (
    HessianVectorProduct,
    HVPMethod,
    LossFn,
    grad_and_loss,
    hvp,
)
from lightning_bn.diagnostics.paramvec import (
    TensorDict,
    dict_axpy,
    dict_dot,
    dict_norm,
    dict_normalise,
)

__all__ = [
    "EigAlgorithm",
    "EigResult",
    "HVPMethod",
    "HessianVectorProduct",
    "LossFn",
    "TensorDict",
    "dict_axpy",
    "dict_dot",
    "dict_norm",
    "dict_normalise",
    "grad_and_loss",
    "gradient_curvature",
    "hessian_metrics",
    "hvp",
    "top_hessian_eigenvalue",
]


def gradient_curvature(
    hvp_fn: Callable[[TensorDict], TensorDict], grad: Mapping[str, Tensor]
) -> float:
    r"""Curvature of the loss along the gradient.

    .. math::
        \kappa = \frac{g^\top H g}{\lVert g \rVert^2} = u^\top H u, \quad u = g / \lVert g \rVert,

    computed with the unit vector :math:`u` (one Hessian-vector product) so that large gradients
    do not overflow in low precision. A quadratic model predicts the loss decrease of a step
    :math:`-\eta g` as :math:`\eta \lVert g\rVert^2 (1 - \eta\kappa/2)`.

    Args:
        hvp_fn: :math:`v \mapsto Hv`, e.g. a :class:`HessianVectorProduct`.
        grad: the gradient :math:`g`, ``{name: Tensor}``.

    Returns:
        :math:`\kappa` as a float; ``nan`` when :math:`g = 0` (the ratio is undefined).
    """
    norm = float(dict_norm(grad))
    if norm == 0.0:
        return math.nan
    u = {k: t.detach() / norm for k, t in grad.items()}
    return float(dict_dot(u, hvp_fn(u)))


def hessian_metrics(
    hvp_fn: Callable[[TensorDict], TensorDict],
    grad: TensorDict,
    start: TensorDict | None,
    **eig_kwargs: Any,
) -> tuple[dict[str, float], TensorDict | None]:
    """The Hessian part of the smoothness measurement: ``hessian_top_eig``, ``hessian_iters``,
    ``hessian_converged`` and ``grad_curvature``, with the top eigenvector.

    A model whose second derivative cannot be taken (an operation without double backward)
    gives a warning that names the reason and no Hessian keys, so the first-order quantities
    measured before still get logged.

    Args:
        hvp_fn: the Hessian-vector product (averaged over ranks).
        grad: the gradient :math:`g` at the point.
        start: warm start of the eigenvalue solver, or ``None``.
        **eig_kwargs: the keyword arguments of :func:`top_hessian_eigenvalue`.
    """
    try:
        eig = top_hessian_eigenvalue(hvp_fn, start, **eig_kwargs)
        g_norm = float(dict_norm(grad))
        curvature = gradient_curvature(hvp_fn, grad) if g_norm > 0 else math.nan
    except RuntimeError as exc:  # e.g. "derivative for ... is not implemented"
        warnings.warn(
            f"lightning-bn: no Hessian quantities at this step (the first-order ones are logged):"
            f" {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            stacklevel=2,
        )
        return {}, None
    metrics = {
        "hessian_top_eig": eig.eigenvalue,
        "hessian_iters": float(eig.iterations),
        "hessian_converged": float(eig.converged),
        "grad_curvature": curvature,
    }
    return metrics, eig.eigenvector
