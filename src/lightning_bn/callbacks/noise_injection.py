"""Inject the paper's "noisy BatchNorm" noise after the normalisation layers of any model."""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_bn.callbacks.sync_check import warn_unsynchronised_norms
from lightning_bn.diagnostics.noise import NoiseSample, NoiseSampler
from lightning_bn.layers import BatchNorm, LayerNorm, LpNorm
from lightning_bn.layers.registry import is_channels_last

__all__ = ["DEFAULT_NOISE_TARGETS", "NoiseInjectionCallback"]

#: Module types that receive noise when ``targets`` is ``None``: torch's BatchNorm1d/2d/3d,
#: SyncBatchNorm (all ``_BatchNorm``), LayerNorm and GroupNorm, and lightning-bn's BatchNorm,
#: ℓp norms and LayerNorm.
DEFAULT_NOISE_TARGETS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    BatchNorm,
    LpNorm,
    LayerNorm,
)

_Target = str | type[nn.Module]
_SEED_BOUND = 1 << 62
_RANK_STRIDE = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct ranks give distinct seeds
_MAX_LISTED = 30
# Columns of a target's summary row, summed over ranks before logging.
_CALLS, _MU, _SIGMA, _COUNT, _CLEAN_SUM, _CLEAN_SQ, _OUT_SUM, _OUT_SQ = range(8)


class NoiseInjectionCallback(Callback):
    r"""Make the output distribution of every normalisation layer unstable: "noisy BatchNorm".

    Santurkar et al. (2018, Fig. 2, Appendix A) ask whether BatchNorm helps because it stabilises
    the distribution of each layer's input (less "internal covariate shift"). They add random,
    time-varying scale and shift noise right after every BatchNorm layer (before the activation),
    so that the layer inputs are *less* stable than without BatchNorm, and find that this "noisy
    BatchNorm" network still trains about as well as plain BatchNorm and much better than the
    network without BatchNorm. This callback runs that experiment on any LightningModule.

    Recipe (spec §4; the constants are reconstructed, hence arguments), for each target layer's
    output :math:`a` at every training step:

    .. math::
        \mu_j \sim U(-n_\mu, n_\mu), \quad \sigma_j \sim U(1, n_\sigma) \qquad \text{per unit } j,

        m_{ij} \sim U(\mu_j - r_\mu, \mu_j + r_\mu), \quad s_{ij} \sim N(\sigma_j, r_\sigma^2)
        \qquad \text{per entry } (i, j),

        a_{ij} \leftarrow s_{ij} \, a_{ij} + m_{ij}.

    A unit is a feature of an ``(N, C)`` output or a channel of an ``(N, C, *spatial)`` map (the
    entries then run over sample × spatial positions); for :class:`torch.nn.LayerNorm`,
    :class:`torch.nn.Linear`, lightning-bn's channels-last :class:`~lightning_bn.LayerNorm` and any
    module with ``channels_last=True`` it is the last dimension. The sampling itself is
    :class:`lightning_bn.diagnostics.noise.NoiseSampler`.

    Semantics:

    - Noise only in training: the target module is in ``train()`` mode *and* the trainer is in its
      training stage. Validation, test, predict, the sanity check and ``model.eval()`` outputs are
      untouched.
    - Fresh noise at every training batch; every forward pass within the same batch (a closure
      that LBFGS re-evaluates, the extra passes of lightning-bn's diagnostic callbacks) sees the
      same noise, so such passes measure the network that is being trained and do not consume the
      noise stream.
    - The callback owns its random stream: a :class:`torch.Generator` seeded with ``seed`` draws,
      at each batch, one seed per target for the per-unit :math:`\mu_j, \sigma_j` and one for the
      per-entry :math:`m, s`; the latter is combined with the global rank. So the global RNG is
      neither consumed nor disturbed, all processes of a DDP run share :math:`\mu_j, \sigma_j` (as
      a single process training on the global batch would) while each draws the per-sample noise
      of its own samples (or, with ``global_batch_noise``, that of the global batch), and the
      generator state saved by ``state_dict`` is the same on every rank, so a resumed run
      continues the same noise sequence.
    - Forward hooks are registered at the start of ``fit`` and removed at its end (also on an
      exception): afterwards the model behaves exactly as without the callback.

    Args:
        targets: which modules get noise: a glob on qualified module names (``"encoder.*.bn"``),
            an ``nn.Module`` subclass, or a sequence of them. ``None`` (default): every
            normalisation layer, :data:`DEFAULT_NOISE_TARGETS`. The root module is never a target.
            To compare with a network without normalisation, target the modules that stand in
            the norm layers' place (e.g. ``nn.Identity`` placeholders, by name).
        mean_range: :math:`n_\mu`, range of the per-unit shift (``>= 0``).
        std_range: :math:`n_\sigma`, upper end of the per-unit scale (``>= 1``).
        mean_jitter: :math:`r_\mu`, half-width of the per-entry shift around :math:`\mu_j`
            (``>= 0``).
        std_jitter: :math:`r_\sigma`, standard deviation of the per-entry scale around
            :math:`\sigma_j` (``>= 0``).
        seed: seed of the callback's own generator (an integer ``>= 0``).
        log_every_n_steps: log the metrics below at every ``log_every_n_steps``-th training batch,
            starting with the first (to the trainer's loggers; nothing is computed without one).
        global_batch_noise: under DDP, draw the per-entry noise of the *global* batch on every
            rank from one shared stream and keep the rank's own rows (the offsets come from an
            all-gather of the per-rank batch sizes, uneven ones allowed), so that the noise of
            each sample is the one a single process on the global batch draws; with
            :class:`~lightning_bn.SyncNorm` the whole noisy run then equals the single-process
            one. Costs a draw of the global batch's size per target and a small collective per
            forward pass. The global batch is the ranks' batches in rank order: with contiguous
            shards that is the single process's batch; an unshuffled ``DistributedSampler``
            interleaves samples, so the same noise then goes to other samples (with the same
            distribution). Default ``False``: each rank draws its own samples' noise.

    Raises:
        ValueError: in ``__init__``, a noise constant out of range, a negative or non-integer
            ``seed``, a ``log_every_n_steps`` that is not a positive integer, or an empty
            ``targets`` sequence; at ``setup``, a glob that matches no module, or no target at
            all (the message lists what the model contains).
        TypeError: in ``__init__``, a ``targets`` entry that is neither a string nor an
            ``nn.Module`` subclass; during training, a target whose output is not a tensor.

    Logged metrics, per target (``<name>`` is its qualified module name, e.g. ``net.1``), once
    per logging step, over all entries of the output and all processes:

    - ``noise/<name>/mu_mean``: mean of the sampled per-unit shifts :math:`\mu_j`;
    - ``noise/<name>/sigma_mean``: mean of the sampled per-unit scales :math:`\sigma_j`;
    - ``noise/<name>/clean_mean``, ``noise/<name>/clean_std``: mean and standard deviation of the
      layer's output before the noise;
    - ``noise/<name>/out_mean``, ``noise/<name>/out_std``: the same after the noise, which is what
      the next layer receives (the paper's "distributional instability").

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_bn.callbacks.noise_injection import NoiseInjectionCallback
        >>> trainer = Trainer(callbacks=[NoiseInjectionCallback(seed=1, log_every_n_steps=10)])
        >>> # trainer.fit(model)  # every BatchNorm / LayerNorm / GroupNorm output gets noise
    """

    def __init__(
        self,
        targets: _Target | Sequence[_Target] | None = None,
        mean_range: float = 0.5,
        std_range: float = 1.25,
        mean_jitter: float = 0.1,
        std_jitter: float = 0.1,
        seed: int = 0,
        log_every_n_steps: int = 50,
        global_batch_noise: bool = False,
    ) -> None:
        if not isinstance(global_batch_noise, bool):
            raise TypeError(
                "Expected argument `global_batch_noise` to be a bool, "
                f"but got {global_batch_noise!r}"
            )
        self.global_batch_noise = global_batch_noise
        self.sampler = NoiseSampler(mean_range, std_range, mean_jitter, std_jitter)
        self.targets = _check_targets(targets)
        self.seed = _check_int("seed", seed, 0)
        self.log_every_n_steps = _check_int("log_every_n_steps", log_every_n_steps, 1)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._batches_seen = 0
        self._names: list[str] = []
        self._channels_last: list[bool] = []
        self._handles: list[RemovableHandle] = []
        self._trainer: pl.Trainer | None = None
        self._rank = 0
        self._world_size = 1
        self._step_seeds: list[tuple[int, int]] | None = None
        self._log_now = False
        self._records: dict[int, Tensor] = {}
        self._device_generators: dict[torch.device, tuple[torch.Generator, torch.Generator]] = {}
        self._prepared_batch: int | None = None

    @property
    @override
    def state_key(self) -> str:
        targets = None if self.targets is None else [_target_repr(t) for t in self.targets]
        return self._generate_state_key(targets=targets, seed=self.seed)

    @property
    def target_names(self) -> list[str]:
        """Qualified names of the modules that get noise (filled at the start of ``fit``)."""
        return list(self._names)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            warn_unsynchronised_norms(trainer, pl_module)
            self._attach(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.prepare_batch(trainer)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._log_now:
            self._log_records(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._detach()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "generator_state": self._generator.get_state(),
            "batches_seen": self._batches_seen,
            "seed": self.seed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._generator.set_state(state_dict["generator_state"].to("cpu", torch.uint8))
        self._batches_seen = int(state_dict["batches_seen"])

    # --- wiring ---------------------------------------------------------------------------
    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        found = _resolve_targets(pl_module, self.targets)
        self._trainer = trainer
        self._rank = int(trainer.global_rank)
        self._world_size = int(trainer.world_size)
        self._names = [name for name, _ in found]
        self._channels_last = [is_channels_last(module) for _, module in found]
        self._handles = [
            module.register_forward_hook(functools.partial(self._forward_hook, index))
            for index, (_, module) in enumerate(found)
        ]

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._trainer = None
        self._step_seeds = None
        self._log_now = False
        self._records = {}
        self._device_generators = {}
        self._prepared_batch = None

    def prepare_batch(self, trainer: pl.Trainer) -> None:
        """Draw this training batch's noise, once per batch whoever asks first.

        The diagnostic callbacks call it before measuring at ``on_train_batch_start``, so their
        passes see the noise of the step they measure, whatever the order of the callbacks.
        """
        key = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        if key == self._prepared_batch:
            return
        self._prepared_batch = key
        self._start_batch(trainer)

    def _start_batch(self, trainer: pl.Trainer) -> None:
        draws = torch.randint(0, _SEED_BOUND, (len(self._names), 2), generator=self._generator)
        self._step_seeds = [(int(u), int(e)) for u, e in draws.tolist()]
        self._log_now = bool(trainer.loggers) and self._batches_seen % self.log_every_n_steps == 0
        self._records = {}
        self._batches_seen += 1

    def _noise_active(self, module: nn.Module) -> bool:
        trainer = self._trainer
        return (
            module.training
            and self._step_seeds is not None
            and trainer is not None
            and trainer.training
        )

    def _forward_hook(self, index: int, module: nn.Module, args: Any, output: Any) -> Any:
        if not self._noise_active(module):
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"NoiseInjectionCallback needs a tensor output from `{self._names[index]}` "
                f"({type(module).__name__}), but got {type(output).__name__}"
            )
        unit_generator, entry_generator = self._seeded_generators(index, output.device)
        if self._global_draws():
            sample = self._global_batch_sample(index, output, unit_generator, entry_generator)
        else:
            sample = self.sampler(
                output,
                unit_generator,
                channels_last=self._channels_last[index],
                entry_generator=entry_generator,
            )
        if self._log_now and index not in self._records:
            self._records[index] = _summarise(output, sample)
        return sample.output

    def _seeded_generators(
        self, index: int, device: torch.device
    ) -> tuple[torch.Generator, torch.Generator]:
        assert self._step_seeds is not None  # checked by _noise_active
        if device not in self._device_generators:
            self._device_generators[device] = (_new_generator(device), _new_generator(device))
        unit_generator, entry_generator = self._device_generators[device]
        unit_seed, entry_seed = self._step_seeds[index]
        unit_generator.manual_seed(unit_seed)
        rank = 0 if self._global_draws() else self._rank  # global draws: one shared stream
        entry_generator.manual_seed((entry_seed + rank * _RANK_STRIDE) % (1 << 63))
        return unit_generator, entry_generator

    def _global_draws(self) -> bool:
        return self.global_batch_noise and self._world_size > 1

    def _global_batch_sample(
        self,
        index: int,
        output: Tensor,
        unit_generator: torch.Generator,
        entry_generator: torch.Generator,
    ) -> NoiseSample:
        """The sampler's draws for the global batch (rows of every rank, in rank order), of which
        this rank keeps its own: the noise one process on the global batch would give them."""
        assert self._trainer is not None  # checked by _noise_active
        size = torch.tensor([output.shape[0]], device=output.device)
        sizes = [int(n) for n in self._trainer.strategy.all_gather(size).flatten().tolist()]
        start = sum(sizes[: self._rank])
        rows = slice(start, start + output.shape[0])
        channels_last = self._channels_last[index]
        dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
        units = output.shape[-1] if channels_last else output.shape[1]
        mu, sigma = self.sampler.sample_units(units, unit_generator, dtype)
        shape = (sum(sizes), *output.shape[1:])
        shift, scale = self.sampler.sample_entries(
            mu, sigma, shape, entry_generator, channels_last=channels_last
        )
        shift, scale = shift[rows].to(output.device), scale[rows].to(output.device)
        noisy = (scale * output + shift).to(output.dtype)
        return NoiseSample(noisy, mu.to(output.device), sigma.to(output.device), shift, scale)

    # --- logging --------------------------------------------------------------------------
    def _log_records(self, trainer: pl.Trainer) -> None:
        self._log_now = False
        device = trainer.strategy.root_device
        rows = torch.zeros(len(self._names), 8, dtype=torch.float64, device=device)
        for index, row in self._records.items():
            rows[index] = row.to(device)
        # every rank reaches this point at the same batch, so the collective is safe
        rows = trainer.strategy.reduce(rows, reduce_op="sum")
        metrics = _metrics_from_rows(self._names, rows.cpu())
        if not metrics:
            return
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:  # loggers write from global rank zero only
            logger.log_metrics(metrics, step=step)


def _summarise(clean: Tensor, sample: NoiseSample) -> Tensor:
    """One row ``[calls, mu_mean, sigma_mean, count, Σclean, Σclean², Σout, Σout²]`` (float64).

    Stays on the activation's device: no host synchronisation inside the forward pass.
    """
    with torch.no_grad():
        count = torch.tensor(float(clean.numel()), dtype=torch.float64, device=clean.device)
        entries = [torch.ones_like(count), sample.mu.double().mean(), sample.sigma.double().mean()]
        entries.append(count)
        for x in (clean, sample.output):
            var, mean = torch.var_mean(x.detach().double(), correction=0)
            entries += [count * mean, count * (var + mean.square())]
        return torch.stack(entries)


def _metrics_from_rows(names: list[str], rows: Tensor) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, row in zip(names, rows.tolist(), strict=True):
        calls, count = row[_CALLS], row[_COUNT]
        if calls == 0 or count == 0:
            continue  # the module did not run in this batch
        prefix = f"noise/{name}"
        metrics[f"{prefix}/mu_mean"] = row[_MU] / calls
        metrics[f"{prefix}/sigma_mean"] = row[_SIGMA] / calls
        for tag, total, squares in (
            ("clean", row[_CLEAN_SUM], row[_CLEAN_SQ]),
            ("out", row[_OUT_SUM], row[_OUT_SQ]),
        ):
            mean = total / count
            metrics[f"{prefix}/{tag}_mean"] = mean
            metrics[f"{prefix}/{tag}_std"] = max(squares / count - mean * mean, 0.0) ** 0.5
    return metrics


def _new_generator(device: torch.device) -> torch.Generator:
    try:
        return torch.Generator(device=device)
    except RuntimeError:  # a device without its own generators: draw on the CPU, then move
        return torch.Generator()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"Expected argument `{name}` to be {kind}, but got {value!r}")
    return value


def _check_targets(targets: Any) -> tuple[_Target, ...] | None:
    if targets is None:
        return None
    items = [targets] if isinstance(targets, (str, type)) else targets
    if not isinstance(items, Sequence):
        raise TypeError(
            "Expected argument `targets` to be None, a glob string, an nn.Module subclass or a "
            f"sequence of them, but got {targets!r}"
        )
    if len(items) == 0:
        raise ValueError("Expected argument `targets` to name at least one module, but got []")
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ValueError(
                    "Expected argument `targets` to hold non-empty glob strings, but got ''"
                )
        elif not (isinstance(item, type) and issubclass(item, nn.Module)):
            raise TypeError(
                "Expected argument `targets` to hold glob strings or nn.Module subclasses, "
                f"but got {item!r}"
            )
    return tuple(items)


def _target_repr(target: _Target) -> str:
    return target if isinstance(target, str) else f"{target.__module__}.{target.__qualname__}"


def _resolve_targets(
    pl_module: nn.Module, targets: tuple[_Target, ...] | None
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to hook, in registration order; raises if a glob or all miss."""
    patterns = [t for t in targets or () if isinstance(t, str)]
    types = (
        DEFAULT_NOISE_TARGETS
        if targets is None
        else tuple(t for t in targets if isinstance(t, type))
    )
    found: list[tuple[str, nn.Module]] = []
    matched_patterns: set[str] = set()
    for name, module in pl_module.named_modules():
        if not name:
            continue
        hits = {p for p in patterns if fnmatch.fnmatchcase(name, p)}
        matched_patterns |= hits
        if hits or (types and isinstance(module, types)):
            found.append((name, module))
    missing = [p for p in patterns if p not in matched_patterns]
    if missing:
        raise ValueError(
            f"NoiseInjectionCallback: the glob(s) {', '.join(map(repr, missing))} in `targets` "
            f"matched no module name. The model contains: {_describe(pl_module)}"
        )
    if not found:
        wanted = (
            "normalisation layer (BatchNorm, LayerNorm, GroupNorm or lightning-bn's layers)"
            if targets is None
            else f"module of the types in targets={[_target_repr(t) for t in targets]}"
        )
        raise ValueError(
            f"NoiseInjectionCallback found no {wanted}. The model contains: {_describe(pl_module)}"
        )
    return found


def _describe(pl_module: nn.Module) -> str:
    entries = [f"{name} ({type(m).__name__})" for name, m in pl_module.named_modules() if name]
    if not entries:
        return f"no submodules (the root is {type(pl_module).__name__})"
    listed = ", ".join(entries[:_MAX_LISTED])
    more = len(entries) - _MAX_LISTED
    return listed + (f", … and {more} more" if more > 0 else "")
