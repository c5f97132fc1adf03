r"""The "noisy BatchNorm" sampler of Santurkar et al. (2018), Fig. 2 and Appendix A, in plain torch.

The paper makes the distribution of every normalised layer's output unstable on purpose: after
the layer (before the activation) each unit gets a random scale and shift, redrawn at every
training step. A network trained this way still trains about as well as with plain BatchNorm,
so BatchNorm's benefit cannot come from stabilising the layer input distributions.

Recipe (the constants are reconstructed from secondary notes, hence arguments):

.. math::
    \mu_j \sim U(-n_\mu, n_\mu), \quad \sigma_j \sim U(1, n_\sigma) \qquad \text{per unit } j,

    m_{ij} \sim U(\mu_j - r_\mu, \mu_j + r_\mu), \quad s_{ij} \sim N(\sigma_j, r_\sigma^2)
    \qquad \text{per entry } (i, j),

    a_{ij} \leftarrow s_{ij} \, a_{ij} + m_{ij},

with :math:`n_\mu = 0.5`, :math:`n_\sigma = 1.25`, :math:`r_\mu = r_\sigma = 0.1` (:math:`r_\sigma`
is a standard deviation). A unit is a feature of an ``(N, C)`` output or a channel of an
``(N, C, *spatial)`` map; the per-entry index :math:`i` runs over the sample and every spatial
position. With ``channels_last=True`` the unit is the last dimension (``(N, T, C)`` token features,
the layout of :class:`torch.nn.LayerNorm`).

Beside the sampler live the two other pieces of a noisy-BatchNorm run, both without a trainer:
:class:`NoiseSeedStream`, the per-batch seeds (shared per-unit draws, per-rank per-entry draws),
and :class:`NoiseStatistics`, the per-layer summary statistics as a :class:`torchmetrics.Metric`
whose sum-reduced states add up across processes by themselves.

No Lightning import here: :class:`lightning_bn.callbacks.NoiseInjectionCallback` wires these
into a training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_bn.errors import ArgumentTypeError
from lightning_bn.layers.registry import NORM_TYPES

__all__ = [
    "DEFAULT_NOISE_TARGETS",
    "RANK_STRIDE",
    "SEED_BOUND",
    "NoiseSample",
    "NoiseSampler",
    "NoiseSeedStream",
    "inject_noise",
    "rank_seed",
]

#: Module types that receive noise when no targets are chosen: every normalisation layer of the
#: registry (:data:`lightning_bn.layers.NORM_TYPES`): torch's BatchNorm1d/2d/3d, SyncBatchNorm
#: (all ``_BatchNorm``), LayerNorm, GroupNorm, InstanceNorm and RMSNorm, and lightning-bn's
#: BatchNorm, ℓp norms and LayerNorm. RMS norms that libraries write themselves (``T5LayerNorm``,
#: ``LlamaRMSNorm``) are found by structure as well (:func:`lightning_bn.layers.is_norm_layer`).
DEFAULT_NOISE_TARGETS: tuple[type[nn.Module], ...] = NORM_TYPES

#: Seeds drawn by :class:`NoiseSeedStream` lie in ``[0, SEED_BOUND)``.
SEED_BOUND = 1 << 62
#: Odd 64-bit constant (the golden ratio's): ``seed + rank * RANK_STRIDE`` modulo :math:`2^{63}`
#: gives distinct seeds to distinct ranks (an odd stride is invertible modulo a power of two).
RANK_STRIDE = 0x9E3779B97F4A7C15
_SEED_MODULUS = 1 << 63


#: The largest value each of the four noise ranges may take. The noise scales an activation by
#: up to ``std_range`` (plus jitter) and shifts it by up to ``mean_range`` (plus jitter): at 1e4
#: the noise is already ten thousand times the normalised activation's unit scale, so the network
#: sees noise, not signal; beyond it float16 activations (largest 65504) overflow after one noisy
#: layer and float32 ones after a few, and training turns to NaN with no other sign.
MAX_NOISE_RANGE = 1e4


def _check_number(name: str, value: Any, minimum: float) -> float:
    expected = f"a finite number in [{minimum:g}, {MAX_NOISE_RANGE:g}]"
    message = f"Expected argument `{name}` to be {expected}, but got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(message)  # also a ValueError, as before
    if math.isnan(value) or math.isinf(value) or not minimum <= value <= MAX_NOISE_RANGE:
        raise ValueError(message)
    return float(value)


class NoiseSample(NamedTuple):
    r"""One draw of the noise and the noisy activation.

    Attributes:
        output: the noisy activation :math:`s \odot a + m`, the shape and dtype of the input.
        mu: the per-unit mean shifts :math:`\mu_j`, shape ``(C,)``.
        sigma: the per-unit scales :math:`\sigma_j`, shape ``(C,)``.
        shift: the per-entry shifts :math:`m_{ij}`, the shape of the input.
        scale: the per-entry scales :math:`s_{ij}`, the shape of the input.
    """

    output: Tensor
    mu: Tensor
    sigma: Tensor
    shift: Tensor
    scale: Tensor


# eq=False: a sampler compares (and hashes) by identity, as a plain object
@dataclass(eq=False)
class NoiseSampler:
    r"""Draw the two-level noise of the paper and apply it to an activation.

    Args:
        mean_range: :math:`n_\mu`, the per-unit shift :math:`\mu_j` is uniform on
            :math:`[-n_\mu, n_\mu]`; ``>= 0``.
        std_range: :math:`n_\sigma`, the per-unit scale :math:`\sigma_j` is uniform on
            :math:`[1, n_\sigma]`; ``>= 1``.
        mean_jitter: :math:`r_\mu`, the per-entry shift :math:`m_{ij}` is uniform on
            :math:`[\mu_j - r_\mu, \mu_j + r_\mu]`; ``>= 0``.
        std_jitter: :math:`r_\sigma`, the standard deviation of the per-entry scale
            :math:`s_{ij} \sim N(\sigma_j, r_\sigma^2)`; ``>= 0``.

    Raises:
        ValueError: an argument that is not a finite number, is below its minimum or above
            :data:`MAX_NOISE_RANGE` (noise that large overflows the activations).

    Example:
        >>> import torch
        >>> sampler = NoiseSampler()
        >>> g = torch.Generator().manual_seed(0)
        >>> sample = sampler(torch.randn(32, 8, 5, 5), g)
        >>> sample.output.shape, sample.mu.shape, sample.sigma.shape
        (torch.Size([32, 8, 5, 5]), torch.Size([8]), torch.Size([8]))
        >>> bool(((sample.sigma >= 1) & (sample.sigma <= 1.25)).all())
        True
    """

    mean_range: float = 0.5
    std_range: float = 1.25
    mean_jitter: float = 0.1
    std_jitter: float = 0.1

    def __post_init__(self) -> None:
        self.mean_range = _check_number("mean_range", self.mean_range, 0.0)
        self.std_range = _check_number("std_range", self.std_range, 1.0)
        self.mean_jitter = _check_number("mean_jitter", self.mean_jitter, 0.0)
        self.std_jitter = _check_number("std_jitter", self.std_jitter, 0.0)

    def sample_units(
        self, num_units: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        r"""Draw :math:`\mu_j \sim U(-n_\mu, n_\mu)` and :math:`\sigma_j \sim U(1, n_\sigma)`.

        Returns:
            ``(mu, sigma)``, each of shape ``(num_units,)`` on the generator's device.
        """
        opts: dict[str, Any] = {"generator": generator, "device": generator.device, "dtype": dtype}
        mu = (torch.rand(num_units, **opts) * 2 - 1) * self.mean_range
        sigma = 1 + torch.rand(num_units, **opts) * (self.std_range - 1)
        return mu, sigma

    def sample_entries(
        self,
        mu: Tensor,
        sigma: Tensor,
        shape: torch.Size | tuple[int, ...],
        generator: torch.Generator,
        *,
        channels_last: bool = False,
    ) -> tuple[Tensor, Tensor]:
        r"""Draw :math:`m_{ij} \sim U(\mu_j \pm r_\mu)` and :math:`s_{ij} \sim N(\sigma_j, r_\sigma^2)`.

        Args:
            mu: per-unit shifts, shape ``(C,)``.
            sigma: per-unit scales, shape ``(C,)``.
            shape: the activation's shape, with ``C`` in dimension 1 (or last if ``channels_last``).
            generator: source of the per-entry draws.
            channels_last: the unit dimension is the last one.

        Returns:
            ``(shift, scale)``, each of ``shape``, on the generator's device.
        """
        shape = torch.Size(shape)
        unit_dim = len(shape) - 1 if channels_last else 1
        view = [1] * len(shape)
        view[unit_dim] = shape[unit_dim]
        opts: dict[str, Any] = {
            "generator": generator,
            "device": generator.device,
            "dtype": mu.dtype,
        }
        jitter = torch.rand(shape, **opts) * 2 - 1
        shift = mu.to(generator.device).view(view) + self.mean_jitter * jitter
        scale = sigma.to(generator.device).view(view) + self.std_jitter * torch.randn(shape, **opts)
        return shift, scale

    def __call__(
        self,
        x: Tensor,
        generator: torch.Generator,
        *,
        channels_last: bool = False,
        entry_generator: torch.Generator | None = None,
    ) -> NoiseSample:
        r"""Draw fresh noise and return the noisy activation with the draws.

        The draws run on the generators' devices (in ``float64`` for a ``float64`` input, else in
        ``float32``) and move to ``x``'s device; the output keeps ``x``'s dtype and stays
        differentiable with respect to ``x`` (the noise itself is a constant).

        Args:
            x: activation of shape ``(N, C, *spatial)``, or ``(N, *, C)`` with ``channels_last``.
            generator: source of the per-unit draws, and of the per-entry ones unless
                ``entry_generator`` is given.
            channels_last: the unit dimension is the last one instead of dimension 1.
            entry_generator: a separate source for the per-entry draws (so that, e.g., all
                processes of a distributed run share :math:`\mu_j, \sigma_j` while each draws its
                own per-sample noise).

        Raises:
            ValueError: ``x`` has fewer than 2 dimensions or is not floating point.
        """
        if x.dim() < 2:
            raise ValueError(
                "Expected an activation with at least 2 dimensions (N, C, ...), "
                f"but got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"Expected a floating point activation, but got dtype {x.dtype}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        num_units = x.shape[-1] if channels_last else x.shape[1]
        mu, sigma = self.sample_units(num_units, generator, dtype)
        entries = generator if entry_generator is None else entry_generator
        shift, scale = self.sample_entries(mu, sigma, x.shape, entries, channels_last=channels_last)
        shift, scale = shift.to(x.device), scale.to(x.device)
        output = (scale * x + shift).to(x.dtype)
        return NoiseSample(output, mu.to(x.device), sigma.to(x.device), shift, scale)


def inject_noise(
    x: Tensor,
    generator: torch.Generator,
    *,
    mean_range: float = 0.5,
    std_range: float = 1.25,
    mean_jitter: float = 0.1,
    std_jitter: float = 0.1,
    channels_last: bool = False,
    entry_generator: torch.Generator | None = None,
) -> NoiseSample:
    r"""Functional form of :class:`NoiseSampler`: one fresh draw applied to ``x``.

    Args:
        x: activation ``(N, C, *spatial)`` (or ``(N, *, C)`` with ``channels_last``).
        generator: source of the draws (per-unit, and per-entry unless ``entry_generator``).
        mean_range: :math:`n_\mu` (``>= 0``).
        std_range: :math:`n_\sigma` (``>= 1``).
        mean_jitter: :math:`r_\mu` (``>= 0``).
        std_jitter: :math:`r_\sigma`, a standard deviation (``>= 0``).
        channels_last: the unit dimension is the last one.
        entry_generator: a separate source for the per-entry draws.

    Returns:
        :class:`NoiseSample` with the noisy output and the draws.

    Raises:
        ValueError: bad constants or an activation with fewer than 2 dimensions.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> out = inject_noise(torch.zeros(4, 3), g, mean_range=0.0, mean_jitter=0.0).output
        >>> bool((out == 0).all())
        True
    """
    sampler = NoiseSampler(mean_range, std_range, mean_jitter, std_jitter)
    return sampler(x, generator, channels_last=channels_last, entry_generator=entry_generator)


def rank_seed(seed: int, rank: int) -> int:
    r"""The per-entry seed of process ``rank``: :math:`(s + r \cdot \mathrm{RANK\_STRIDE}) \bmod 2^{63}`.

    Rank 0 keeps ``seed``; for ``seed < SEED_BOUND`` distinct ranks below :math:`2^{63}` get
    distinct seeds, so every process draws the per-entry noise of its own samples.
    """
    return (seed + rank * RANK_STRIDE) % _SEED_MODULUS


def _new_generator(device: torch.device) -> torch.Generator:
    try:
        return torch.Generator(device=device)
    except RuntimeError:  # a device without its own generators: draw on the CPU, then move
        return torch.Generator()


class NoiseSeedStream:
    r"""The noise's own random stream: at each batch, two seeds per target layer.

    A CPU :class:`torch.Generator` seeded with ``seed`` draws, per batch, a ``(num_targets, 2)``
    tensor of integers in ``[0, SEED_BOUND)``: column 0 seeds the per-unit draws
    :math:`\mu_j, \sigma_j` (the same on every process, as one process on the global batch would
    draw them), column 1 the per-entry draws, combined with the rank by :func:`rank_seed`. The
    global RNG is neither consumed nor disturbed, and the generator state (the same on every
    rank) is all a resumed run needs to continue the sequence.

    Args:
        seed: seed of the stream's generator (an integer ``>= 0``; the caller checks it).

    Example:
        >>> stream = NoiseSeedStream(0)
        >>> first = stream.draw(3, rank=0)
        >>> len(first), first != stream.draw(3, rank=0)
        (3, True)
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._device_generators: dict[torch.device, tuple[torch.Generator, torch.Generator]] = {}

    def draw(self, num_targets: int, rank: int = 0) -> list[tuple[int, int]]:
        """Advance the stream by one batch: ``(unit seed, entry seed of rank)`` per target."""
        draws = torch.randint(0, SEED_BOUND, (num_targets, 2), generator=self.generator)
        return [(int(unit), rank_seed(int(entry), rank)) for unit, entry in draws.tolist()]

    def generators(
        self, seeds: tuple[int, int], device: torch.device
    ) -> tuple[torch.Generator, torch.Generator]:
        """The ``(unit, entry)`` generators on ``device`` (reused per device), seeded with ``seeds``.

        A device without generators of its own gets CPU ones (the draws then move).
        """
        if device not in self._device_generators:
            self._device_generators[device] = (_new_generator(device), _new_generator(device))
        unit_generator, entry_generator = self._device_generators[device]
        unit_generator.manual_seed(seeds[0])
        entry_generator.manual_seed(seeds[1])
        return unit_generator, entry_generator

    def release(self) -> None:
        """Drop the per-device generators (the stream's position is kept)."""
        self._device_generators = {}

    def get_state(self) -> Tensor:
        """The generator's state (a ``uint8`` tensor), for checkpoints."""
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        """Continue from a state of :meth:`get_state` (also one saved on another device)."""
        self.generator.set_state(state.to("cpu", torch.uint8))


# the sum-reduced states of NoiseStatistics, one entry per target each
