"""Inject the paper's "noisy BatchNorm" noise after the normalisation layers of any model."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from typing_extensions import override

from lightning_bn._validation import check_bool, check_int
from lightning_bn.callbacks._hooks import AfterTrainBatch
from lightning_bn.callbacks._state_key import CachedStateKey
from lightning_bn.callbacks.sync_check import warn_unsynchronised_norms
from lightning_bn.layers.fused import register_norm_output_hook
from lightning_bn.layers.selection import Selector, check_selectors, selector_repr
from lightning_bn.logging.keys import DeclaresKeys, LoggedKey, LoggedKeys
from lightning_bn.noise import (
    DEFAULT_NOISE_TARGETS,
    NoiseInjector,
    NoiseSampler,
    NoiseSeedStream,
    batch_sizes_of_ranks,
    check_disjoint_targets,
    resolve_noise_targets,
)

__all__ = ["DEFAULT_NOISE_TARGETS", "NoiseInjectionCallback"]


class NoiseInjectionCallback(CachedStateKey, AfterTrainBatch, DeclaresKeys):
    r"""Make the output distribution of every normalisation layer unstable: "noisy BatchNorm".

    Santurkar et al. (2018, Fig. 2, App. A) add time-varying noise after every BatchNorm layer, so
    that layer inputs are *less* stable than without BatchNorm: the network still trains about as
    well as with BatchNorm. This callback runs that experiment on any LightningModule.

    For each target's output :math:`a` at every training step (spec §4; the constants are
    reconstructed, hence arguments): per unit :math:`\mu_j \sim U(-n_\mu, n_\mu)`,
    :math:`\sigma_j \sim U(1, n_\sigma)`; per entry :math:`m_{ij} \sim U(\mu_j \pm r_\mu)`,
    :math:`s_{ij} \sim N(\sigma_j, r_\sigma^2)`; then :math:`a_{ij} \leftarrow s_{ij} a_{ij} + m_{ij}`.
    A unit is dimension 1 of the output, or the last one for :class:`torch.nn.LayerNorm`,
    :class:`torch.nn.Linear` and any layer with ``channels_last=True``. The math (draws, seed
    stream, statistics) is :class:`lightning_bn.noise.NoiseInjector`.

    Semantics:

    - Noise only in training: the target module is in ``train()`` mode *and* the trainer is in its
      training stage (not validation, test, predict, the sanity check or ``model.eval()``).
    - Fresh noise at every training batch; every forward pass of the same batch (an LBFGS closure,
      the passes of lightning-bn's diagnostic callbacks) sees the same noise.
    - Its own seed stream: :math:`\mu_j, \sigma_j` shared by all DDP processes, :math:`m, s`
      their own; the global RNG untouched; ``state_dict`` saves the stream for resuming.
    - Forward hooks are registered at the start of ``fit`` and removed at its end (also on an
      exception): afterwards the model behaves exactly as without the callback.

    Args:
        targets: which modules get noise: a glob on qualified module names (``"encoder.*.bn"``),
            an ``nn.Module`` subclass, or a sequence of them. ``None`` (default): every norm layer
            (:func:`lightning_bn.layers.is_norm_layer`, RMS norms such as ``T5LayerNorm`` too; a
            model with none gets one warning and no noise). Noise goes at the norm's own output,
            also in a fused norm+activation layer (:mod:`lightning_bn.layers.fused`). To compare with a network without normalisation, target the modules that stand in
            the norm layers' place (e.g. ``nn.Identity`` placeholders, by name).
        mean_range: :math:`n_\mu`, range of the per-unit shift (``>= 0``).
        std_range: :math:`n_\sigma`, upper end of the per-unit scale (``>= 1``).
        mean_jitter: :math:`r_\mu`, half-width of the per-entry shift (``>= 0``).
        std_jitter: :math:`r_\sigma`, standard deviation of the per-entry scale (``>= 0``).
        seed: seed of the callback's own generator (an integer in ``[0, 2**63)``).
        log_every_n_steps: log the metrics below at every ``log_every_n_steps``-th training batch,
            starting with the first (to the trainer's loggers; nothing is computed without one).
        global_batch_noise: under DDP, draw the per-entry noise of the *global* batch (the
            ranks' batches in rank order) from one shared stream and keep this rank's rows, so
            that with :class:`~lightning_bn.SyncNorm` a noisy run equals the single-process one
            when each rank holds a contiguous shard (an unshuffled ``DistributedSampler``
            interleaves samples: same distribution, other samples). Default ``False``.

    Raises:
        ValueError: in ``__init__``, an argument out of range or an empty ``targets``; at
            ``setup``, a glob that matches no module, no target of explicit ``targets`` (the
            message lists the model's modules), or a layer that another NoiseInjectionCallback of
            the Trainer also targets (callbacks on different layers work side by side).
        TypeError: in ``__init__``, a ``targets`` entry that is neither a string nor an
            ``nn.Module`` subclass; during training, a target whose output is not a tensor.

    Logged metrics, per target (``<name>`` is its qualified module name, e.g. ``net.1``), once
    per logging step, over all entries of the output and all processes:

    - ``noise/<name>/mu_mean``, ``noise/<name>/sigma_mean``: means of the draws :math:`\mu_j`,
      :math:`\sigma_j`;
    - ``noise/<name>/clean_mean``, ``noise/<name>/clean_std``: the output before the noise;
    - ``noise/<name>/out_mean``, ``noise/<name>/out_std``: after it, what the next layer
      receives (the paper's "distributional instability").

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[NoiseInjectionCallback(seed=1, log_every_n_steps=10)])
        >>> # trainer.fit(model)  # every BatchNorm / LayerNorm / GroupNorm output gets noise
    """

    # the state at the end of training (the noise is redrawn each step; no extreme is telling)
    logged_keys = LoggedKeys(prefix="noise/", keys=(LoggedKey("noise/*", "last"),))

    def __init__(
        self,
        targets: Selector | Sequence[Selector] | None = None,
        mean_range: float = 0.5,
        std_range: float = 1.25,
        mean_jitter: float = 0.1,
        std_jitter: float = 0.1,
        seed: int = 0,
        log_every_n_steps: int = 50,
        global_batch_noise: bool = False,
    ) -> None:
        self.global_batch_noise = check_bool("global_batch_noise", global_batch_noise)
        self.sampler = NoiseSampler(mean_range, std_range, mean_jitter, std_jitter)
        self.targets = check_selectors(targets, "targets")
        # the seed stream packs it into a signed 64-bit word: larger seeds would overflow there
        self.seed = check_int("seed", seed, minimum=0, maximum=2**63 - 1)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        self._stream = NoiseSeedStream(self.seed)
        self._generator = self._stream.generator  # the stream's position: what state_dict saves
        self._batches_seen = 0
        self._handles: list[Any] = []  # hook handles (each with `remove()`)
        self._trainer: pl.Trainer | None = None
        self._injector: NoiseInjector | None = None
        self._prepared_batch: int | None = None

    def _state_key_settings(self) -> dict[str, Any]:
        targets = None if self.targets is None else [selector_repr(t) for t in self.targets]
        return {"targets": targets, "seed": self.seed}

    @property
    def target_names(self) -> list[str]:
        """Qualified names of the modules that get noise (filled at the start of ``fit``)."""
        return [] if self._injector is None else list(self._injector.names)

    @property
    def _records(self) -> dict[int, str]:
        """Targets whose statistics the last batch recorded, index to name."""
        injector = self._injector
        return {} if injector is None else {i: injector.names[i] for i in sorted(injector.recorded)}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            warn_unsynchronised_norms(trainer, pl_module)
            self._attach(trainer, pl_module)  # (detaches first, which thaws the key)
        self._freeze_state_key()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.prepare_batch(trainer)

    @override
    def after_train_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any
    ) -> None:
        if self._injector is not None and self._injector.record:
            self._log_stats(trainer)

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
            "generator_state": self._stream.get_state(),
            "batches_seen": self._batches_seen,
            "seed": self.seed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stream.set_state(state_dict["generator_state"])
        self._batches_seen = int(state_dict["batches_seen"])

    def prepare_batch(self, trainer: pl.Trainer) -> None:
        """Draw this training batch's noise, once per batch whoever asks first.

        The diagnostic callbacks call it before measuring at ``on_train_batch_start``, so their
        passes see the noise of the step they measure, whatever the order of the callbacks.
        """
        key = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        if key == self._prepared_batch:
            return
        self._prepared_batch = key
        if self._injector is not None:
            log = bool(trainer.loggers) and self._batches_seen % self.log_every_n_steps == 0
            self._injector.new_batch(record=log)
        self._batches_seen += 1

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        found = resolve_noise_targets(pl_module, self.targets)  # [] with a warning: no noise
        # a layer another NoiseInjectionCallback also targets would get noise twice
        peers = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, type(self))]
        check_disjoint_targets(pl_module, found, [c.targets for c in peers if c is not self])
        self._trainer = trainer
        # statistics on the root device: updates stay on the activations' device, sync works
        device, rank = trainer.strategy.root_device, int(trainer.global_rank)
        sizes = batch_sizes_of_ranks if self.global_batch_noise and trainer.world_size > 1 else None
        self._injector = NoiseInjector(
            self.sampler, self._stream, found, rank, device, global_batch_sizes=sizes
        )
        self._handles = [  # at the norm's own output, also in a fused norm+activation layer
            register_norm_output_hook(module, functools.partial(self._forward_hook, index), name=n)
            for index, (n, module) in enumerate(found)
        ]

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._trainer = None  # the injector stays: its record of the last batch, for tests
        self._stream.release()
        self._prepared_batch = None
        self._thaw_state_key()  # also after an exception (Lightning skips teardown then)

    def _forward_hook(self, index: int, module: nn.Module, args: Any, output: Any) -> Any:
        trainer, injector = self._trainer, self._injector
        if not (module.training and trainer and trainer.training and injector and injector.ready):
            return None  # noise only in training, in the trainer's training stage
        if not isinstance(output, Tensor):
            raise TypeError(
                f"NoiseInjectionCallback needs a tensor output from `{injector.names[index]}` "
                f"({type(module).__name__}), but got {type(output).__name__}"
            )
        return injector(index, output)

    def _log_stats(self, trainer: pl.Trainer) -> None:
        assert self._injector is not None  # record is only set on an attached injector
        # every rank reaches this point at the same batch: the collective in metrics() is safe
        metrics = self._injector.metrics()
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers if metrics else ():  # they write from global rank zero
            logger.log_metrics(metrics, step=step)
