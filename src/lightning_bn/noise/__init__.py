"""The noisy-BatchNorm intervention of Santurkar et al. (2018), Fig. 2, in plain torch.

Not a diagnostic: it changes training on purpose. :mod:`~lightning_bn.noise.sampler` draws the
per-unit scale and shift, :mod:`~lightning_bn.noise.statistics` summarises what was injected,
:mod:`~lightning_bn.noise.injector` hooks it after the target layers;
:class:`lightning_bn.callbacks.NoiseInjectionCallback` wires it into a Lightning run.
"""

from __future__ import annotations

from lightning_bn.noise.injector import (
    NoiseInjector,
    batch_sizes_of_ranks,
    check_disjoint_targets,
    resolve_noise_targets,
)
from lightning_bn.noise.sampler import (
    DEFAULT_NOISE_TARGETS,
    RANK_STRIDE,
    SEED_BOUND,
    NoiseSample,
    NoiseSampler,
    NoiseSeedStream,
    inject_noise,
    rank_seed,
)
from lightning_bn.noise.statistics import NoiseStatistics

__all__ = [
    "DEFAULT_NOISE_TARGETS",
    "RANK_STRIDE",
    "SEED_BOUND",
    "NoiseInjector",
    "NoiseSample",
    "NoiseSampler",
    "NoiseSeedStream",
    "NoiseStatistics",
    "batch_sizes_of_ranks",
    "check_disjoint_targets",
    "inject_noise",
    "rank_seed",
    "resolve_noise_targets",
]
