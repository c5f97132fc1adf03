"""Where the noise goes: the target layers of a model, and the forward hooks that add the noise.

Plain torch. :class:`NoiseInjector` hooks the sampler of :mod:`lightning_bn.noise.sampler` after
every target layer and feeds :class:`~lightning_bn.noise.statistics.NoiseStatistics`;
:class:`lightning_bn.callbacks.NoiseInjectionCallback` drives it from a training run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_bn.layers.registry import is_channels_last, is_norm_layer
from lightning_bn.layers.selection import Selector, describe_modules, match_modules, selector_repr
from lightning_bn.noise.sampler import (
    NoiseSample,
    NoiseSampler,
    NoiseSeedStream,
)
from lightning_bn.noise.statistics import NoiseStatistics

__all__ = [
    "NoiseInjector",
    "batch_sizes_of_ranks",
    "check_disjoint_targets",
    "resolve_noise_targets",
]


def resolve_noise_targets(
    pl_module: nn.Module, targets: tuple[Selector, ...] | None
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs that get noise, in registration order.

    Args:
        pl_module: the model (never a target itself).
        targets: globs and types (a union), or ``None`` for every normalisation layer
            (:func:`~lightning_bn.layers.registry.is_norm_layer`: the types of
            :data:`DEFAULT_NOISE_TARGETS` and RMS norms libraries write themselves).

    Returns:
        The targets; empty (with one warning that says what to pass) when ``targets`` is
        ``None`` and the model has no normalisation layer.

    Raises:
        ValueError: a glob that matches no module name, or no target at all for explicit
            ``targets``; the message lists what the model contains. (A type that matches nothing
            is fine if others match.)
    """
    selection = match_modules(pl_module, targets, default=is_norm_layer)
    missing = [t for t in selection.unmatched if isinstance(t, str)]  # a type may match nothing
    if missing:
        raise ValueError(
            f"NoiseInjectionCallback: the glob(s) {', '.join(map(repr, missing))} in `targets` "
            f"matched no module name. The model contains: {describe_modules(pl_module)}"
        )
    if not selection.modules and targets is None:
        # the default found nothing: not the user's request, so the rest of the fit goes on
        warnings.warn(
            f"NoiseInjectionCallback found no normalisation layer in {type(pl_module).__name__}"
            " (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm or lightning-bn's layers)"
            " and adds no noise. Choose the modules that get noise with `targets=`, e.g."
            " `NoiseInjectionCallback(targets=['encoder.*.norm', MyNorm])`",
            stacklevel=2,
        )
        return []
    if not selection.modules:
        raise ValueError(
            "NoiseInjectionCallback found no module of the types in "
            f"targets={[selector_repr(t) for t in targets or ()]}. The model contains: "
            f"{describe_modules(pl_module)}"
        )
    return selection.modules


def check_disjoint_targets(
    root: nn.Module,
    targets: Sequence[tuple[str, nn.Module]],
    others: Sequence[tuple[Selector, ...] | None],
) -> None:
    """Refuse a module of ``targets`` that another noise injector's selectors also choose: it
    would get noise twice, and both would log the same ``noise/<name>/...`` keys.

    Raises:
        ValueError: naming the shared module(s).
    """
    mine = {id(module): name for name, module in targets}
    for selectors in others:
        theirs = {id(m) for _, m in resolve_noise_targets(root, selectors)}
        shared = [name for key, name in mine.items() if key in theirs]
        if shared:
            raise ValueError(
                f"Two NoiseInjectionCallbacks target the same layer(s) {', '.join(shared)}:"
                " each would add its noise on top of the other's. Give them disjoint"
                " `targets`, or use one callback"
            )


def batch_sizes_of_ranks(x: Tensor) -> list[int]:
    """Every rank's batch size (dimension 0 of ``x``), in rank order: one small all-gather.

    In a single process (no initialised process group) it is ``[len(x)]``.
    """
    size = torch.tensor([x.shape[0]], device=x.device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [int(size)]
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(n) for n in sizes]


class NoiseInjector:
    r"""Noise for a fixed list of target layers, batch by batch: the trainer-free core of
    :class:`~lightning_bn.callbacks.NoiseInjectionCallback`.

    :meth:`new_batch` draws the batch's seeds from ``stream``; every call ``injector(index, a)``
    within that batch returns target ``index``'s noisy output, drawn afresh from the same seeds (so
    every forward pass of a batch sees the same noise). With ``record=True`` the first call per
    target in the batch also goes into :attr:`stats`.

    Args:
        sampler: the noise recipe.
        stream: the seed stream (owned by the caller, which saves and restores it).
        targets: the ``(qualified name, module)`` pairs that get noise (e.g. from
            :func:`resolve_noise_targets`); a unit is the last dimension of a module's output
            where :func:`~lightning_bn.layers.registry.is_channels_last` says so, else dimension 1.
        rank: this process's global rank (the per-entry seeds depend on it).
        device: where :attr:`stats` keeps its states (the activations' device avoids copies).
        global_batch_sizes: ``sizes(x) -> [n_0, ..., n_{R-1}]``, every rank's batch size (a
            collective). When given, the per-entry noise is drawn for the *global* batch (the
            ranks' batches in rank order) from one stream shared by all ranks, and this rank keeps
            its own rows: the noise a single process on the global batch gives those samples.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> injector = NoiseInjector(NoiseSampler(), NoiseSeedStream(0), [("bn", nn.BatchNorm1d(3))])
        >>> injector.new_batch(record=True)
        >>> a = torch.randn(8, 3)
        >>> torch.equal(injector(0, a), injector(0, a))
        True
    """

    def __init__(
        self,
        sampler: NoiseSampler,
        stream: NoiseSeedStream,
        targets: Sequence[tuple[str, nn.Module]],
        rank: int = 0,
        device: torch.device | str | None = None,
        global_batch_sizes: Callable[[Tensor], list[int]] | None = None,
    ) -> None:
        self.sampler = sampler
        self.global_batch_sizes = global_batch_sizes
        self.stream = stream
        self.names = [name for name, _ in targets]
        self.channels_last = [is_channels_last(module) for _, module in targets]
        self.rank = rank
        self.stats = NoiseStatistics(len(self.channels_last)).to(device or "cpu")
        self.seeds: list[tuple[int, int]] | None = None
        self.record = False
        self.recorded: set[int] = set()  # targets recorded in this batch

    @property
    def ready(self) -> bool:
        """Whether a batch's seeds are drawn (:meth:`new_batch` was called)."""
        return self.seeds is not None

    def new_batch(self, record: bool = False) -> None:
        """Draw the next batch's seeds; with ``record``, reset :attr:`stats` to collect it."""
        # global-batch draws: one per-entry stream shared by every rank (rank 0's)
        rank = 0 if self.global_batch_sizes is not None else self.rank
        self.seeds = self.stream.draw(len(self.channels_last), rank)
        self.record = record
        self.recorded = set()
        if record:
            self.stats.reset()

    def __call__(self, index: int, x: Tensor) -> Tensor:
        """Target ``index``'s output ``x`` with this batch's noise.

        Raises:
            RuntimeError: before the first :meth:`new_batch`.
        """
        if self.seeds is None:
            raise RuntimeError("NoiseInjector: call new_batch() before injecting noise")
        unit_generator, entry_generator = self.stream.generators(self.seeds[index], x.device)
        if self.global_batch_sizes is not None:
            sample = self._global_batch_sample(index, x, unit_generator, entry_generator)
        else:
            sample = self.sampler(
                x,
                unit_generator,
                channels_last=self.channels_last[index],
                entry_generator=entry_generator,
            )
        if self.record and index not in self.recorded:  # the batch's first pass only
            self.recorded.add(index)
            self.stats.update(index, x, sample)
        return sample.output

    def _global_batch_sample(
        self,
        index: int,
        x: Tensor,
        unit_generator: torch.Generator,
        entry_generator: torch.Generator,
    ) -> NoiseSample:
        """The sampler's draws for the global batch, of which this rank keeps its own rows."""
        assert self.global_batch_sizes is not None
        sizes = self.global_batch_sizes(x)
        start = sum(sizes[: self.rank])
        rows = slice(start, start + x.shape[0])
        channels_last = self.channels_last[index]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        units = x.shape[-1] if channels_last else x.shape[1]
        mu, sigma = self.sampler.sample_units(units, unit_generator, dtype)
        shape = (sum(sizes), *x.shape[1:])
        shift, scale = self.sampler.sample_entries(
            mu, sigma, shape, entry_generator, channels_last=channels_last
        )
        shift, scale = shift[rows].to(x.device), scale[rows].to(x.device)
        noisy = (scale * x + shift).to(x.dtype)
        return NoiseSample(noisy, mu.to(x.device), sigma.to(x.device), shift, scale)

    def metrics(self, prefix: str = "noise") -> dict[str, float]:
        """Stop recording and return the batch's statistics, summed over ranks, as
        ``{f"{prefix}/{name}/{stat}": value}`` (:meth:`NoiseStatistics.to_metrics`).

        Under ``torch.distributed`` this is a collective: every rank must call it at the same
        batch, also one where no target ran.
        """
        self.record = False
        with warnings.catch_warnings():  # a rank where no target ran still joins the reduction
            warnings.filterwarnings("ignore", message=".*was called before the ``update``")
            stats = self.stats.compute()
        stats = {key: value.cpu() for key, value in stats.items()}
        return NoiseStatistics.to_metrics(stats, self.names, prefix)
