r"""ℓp normalisation (Santurkar et al. 2018, §3.3): BatchNorm with the ℓp norm in place of the std."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_bn._validation import check_bool
from lightning_bn.layers._base import _BatchStatNorm

__all__ = ["L1Norm", "L2Norm", "LinfNorm", "LpNorm"]

_VALID_P = (1.0, 2.0, math.inf)


def _check_p(p: Any) -> float:
    if isinstance(p, str) and p.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(p, bool) or not isinstance(p, (int, float)) or float(p) not in _VALID_P:
        raise ValueError(f"Expected argument `p` to be one of 1, 2, inf, but got {p!r}")
    return float(p)


class LpNorm(_BatchStatNorm):
    r"""Normalise each channel by the average ℓp norm of its centred batch values.

    For a channel with batch values :math:`y` (``m`` entries: batch × spatial), centre
    :math:`\mu_B = \frac1m \sum y` and

    .. math::
        s_p = \Big(\frac1m \sum |y - \mu_B|^p\Big)^{1/p} \ (p = 1, 2), \qquad
        s_\infty = \max |y - \mu_B|,

    .. math::
        \hat y = \frac{y - \mu_B}{(s_p^p + \epsilon)^{1/p}} \ (p<\infty), \qquad
        \hat y = \frac{y - \mu_B}{s_\infty + \epsilon}, \qquad out = \gamma \hat y + \beta.

    With ``p = 2`` the divisor is :math:`\sqrt{\sigma_B^2 + \epsilon}`, so ``LpNorm(p=2)`` equals
    :class:`BatchNorm` in training. With ``centered_divisor=False`` the divisor is taken from the
    values before centring (:math:`|y|` in place of :math:`|y - \mu_B|`). In training the running
    averages of :math:`\mu_B` (``running_mean``) and of :math:`s_p` (``running_divisor``, no Bessel
    correction) are accumulated with ``momentum`` as BatchNorm does; evaluation uses them.
    For ``p = 2`` the ``state_dict`` holds ``running_var`` :math:`= \text{running\_divisor}^2`
    instead of ``running_divisor``, BatchNorm's key and the quantity that gives BatchNorm's
    evaluation divisor :math:`\sqrt{\text{running\_var} + \epsilon}`, so checkpoints load both
    ways between ``L2Norm`` and :class:`torch.nn.BatchNorm1d` (``2d``, ``3d``) or
    :class:`BatchNorm`; loading also accepts ``running_divisor``.

    Args:
        num_features: number of channels ``C``.
        p: 1, 2 or ``math.inf`` (also ``"inf"``).
        eps: added to :math:`s_p^p` (or to :math:`s_\infty`).
        momentum: weight of the new batch in the running averages, ``None`` for a cumulative average.
        affine: learn ``weight`` (γ) and ``bias`` (β).
        track_running_stats: keep running averages for evaluation.
        centered_divisor: take the divisor after centring (default, the paper's choice) or before.
        channels_last: the channel is the last dimension.
        device: device of parameters and buffers.
        dtype: dtype of parameters and buffers.

    Raises:
        ValueError: ``p`` not in {1, 2, inf}, other bad arguments, or bad input as :class:`BatchNorm`.

    Example:
        >>> import torch
        >>> LpNorm(4, p=1)(torch.randn(16, 4)).shape
        torch.Size([16, 4])
    """

    running_divisor: Tensor | None

    def __init__(
        self,
        num_features: int,
        p: float | str = 2,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        centered_divisor: bool = True,
        channels_last: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.p = _check_p(p)
        self.centered_divisor = check_bool("centered_divisor", centered_divisor)
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            channels_last=channels_last,
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        p = "inf" if math.isinf(self.p) else str(int(self.p))
        return f"{super().extra_repr()}, p={p}, centered_divisor={self.centered_divisor}"

    def _register_scale_buffer(self, value: Tensor | None) -> None:
        self.register_buffer("running_divisor", value)

    def _running_scale(self) -> Tensor | None:
        return self.running_divisor

    def _batch_stats(self, x: Tensor, dims: list[int], m: int) -> tuple[Tensor, Tensor, Tensor]:
        centre = x.mean(dim=dims)
        shape = [1, self.num_features] + [1] * (x.dim() - 2)
        dev = (x - centre.view(shape)) if self.centered_divisor else x
        if math.isinf(self.p):
            s = dev.abs().amax(dim=dims)
            return centre, s + self.eps, s.detach()
        if self.p == 2:
            mean_p = dev.square().mean(dim=dims)
            return centre, torch.sqrt(mean_p + self.eps), torch.sqrt(mean_p.detach())
        mean_p = dev.abs().mean(dim=dims)  # p == 1
        return centre, mean_p + self.eps, mean_p.detach()

    def _eval_divisor(self, running_scale: Tensor) -> Tensor:
        if math.isinf(self.p):
            return running_scale + self.eps
        return (running_scale.pow(self.p) + self.eps).pow(1.0 / self.p)

    # --- checkpoints: p = 2 shares BatchNorm's keys ------------------------------------------
    # The evaluation divisor of p = 2 is sqrt(running_divisor² + eps), BatchNorm's is
    # sqrt(running_var + eps): with running_var = running_divisor² both compute the same function,
    # so an L2 state dict is written with BatchNorm's key and either key is read.
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        if self.p != 2 or self.running_divisor is None:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        local: dict[str, Any] = {}
        super()._save_to_state_dict(local, prefix, keep_vars)
        for key, value in local.items():
            if key == prefix + "running_divisor":
                key, value = prefix + "running_var", value.detach().square()
            destination[key] = value

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        var_key, div_key = prefix + "running_var", prefix + "running_divisor"
        if self.p == 2 and var_key in state_dict and div_key not in state_dict:
            state_dict[div_key] = state_dict.pop(var_key).sqrt()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class L1Norm(LpNorm):
    """:class:`LpNorm` with ``p = 1`` (mean absolute deviation)."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        if "p" in kwargs:
            raise TypeError("L1Norm fixes p = 1; use LpNorm to choose p")
        super().__init__(num_features, 1, **kwargs)


class L2Norm(LpNorm):
    """:class:`LpNorm` with ``p = 2`` (equals :class:`BatchNorm` in training)."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        if "p" in kwargs:
            raise TypeError("L2Norm fixes p = 2; use LpNorm to choose p")
        super().__init__(num_features, 2, **kwargs)


class LinfNorm(LpNorm):
    """:class:`LpNorm` with ``p = inf`` (maximum absolute deviation)."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        if "p" in kwargs:
            raise TypeError("LinfNorm fixes p = inf; use LpNorm to choose p")
        super().__init__(num_features, math.inf, **kwargs)
