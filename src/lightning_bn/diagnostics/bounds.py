r"""Theorems 4.1 and 4.2 of Santurkar et al. (2018), checked per BatchNorm layer.

For one BatchNorm layer with input :math:`y` and output :math:`z = \gamma \hat y + \beta`, a *unit*
:math:`j` is a channel and its batch vector :math:`y_j \in \mathbb{R}^m` collects the
:math:`m = N \cdot \prod \text{spatial}` entries of that channel. With the layer's own statistics

.. math::
    \mu_j = \tfrac1m \langle 1, y_j \rangle, \quad
    \sigma_j^2 = \tfrac1m \lVert y_j - \mu_j 1 \rVert^2 \ \text{(biased)}, \quad
    s_j = \sqrt{\sigma_j^2 + \epsilon}, \quad
    \hat y_j = \frac{y_j - \mu_j 1}{s_j}, \quad
    g_j = \frac{\partial L}{\partial z_j},

the gradient reaching the layer's input is exactly (for every :math:`\epsilon \ge 0`)

.. math::
    \nabla_{y_j} L = \frac{\gamma_j}{s_j} P_j g_j, \qquad
    P_j = I - \tfrac1m 1 1^\top - \tfrac1m \hat y_j \hat y_j^\top,

and Theorem 4.1 bounds its size by that of :math:`g_j` with the two directions BatchNorm removes:

.. math::
    \lVert \nabla_{y_j} L \rVert^2 \le \frac{\gamma_j^2}{s_j^2} \Bigl(
        \lVert g_j \rVert^2 - \tfrac1m \langle 1, g_j \rangle^2
        - \tfrac1m \langle g_j, \hat y_j \rangle^2 \Bigr).

This module imports no Lightning; the tensors come from hooks on a real model (the left side from
autograd, not from the formula, so the check tests the layer as well as the algebra).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_bn._types import scalar_loss
from lightning_bn._validation import check_float

__all__ = [
    "Theorem41Result",
    "Theorem42Result",
    "batchnorm_input_grad",
    "theorem41_bound",
    "theorem42_terms",
]


@dataclass(frozen=True)
class Theorem41Result:
    r"""Both sides of Theorem 4.1 for every channel of one BatchNorm layer.

    Attributes:
        lhs: ``(C,)``, :math:`\lVert \nabla_{y_j} L \rVert^2` from the given (autograd) gradient.
        rhs: ``(C,)``, :math:`\frac{\gamma_j^2}{s_j^2}(\lVert g_j\rVert^2 - \frac1m\langle 1,
            g_j\rangle^2 - \frac1m\langle g_j, \hat y_j\rangle^2)`.
        ratio: :math:`\sum_j \mathrm{lhs}_j / \sum_j \mathrm{rhs}_j` (a float); ``<= 1`` up to
            rounding, ``== 1`` for ``eps = 0``. ``nan`` when both sums are 0 (see "Zero right side"
            in :func:`theorem41_bound`: no gradient reaches the layer, or :math:`\gamma = 0`),
            ``inf`` when only the right side is 0 (a violation).
    """

    lhs: Tensor
    rhs: Tensor
    ratio: float

    @property
    def channel_ratio(self) -> Tensor:
        """``(C,)``, ``lhs / rhs`` per channel (``nan`` for 0/0, ``inf`` for x/0, as in torch)."""
        return self.lhs / self.rhs


def theorem41_bound(
    y: Tensor,
    grad_y: Tensor,
    grad_z: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-5,
    *,
    channel_dim: int = 1,
) -> Theorem41Result:
    r"""Left and right side of Theorem 4.1, per channel, and their summed ratio.

    .. math::
        \mathrm{lhs}_j = \lVert \nabla_{y_j} L \rVert^2, \qquad
        \mathrm{rhs}_j = \frac{\gamma_j^2}{s_j^2} \Bigl( \lVert g_j \rVert^2
            - \tfrac1m \langle 1, g_j \rangle^2 - \tfrac1m \langle g_j, \hat y_j \rangle^2 \Bigr),
        \qquad \mathrm{ratio} = \frac{\sum_j \mathrm{lhs}_j}{\sum_j \mathrm{rhs}_j},

    with :math:`s_j = \sqrt{\sigma_j^2 + \epsilon}` and the biased batch variance, i.e. exactly the
    statistics the layer normalises with (``1/m`` on both subtracted terms).

    **Why it holds.** The exact gradient is :math:`\frac{\gamma_j}{s_j} P g` with
    :math:`P = I - \frac1m 11^\top - \frac1m \hat y\hat y^\top` (:func:`batchnorm_input_grad`).
    Since :math:`\langle 1, \hat y \rangle = 0` and
    :math:`r := \lVert \hat y \rVert^2 = m\sigma^2/(\sigma^2 + \epsilon) \le m`,

    .. math::
        \lVert P g \rVert^2 = \lVert g \rVert^2 - \tfrac1m \langle 1, g \rangle^2
            - \tfrac2m \langle g, \hat y \rangle^2 + \tfrac{r}{m^2} \langle g, \hat y \rangle^2
        \le \lVert g \rVert^2 - \tfrac1m \langle 1, g \rangle^2
            - \tfrac1m \langle g, \hat y\rangle^2,

    the gap being :math:`\frac{m - r}{m^2}\langle g, \hat y\rangle^2 =
    \frac{\epsilon}{m(\sigma^2 + \epsilon)}\langle g, \hat y\rangle^2 \ge 0`. For
    :math:`\epsilon = 0` (and :math:`\sigma > 0`) :math:`r = m`, :math:`P` is the orthogonal
    projection onto :math:`\{1, \hat y\}^\perp` and the bound is an identity. The bracket is
    computed in exactly this split form, :math:`\lVert P g \rVert^2 + \frac{\epsilon}{m(\sigma^2 +
    \epsilon)} \langle g, \hat y\rangle^2` with :math:`Pg = (g - \bar g 1) - \frac1m \langle g -
    \bar g 1, \hat y\rangle \hat y`: algebraically the expression above, but a sum of two
    non-negative terms, so it never goes negative and does not lose the small right sides of
    nearly degenerate channels to cancellation.

    **Zero right side.** :math:`\mathrm{rhs}_j = 0` exactly when :math:`\gamma_j = 0`, or
    :math:`g_j \in \mathrm{span}\{1\}` (no gradient, or a constant one), or :math:`\epsilon = 0`
    and :math:`g_j \in \mathrm{span}\{1, \hat y_j\}`; then :math:`\mathrm{lhs}_j = 0` too (up to
    rounding) and the channel adds nothing to either sum. The per-channel ratio is ``nan`` there;
    the summed ratio is ``nan`` only when every channel is such a channel. With ``eps = 0`` a
    constant channel (:math:`\sigma_j = 0`) has no normalisation at all (the layer itself outputs
    ``nan``); its right side is ``nan`` and so is the ratio.

    Args:
        y: the layer's input, ``(N, C)`` or ``(N, C, *spatial)`` (channel at ``channel_dim``).
        grad_y: :math:`\partial L / \partial y`, same shape: the real gradient (autograd, a tensor
            hook), not the formula.
        grad_z: :math:`\partial L / \partial z`, the gradient w.r.t. the layer's output, same shape.
        weight: the affine :math:`\gamma`, ``(C,)``, or ``None`` for a layer without affine
            parameters (:math:`\gamma = 1`).
        eps: the layer's :math:`\epsilon` (``>= 0``).
        channel_dim: dimension of the channels (``-1`` for channels-last layers).

    Returns:
        :class:`Theorem41Result`; ``lhs``/``rhs`` in the promoted dtype of the inputs (at least
        float32), detached. In float32 the ratio carries rounding of order ``1e-6``.

    Raises:
        ValueError: mismatched shapes, fewer than 2 dimensions, ``weight`` not ``(C,)``, or a
            negative ``eps``.
    """
    y2, g2, gamma = _per_channel(y, grad_z, weight, eps, channel_dim, grad_y=grad_y)
    dy2 = _flat_channels(grad_y, channel_dim).to(y2.dtype)
    m = y2.shape[1]
    yhat, s, var = _normalise(y2, eps)
    gc = g2 - g2.mean(dim=1, keepdim=True)
    proj = (gc * yhat).sum(dim=1)  # ⟨g, ŷ⟩ = ⟨g - ḡ1, ŷ⟩ since ⟨1, ŷ⟩ = 0
    # ‖g‖² - ⟨1,g⟩²/m - ⟨g,ŷ⟩²/m, written as a sum of two non-negative terms (no cancellation)
    residual = gc - (proj / m)[:, None] * yhat
    bracket = residual.square().sum(dim=1) + proj.square() * eps / (m * (var + eps))
    rhs = (gamma / s).square() * bracket
    lhs = dy2.square().sum(dim=1)
    return Theorem41Result(lhs=lhs, rhs=rhs, ratio=_safe_ratio(lhs.sum(), rhs.sum()))


def batchnorm_input_grad(
    y: Tensor,
    grad_z: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-5,
    *,
    channel_dim: int = 1,
) -> Tensor:
    r"""The exact gradient w.r.t. a (train-mode) BatchNorm layer's input, from the formula.

    .. math::
        \nabla_{y_j} L = \frac{\gamma_j}{s_j} \Bigl( g_j - \tfrac1m \langle 1, g_j \rangle 1
            - \tfrac1m \langle g_j, \hat y_j \rangle \hat y_j \Bigr),
        \qquad s_j = \sqrt{\sigma_j^2 + \epsilon},

    obtained from :math:`\partial \hat y_i / \partial y_k = \frac{1}{s}(\delta_{ik} - \frac1m -
    \frac1m \hat y_i \hat y_k)` (the derivative of :math:`s` is :math:`\partial s/\partial y_k =
    (y_k - \mu)/(m s)`); valid for every :math:`\epsilon \ge 0`. A cross-check of autograd and of
    the layer, and the way to get :math:`\nabla_y L` from :math:`\partial L/\partial z` alone.

    Args:
        y: the layer's input, ``(N, C, *spatial)`` (channel at ``channel_dim``).
        grad_z: :math:`\partial L / \partial z`, same shape.
        weight: :math:`\gamma`, ``(C,)``, or ``None`` (ones).
        eps: the layer's :math:`\epsilon`.
        channel_dim: dimension of the channels.

    Returns:
        :math:`\partial L / \partial y`, the shape of ``y``, in the promoted dtype (at least
        float32), detached.

    Raises:
        ValueError: as :func:`theorem41_bound`.
    """
    y2, g2, gamma = _per_channel(y, grad_z, weight, eps, channel_dim)
    m = y2.shape[1]
    yhat, s, _ = _normalise(y2, eps)
    g_mean = g2.mean(dim=1, keepdim=True)
    proj = ((g2 - g_mean) * yhat).sum(dim=1, keepdim=True)
    dy2 = (gamma / s)[:, None] * (g2 - g_mean - proj / m * yhat)
    return _unflat_channels(dy2, y.shape, channel_dim)


@dataclass(frozen=True)
class Theorem42Result:
    r"""Both sides of Theorem 4.2 for every channel of one BatchNorm layer.

    Attributes:
        lhs: ``(C,)``, :math:`\hat g_j^\top \nabla^2_{y_j} L \, \hat g_j`.
        rhs: ``(C,)``, :math:`\frac{\gamma_j^2}{s_j^2} \hat g_j^\top H_{jj} \hat g_j
            - \frac{\gamma_j}{m s_j^2} \langle g_j, \hat y_j\rangle \lVert \hat g_j \rVert^2`.
        hessian_term: ``(C,)``, :math:`\frac{\gamma_j^2}{s_j^2} \hat g_j^\top H_{jj} \hat g_j`.
        correction: ``(C,)``, :math:`\frac{\gamma_j}{m s_j^2} \langle g_j, \hat y_j\rangle
            \lVert \hat g_j \rVert^2` (subtracted).
    """

    lhs: Tensor
    rhs: Tensor
    hessian_term: Tensor
    correction: Tensor


def theorem42_terms(
    y: Tensor,
    downstream: Callable[[Tensor], Tensor],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    channel_dim: int = 1,
) -> Theorem42Result:
    r"""Both sides of Theorem 4.2 (the effect of BatchNorm on smoothness), per channel.

    With :math:`\hat g_j = \nabla_{y_j} L` (the gradient w.r.t. unit :math:`j` of the layer's
    input), :math:`H_{jj} = \nabla^2_{z_j} L` (the Hessian w.r.t. unit :math:`j` of the layer's
    output, other units held fixed) and :math:`g_j = \partial L / \partial z_j`:

    .. math::
        \hat g_j^\top \nabla^2_{y_j} L \, \hat g_j \;\le\;
        \frac{\gamma_j^2}{s_j^2} \hat g_j^\top H_{jj} \hat g_j
        - \frac{\gamma_j}{m s_j^2} \langle g_j, \hat y_j \rangle \lVert \hat g_j \rVert^2 .

    For :math:`\epsilon = 0` this is an *identity*: the second-order chain rule gives
    :math:`\nabla^2_{y_j} L = J^\top H_{jj} J + \gamma_j \sum_i g_{j,i} \nabla^2 \hat y_{j,i}`
    with :math:`J = \frac{\gamma_j}{s_j} P_j`; :math:`\hat g_j` lies in the range of the projection
    :math:`P_j`, so the first term gives
    :math:`\frac{\gamma_j^2}{s_j^2}\hat g_j^\top H_{jj}\hat g_j`,
    and :math:`\hat y = \sqrt m\, u/\lVert u \rVert` (:math:`u` the centred input) has curvature
    :math:`-\frac{\langle g, \hat y\rangle}{\sqrt m\,\lVert u\rVert^2}` on
    :math:`\{1, \hat y\}^\perp`, which gives the second term. For :math:`\epsilon > 0`, :math:`P_j`
    is no longer a projection and both sides differ by terms of relative order
    :math:`\epsilon / \sigma_j^2` *of either sign* (the first term involves the arbitrary
    :math:`H_{jj}`), so the statement is an approximation there, not a guaranteed inequality.

    Cost: two Hessian-vector products per channel (a backward pass each, ``2C`` in all), through
    ``downstream``; meant for tests and small layers.

    Args:
        y: the layer's input, ``(N, C, *spatial)`` (channel at ``channel_dim``).
        downstream: ``z -> L``, the rest of the network and the loss as a function of the layer's
            output (twice differentiable, same data and dropout masks on every call).
        weight: :math:`\gamma`, ``(C,)``, or ``None`` (ones).
        bias: :math:`\beta`, ``(C,)``, or ``None`` (zeros).
        eps: the layer's :math:`\epsilon`.
        channel_dim: dimension of the channels.

    Returns:
        :class:`Theorem42Result`, detached, in the promoted dtype (at least float32).

    Raises:
        ValueError: as :func:`theorem41_bound`; a ``downstream`` that returns no scalar.
    """
    y2, _, gamma = _per_channel(y, y, weight, eps, channel_dim)
    c, m = y2.shape
    beta = torch.zeros_like(gamma) if bias is None else bias.detach().to(gamma)
    if beta.shape != gamma.shape:
        raise ValueError(
            f"Expected argument `bias` to have shape ({c},), but got {tuple(beta.shape)}"
        )

    def loss_of_flat_z(z2: Tensor) -> Tensor:
        out = downstream(_unflat_channels(z2, y.shape, channel_dim).to(y.dtype))
        return scalar_loss(out, "`downstream`")

    with torch.enable_grad():
        y_leaf = y2.detach().requires_grad_(True)
        yhat, s, _ = _normalise(y_leaf, eps)
        z2 = gamma[:, None] * yhat + beta[:, None]
        z_leaf = z2.detach().requires_grad_(True)
        # One graph per side: through the normalisation (y) and after it (z).
        (gy,) = torch.autograd.grad(loss_of_flat_z(z2), y_leaf, create_graph=True)
        (gz,) = torch.autograd.grad(loss_of_flat_z(z_leaf), z_leaf, create_graph=True)
        ghat = gy.detach()
        lhs = torch.empty(c, dtype=y2.dtype, device=y2.device)
        quad = torch.empty_like(lhs)
        for j in range(c):
            d = torch.zeros_like(ghat)
            d[j] = ghat[j]
            (hy_d,) = torch.autograd.grad(gy, y_leaf, grad_outputs=d, retain_graph=True)
            (hz_d,) = torch.autograd.grad(gz, z_leaf, grad_outputs=d, retain_graph=True)
            lhs[j] = (d[j] * hy_d[j]).sum()
            quad[j] = (d[j] * hz_d[j]).sum()
    s = s.detach()
    yhat = yhat.detach()
    g = gz.detach()
    hessian_term = (gamma / s).square() * quad
    correction = gamma / (m * s.square()) * (g * yhat).sum(dim=1) * ghat.square().sum(dim=1)
    return Theorem42Result(
        lhs=lhs.detach(),
        rhs=hessian_term - correction,
        hessian_term=hessian_term,
        correction=correction,
    )


# --- Internals -----------------------------------------------------------------------------------
def _per_channel(
    y: Tensor,
    grad_z: Tensor,
    weight: Tensor | None,
    eps: float,
    channel_dim: int,
    *,
    grad_y: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate, and return ``y`` and ``grad_z`` as ``(C, m)`` and ``γ`` as ``(C,)``."""
    if y.dim() < 2:
        raise ValueError(
            f"Expected `y` with at least 2 dimensions (N, C, ...), got {tuple(y.shape)}"
        )
    for name, t in (("grad_z", grad_z), ("grad_y", grad_y)):
        if t is not None and t.shape != y.shape:
            raise ValueError(
                f"Expected `{name}` to have the shape of `y` {tuple(y.shape)}, "
                f"but got {tuple(t.shape)}"
            )
    check_float("eps", eps, minimum=0)
    dtype = torch.promote_types(torch.promote_types(y.dtype, grad_z.dtype), torch.float32)
    y2 = _flat_channels(y, channel_dim).to(dtype)
    g2 = _flat_channels(grad_z, channel_dim).to(dtype)
    c = y2.shape[0]
    if weight is None:
        gamma = torch.ones(c, dtype=dtype, device=y.device)
    else:
        if weight.shape != (c,):
            raise ValueError(
                f"Expected argument `weight` to have shape ({c},), but got {tuple(weight.shape)}"
            )
        gamma = weight.detach().to(dtype=dtype, device=y.device)
    return y2, g2, gamma


def _flat_channels(t: Tensor, channel_dim: int) -> Tensor:
    """``(..., C, ...) -> (C, m)``: channel first, every other dimension flattened."""
    c = t.shape[channel_dim]
    return t.detach().movedim(channel_dim, 0).reshape(c, -1)


def _unflat_channels(t2: Tensor, shape: torch.Size, channel_dim: int) -> Tensor:
    moved = list(shape)
    c = moved.pop(channel_dim)
    return t2.reshape(c, *moved).movedim(0, channel_dim)


def _normalise(y2: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(ŷ, s, σ²)`` of a ``(C, m)`` batch: biased variance σ², ``s = sqrt(σ² + eps)``."""
    var, mean = torch.var_mean(y2, dim=1, correction=0)
    s = torch.sqrt(var + eps)
    return (y2 - mean[:, None]) / s[:, None], s, var


def _safe_ratio(num: Tensor, den: Tensor) -> float:
    n, d = float(num), float(den)
    if d == 0.0:
        return math.nan if n == 0.0 else math.inf
    return n / d
