"""Per-layer summary statistics of a noisy-BatchNorm run, as a :class:`torchmetrics.Metric`.

Its states are sums, so they add up across processes by themselves (plain torch and torchmetrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_bn.noise.sampler import NoiseSample

__all__ = ["NoiseStatistics"]


_STATES = ("calls", "mu_sum", "sigma_sum", "count", "clean_sum", "clean_sq", "out_sum", "out_sq")


class NoiseStatistics(Metric):
    r"""Per-target summary statistics of noisy-BatchNorm outputs, summed across updates and ranks.

    For each of ``num_targets`` layers, every :meth:`update` with a clean output :math:`a`
    (``n`` entries) and its :class:`NoiseSample` adds one call, :math:`\bar\mu`, :math:`\bar\sigma`
    (the means of the per-unit draws), ``n``, :math:`\sum a`, :math:`\sum a^2` and the same two
    sums of the noisy output :math:`o`. All eight states are ``float64`` tensors of shape
    ``(num_targets,)`` with ``dist_reduce_fx="sum"``, so :meth:`compute` under
    ``torch.distributed`` returns the statistics over every process's entries:

    .. math::
        \text{mu\_mean} = \frac{\sum \bar\mu}{\text{calls}}, \quad
        \text{clean\_mean} = \frac{\sum a}{n}, \quad
        \text{clean\_std} = \sqrt{\max\Big(\frac{\sum a^2}{n} - \text{clean\_mean}^2,\ 0\Big)}

    (population standard deviation), and likewise ``sigma_mean``, ``out_mean``, ``out_std``.

    Args:
        num_targets: number of target layers (``>= 0``).
        **kwargs: keyword arguments of :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> stats = NoiseStatistics(1)
        >>> clean = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> from lightning_bn.noise import NoiseSampler
        >>> sample = NoiseSampler()(clean, torch.Generator().manual_seed(0))
        >>> stats.update(0, clean, sample)
        >>> out = stats.compute()
        >>> float(out["clean_mean"]), round(float(out["clean_std"]) ** 2, 6)
        (2.5, 1.25)
    """

    full_state_update = False
    is_differentiable = False

    calls: Tensor
    mu_sum: Tensor
    sigma_sum: Tensor
    count: Tensor
    clean_sum: Tensor
    clean_sq: Tensor
    out_sum: Tensor
    out_sq: Tensor

    def __init__(self, num_targets: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_targets, bool) or not isinstance(num_targets, int) or num_targets < 0:
            raise ValueError(
                f"Expected argument `num_targets` to be an integer >= 0, but got {num_targets!r}"
            )
        self.num_targets = num_targets
        for name in _STATES:
            zeros = torch.zeros(num_targets, dtype=torch.float64)
            self.add_state(name, default=zeros, dist_reduce_fx="sum")

    def update(self, index: int, clean: Tensor, sample: NoiseSample) -> None:
        """Add target ``index``'s clean output and its noise draw (no host synchronisation)."""
        with torch.no_grad():
            count = torch.tensor(float(clean.numel()), dtype=torch.float64, device=clean.device)
            entries = [torch.ones_like(count), sample.mu.double().mean()]
            entries += [sample.sigma.double().mean(), count]
            for x in (clean, sample.output):
                var, mean = torch.var_mean(x.detach().double(), correction=0)
                entries += [count * mean, count * (var + mean.square())]
            row = torch.stack([e.to(count.device) for e in entries]).to(self.calls.device)
            for name, value in zip(_STATES, row, strict=True):
                getattr(self, name)[index] += value

    def compute(self) -> dict[str, Tensor]:
        """``calls``, ``count`` and the six statistics, each ``(num_targets,)`` (``nan`` where a
        target had no update)."""
        calls, count = self.calls, self.count
        out = {"calls": calls, "count": count}
        out["mu_mean"] = self.mu_sum / calls
        out["sigma_mean"] = self.sigma_sum / calls
        for tag in ("clean", "out"):
            mean = getattr(self, f"{tag}_sum") / count
            out[f"{tag}_mean"] = mean
            out[f"{tag}_std"] = (getattr(self, f"{tag}_sq") / count - mean.square()).clamp(0).sqrt()
        return out

    @staticmethod
    def to_metrics(
        stats: dict[str, Tensor], names: Sequence[str], prefix: str = "noise"
    ) -> dict[str, float]:
        """Flatten :meth:`compute`'s result to ``{f"{prefix}/{name}/{stat}": value}``; targets
        without an update (no call or no entry) are left out."""
        columns = {key: value.reshape(-1).tolist() for key, value in stats.items()}
        metrics: dict[str, float] = {}
        for index, name in enumerate(names):
            if columns["calls"][index] == 0 or columns["count"][index] == 0:
                continue  # the module did not run in this batch
            for key in ("mu_mean", "sigma_mean", "clean_mean", "clean_std", "out_mean", "out_std"):
                metrics[f"{prefix}/{name}/{key}"] = columns[key][index]
        return metrics
