"""Shared plumbing of the batch-statistics normalisation layers (BatchNorm, LpNorm)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_bn._validation import ArgumentTypeError, check_bool, check_float, check_int


def check_num_features(num_features: Any) -> int:
    return check_int("num_features", num_features, minimum=1)


def check_eps(eps: Any) -> float:
    return check_float("eps", eps, minimum=0)


def check_momentum(momentum: Any) -> float | None:
    return check_float("momentum", momentum, minimum=0, maximum=1, finite=False, optional=True)


def check_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` if it is ``None`` or a floating-point ``torch.dtype`` (the parameters and running
    statistics of a normalisation layer are real numbers with gradients: an integer or complex
    dtype cannot hold them)."""
    expected = "None or a floating-point torch.dtype (torch.float32, torch.float64, ...)"
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(f"Expected argument `dtype` to be {expected}, but got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"Expected argument `dtype` to be {expected}, but got {dtype!r}")
    return dtype


def init_affine_norm(
    module: Any,  # the norm layer (an nn.Module declaring these attributes)
    num_features: int,
    eps: float,
    affine: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Check and set ``num_features``, ``eps`` and ``affine`` of a norm layer, and give it
    ``weight`` γ = 1 and ``bias`` β = 0 of shape ``(num_features,)`` (both registered as ``None``
    without ``affine``: torch's names and layout, so checkpoints move between them).

    Returns:
        The ``device`` and (checked) ``dtype`` keywords for the layer's other tensors.
    """
    factory: dict[str, Any] = {"device": device, "dtype": check_dtype(dtype)}
    module.num_features = check_num_features(num_features)
    module.eps = check_eps(eps)
    module.affine = check_bool("affine", affine)
    if affine:
        module.weight = nn.Parameter(torch.ones(num_features, **factory))
        module.bias = nn.Parameter(torch.zeros(num_features, **factory))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)
    return factory


class _BatchStatNorm(nn.Module):
    """Base of layers that normalise each channel with statistics over the batch.

    The channel dimension is 1 (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)``),
    or the last one with ``channels_last=True`` (``(N, ..., C)``, e.g. token features).
    Parameters and buffers carry the names of :class:`torch.nn.BatchNorm2d`
    (``weight``, ``bias``, ``running_mean``, ``num_batches_tracked``) so checkpoints move between them.
    """

    num_features: int
    eps: float
    affine: bool
    weight: nn.Parameter  # None without ``affine``, as torch's
    bias: nn.Parameter
    running_mean: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channels_last: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = init_affine_norm(self, num_features, eps, affine, device, dtype)
        self.momentum = check_momentum(momentum)
        self.track_running_stats = check_bool("track_running_stats", track_running_stats)
        self.channels_last = check_bool("channels_last", channels_last)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self._register_scale_buffer(torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self._register_scale_buffer(None)
            self.register_buffer("num_batches_tracked", None)

    # --- subclass interface -------------------------------------------------------------
    def _register_scale_buffer(self, value: Tensor | None) -> None:
        raise NotImplementedError

    def _running_scale(self) -> Tensor | None:
        raise NotImplementedError

    def _batch_stats(self, x: Tensor, dims: list[int], m: int) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(centre, divisor, running_scale_update)`` for a channel-first input."""
        raise NotImplementedError

    def _eval_divisor(self, running_scale: Tensor) -> Tensor:
        raise NotImplementedError

    def _synchronises(self) -> bool:
        """Whether the batch statistics are those of several processes (then an empty local
        batch still joins the collectives)."""
        return False

    def _too_few_values(self, m: int) -> bool:
        """Whether ``m`` local entries per channel are too few to train on; a synchronising layer
        counts the entries of every process instead (checked after its reduction)."""
        return not self._synchronises() and m <= 1

    # --- shared ---------------------------------------------------------------------------
    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )
        return s + (", channels_last=True" if self.channels_last else "")

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            assert self.running_mean is not None and self.num_batches_tracked is not None
            self.running_mean.zero_()
            scale = self._running_scale()
            assert scale is not None
            scale.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input(self, x: Tensor) -> None:
        if not 2 <= x.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {x.dim()}D input)")
        c = x.shape[-1] if self.channels_last else x.shape[1]
        if c != self.num_features:
            where = "the last dimension" if self.channels_last else "dimension 1"
            raise ValueError(
                f"Expected input with {self.num_features} channels (num_features) in {where}, "
                f"got {c} (input shape {tuple(x.shape)})"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.channels_last:
            x = x.movedim(-1, 1)
        c = self.num_features
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        running_scale = self._running_scale()
        use_batch_stats = self.training or self.running_mean is None
        if use_batch_stats and x.numel() == 0 and not self._synchronises():
            # an empty batch, as torch's BatchNorm: an empty output, running statistics untouched
            # (the batch counter still counts it); no statistics of nothing, no NaN, no warning
            if self.training and self.num_batches_tracked is not None:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
            centre, divisor = x.new_zeros(c), x.new_ones(c)
        elif use_batch_stats:
            m = x.numel() // c
            if self.training and self._too_few_values(m):
                raise ValueError(
                    "Expected more than 1 value per channel when training, "
                    f"got input size {torch.Size(x.shape)}"
                )
            centre, divisor, scale_update = self._batch_stats(x, dims, m)
            if self.training and self.track_running_stats:
                self._update_running(centre, scale_update)
        else:
            assert self.running_mean is not None and running_scale is not None
            centre, divisor = self.running_mean, self._eval_divisor(running_scale)
        y = (x - centre.view(shape)) / divisor.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.channels_last:
            y = y.movedim(1, -1)
        return y

    def _update_running(self, centre: Tensor, scale_update: Tensor) -> None:
        running_scale = self._running_scale()
        assert self.running_mean is not None and running_scale is not None
        assert self.num_batches_tracked is not None
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch does
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            self.running_mean.mul_(1 - factor).add_(centre.detach(), alpha=factor)
            running_scale.mul_(1 - factor).add_(scale_update.detach(), alpha=factor)
