"""The paper's deep linear network (spec §6): bias-free square Linear layers, optionally with a
norm layer between them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

from torch import Tensor, nn

from lightning_bn.experiments.models import NormKind, _check_positive_int, make_norm

__all__ = ["DeepLinearNetwork"]


class DeepLinearNetwork(nn.Module):
    r"""Deep linear network of the paper (spec §6): ``depth`` bias-free square Linear layers.

    Without normalisation the network is the linear map :math:`x \mapsto W_{depth} \cdots W_1 x`
    (:meth:`end_to_end_matrix`). With ``norm != "none"`` a norm layer follows every Linear layer but
    the last (the paper's DLN + BN), so the map is no longer linear in ``x``. Layers are
    ``linears.i`` and ``norms.i`` (``i`` from 0).

    Initialisation *(reconstructed; the paper does not state it)*: with ``init="normal"`` each
    entry of each :math:`W_i` is drawn from :math:`N(0, \text{init\_scale}^2 / \text{width})`, which
    keeps the scale of :math:`x` roughly constant through the layers; ``"orthogonal"`` gives
    ``init_scale`` times a random orthogonal matrix (exactly norm-preserving); ``"default"`` keeps
    PyTorch's Linear initialisation (:math:`U(\pm 1/\sqrt{width})`), under which the product of 25
    layers shrinks the signal by about :math:`3^{-12.5} \approx 10^{-6}`.

    Parameter count: ``depth·width²``, plus ``2·width`` per affine norm layer (``depth − 1`` of them).

    Args:
        depth: number of Linear layers.
        width: size of every layer (the dimension of ``x``).
        norm: normalisation after each Linear layer but the last; ``"none"``: none at all.
        init: ``"normal" | "orthogonal" | "default"``.
        init_scale: scale of the ``"normal"`` and ``"orthogonal"`` initialisations.
        norm_kwargs: keyword arguments of the norm layers.

    Shape:
        Input ``(N, width)``; output ``(N, width)``.

    Raises:
        ValueError: bad sizes, an unknown ``init`` or ``norm``.

    Example:
        >>> import torch
        >>> net = DeepLinearNetwork(depth=3, width=4)
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(net(x), x @ net.end_to_end_matrix().T, atol=1e-6)
        True
    """

    def __init__(
        self,
        depth: int = 25,
        width: int = 10,
        norm: NormKind = "none",
        init: str = "normal",
        init_scale: float = 1.0,
        norm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.depth = _check_positive_int("depth", depth)
        self.width = _check_positive_int("width", width)
        if init not in ("normal", "orthogonal", "default"):
            raise ValueError(
                "Expected argument `init` to be one of 'normal', 'orthogonal', 'default', "
                f"but got {init!r}"
            )
        if (
            isinstance(init_scale, bool)
            or not isinstance(init_scale, (int, float))
            or not math.isfinite(init_scale)
            or init_scale <= 0
        ):
            raise ValueError(
                f"Expected argument `init_scale` to be a finite number > 0, but got {init_scale!r}"
            )
        self.norm = norm
        self.init = init
        self.init_scale = float(init_scale)
        self.linears = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        self.norms = nn.ModuleList(make_norm(norm, width, norm_kwargs) for _ in range(depth - 1))
        self.reset_parameters()

    @property
    def has_norm(self) -> bool:
        """True when norm layers sit between the Linear layers."""
        return any(not isinstance(m, nn.Identity) for m in self.norms)

    def _linear_layers(self) -> list[nn.Linear]:
        return [cast(nn.Linear, m) for m in self.linears]

    def reset_parameters(self) -> None:
        """Re-draw the weights with the chosen ``init`` (norm layers are reset too)."""
        for linear in self._linear_layers():
            if self.init == "normal":
                nn.init.normal_(linear.weight, std=self.init_scale / math.sqrt(self.width))
            elif self.init == "orthogonal":
                nn.init.orthogonal_(linear.weight, gain=self.init_scale)
            else:
                linear.reset_parameters()
        for norm in self.norms:
            reset = getattr(norm, "reset_parameters", None)
            if callable(reset):
                reset()

    def weights(self) -> list[Tensor]:
        """The weight matrices ``[W_1, …, W_depth]``, each ``(width, width)``, in forward order."""
        return [linear.weight for linear in self._linear_layers()]

    def end_to_end_matrix(self) -> Tensor:
        """The product ``W_depth ⋯ W_1`` (``(width, width)``): the network's map without norm.

        Raises:
            RuntimeError: the network has norm layers (its map is not this product).
        """
        if self.has_norm:
            raise RuntimeError(
                "end_to_end_matrix() is the network's map only without norm layers (norm='none')"
            )
        weights = self.weights()
        product = weights[0]
        for weight in weights[1:]:
            product = weight @ product
        return product

    def forward(self, x: Tensor) -> Tensor:
        """Apply ``W_1``, norm, ``W_2``, norm, …, ``W_depth`` to ``x`` ``(N, width)``."""
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < len(self.norms):
                x = self.norms[i](x)
        return x
