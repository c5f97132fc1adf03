"""What ``lightning-bn reproduce`` trains: the variants of each experiment and their budgets.

An :class:`ExperimentPlan` is plain data (it is saved as JSON in the run folder, so
``lightning-bn plot`` can redraw a run without re-running it). :func:`build_plan` fills it in
from an experiment's defaults (:mod:`lightning_bn.reproduce.experiments`: ``mnist1d``, the
default, ``digits``, ``dln``, ``vgg-cifar10``) and the command-line choices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lightning_bn.reproduce.experiments import DEFAULT_EXPERIMENT, REGISTRY, get_experiment
from lightning_bn.reproduce.experiments.base import COMPARED_KINDS, INIT_SCALES, KINDS, SMALL_BATCH

__all__ = [
    "ARCHS",
    "COMPARED_KINDS",
    "EXPERIMENTS",
    "FULL_SEEDS",
    "INITS",
    "INIT_SCALES",
    "KINDS",
    "QUICK_SEEDS",
    "SMALL_BATCH",
    "ExperimentPlan",
    "VariantSpec",
    "build_plan",
    "default_jobs",
    "kind_norm",
]

#: Experiments of the reproduce command (the registry's names; the first is the default).
EXPERIMENTS: tuple[str, ...] = (
    DEFAULT_EXPERIMENT,
    *(n for n in REGISTRY if n != DEFAULT_EXPERIMENT),
)

#: Architectures of each experiment.
ARCHS: dict[str, tuple[str, ...]] = {name: e.archs for name, e in REGISTRY.items()}

# kind -> (norm layer name of lightning_bn.create_norm_layer, inject the noisy-BN noise)
_KIND_NORM: dict[str, tuple[str, bool]] = {
    "standard": ("none", False),
    "batchnorm": ("batchnorm", False),
    "noisy-batchnorm": ("batchnorm", True),
    "l1": ("l1", False),
    "l2": ("l2", False),
    "linf": ("linf", False),
    "layernorm": ("layernorm", False),
}

#: Number of diagnostic measurements per run the default schedule aims at.
MEASUREMENTS_PER_RUN = 20


def kind_norm(kind: str) -> tuple[str, bool]:
    """``(norm, noise)`` of a variant kind: the norm layer name and whether noise is injected.

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in _KIND_NORM:
        raise ValueError(f"Expected a variant kind, one of {', '.join(KINDS)}, but got {kind!r}")
    return _KIND_NORM[kind]


def format_lr(lr: float) -> str:
    """The learning rate as it appears in names and tables (``0.1``, ``1``, ``1e-06``)."""
    return f"{lr:g}"


@dataclass(frozen=True)
class VariantSpec:
    """One trained configuration: an architecture, a variant kind, a learning rate and, for the
    initialisation and batch-size findings, a scale of the initial weights and a batch size.

    Each variant is trained once per seed of the plan (see :meth:`ExperimentPlan.runs`).

    Attributes:
        arch: ``"mlp" | "cnn" | "dln" | "vgg"``.
        kind: one of :data:`KINDS`.
        lr: learning rate of SGD.
        init_scale: factor applied to the initial Linear/convolution weights (1: none).
        batch_size: samples per batch (``None``: the plan's batch size).
    """

    arch: str
    kind: str
    lr: float
    init_scale: float = 1.0
    batch_size: int | None = None

    @property
    def norm(self) -> str:
        """The norm layer of the network (``"none"`` for the standard network)."""
        return kind_norm(self.kind)[0]

    @property
    def noise(self) -> bool:
        """True for noisy BatchNorm (:class:`~lightning_bn.NoiseInjectionCallback` on)."""
        return kind_norm(self.kind)[1]

    @property
    def id(self) -> str:
        """A name unique within a run, usable as a folder name: ``mlp_batchnorm_lr0.1``, with
        ``_init4`` / ``_bs4`` appended for a non-default initial scale or batch size."""
        name = f"{self.arch}_{self.kind}_lr{format_lr(self.lr)}"
        if self.init_scale != 1.0:
            name += f"_init{format_lr(self.init_scale)}"
        if self.batch_size is not None:
            name += f"_bs{self.batch_size}"
        return name

    def run_id(self, seed: int) -> str:
        """The name of one training run of this variant: ``<id>_seed<seed>``."""
        return f"{self.id}_seed{seed}"

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return {
            "arch": self.arch,
            "kind": self.kind,
            "lr": self.lr,
            "init_scale": self.init_scale,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantSpec:
        """Inverse of :meth:`to_dict` (older run files without scale and batch size load too)."""
        batch = data.get("batch_size")
        return cls(
            arch=str(data["arch"]),
            kind=str(data["kind"]),
            lr=float(data["lr"]),
            init_scale=float(data.get("init_scale", 1.0)),
            batch_size=None if batch is None else int(batch),
        )


@dataclass(frozen=True)
class ExperimentPlan:
    """Everything that decides what a reproduce run trains and measures.

    Attributes:
        experiment: one of :data:`EXPERIMENTS`.
        archs: architectures, in order.
        kinds: variant kinds, in order (a subset of :data:`KINDS`).
        lrs: learning rates, ascending; the first is the "base" rate of the comparisons, the
            last the "larger" one.
        steps: optimiser steps per run.
        batch_size: samples per batch (the DLN uses the full batch of ``n_samples``).
        measure_every: ``every_n_steps`` of the ICS, Lipschitz and Smoothness callbacks.
        log_every: ``log_every_n_steps`` of the trainer and of the noise callback.
        power_iters: most Hessian-vector products per Hessian eigenvalue estimate.
        step_sizes: the η grid of the landscape callbacks, relative to the learning rate
            (``None``: the callbacks' default ``lr × {0.5, …, 4.0}``).
        seed: the base seed: the runs of each variant use seeds ``seed, seed + 1, …``
            (initialisation, data split and order, noise).
        seeds: number of seeds (training runs per variant).
        init: initialisation of the Linear/convolution weights of the MLP, CNN and VGG
            (:data:`~lightning_bn.experiments.INIT_SCHEMES`: ``"kaiming"`` or PyTorch's
            ``"default"``).
        init_scales: scales of the initial weights (other than 1) trained for the
            initialisation finding, standard and BatchNorm, at the base lr.
        small_batches: batch sizes (other than ``batch_size``) trained for the batch-size
            finding, BatchNorm and LayerNorm, at the base lr.
        extra_archs: architectures on which the initialisation and batch-size variants are
            trained (``None``: all of ``archs``).
        large_lr_kinds: kinds trained at the learning rates above the base one (``None``: all
            of ``kinds``).
        diagnose_kinds: kinds on which the ICS, Lipschitz and Smoothness callbacks run (at the
            default scale and batch size; ``None``: every variant). The findings only compare
            the standard and BatchNorm networks' diagnostics.
        quick: the reduced budget of ``--quick``.
        tiny: tiny models (tests only).
        data_dir: the CIFAR-10 folder (``vgg-cifar10`` only).
        accelerator: Lightning accelerator (``"cpu"``, ``"auto"``, ``"gpu"``, ...).
        threads: torch intra-op threads on CPU (``None``: leave torch's setting).
        task: ``"classification"`` (accuracy is reported) or ``"regression"`` (loss only).
        n_samples: samples of a generated data set (the DLN problem, MNIST-1D).
        val_every_steps: DLN only: steps between validations (the full batch, eval mode).
        notes: lines about the plan that the summary repeats (what ``--quick`` leaves out).
    """

    experiment: str
    archs: tuple[str, ...]
    kinds: tuple[str, ...]
    lrs: tuple[float, ...]
    steps: int
    batch_size: int
    measure_every: int
    log_every: int
    power_iters: int = 20
    step_sizes: tuple[float, ...] | None = None
    seed: int = 0
    seeds: int = 1
    init: str = "kaiming"
    init_scales: tuple[float, ...] = ()
    small_batches: tuple[int, ...] = ()
    extra_archs: tuple[str, ...] | None = None
    large_lr_kinds: tuple[str, ...] | None = None
    diagnose_kinds: tuple[str, ...] | None = None
    quick: bool = False
    tiny: bool = False
    data_dir: str | None = None
    accelerator: str = "cpu"
    threads: int | None = 1
    task: str = "classification"
    n_samples: int = 1000
    val_every_steps: int = 100
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def base_lr(self) -> float:
        """The smallest learning rate (the one the standard network tolerates)."""
        return self.lrs[0]

    @property
    def large_lr(self) -> float:
        """The largest learning rate."""
        return self.lrs[-1]

    @property
    def seed_list(self) -> list[int]:
        """The seeds of the runs: ``seed, seed + 1, …, seed + seeds − 1``."""
        return [self.seed + i for i in range(self.seeds)]

    def variants(self) -> list[VariantSpec]:
        """Every variant of the plan: per architecture, each learning rate and kind, then the
        initial-scale variants, then the small-batch variants."""
        out: list[VariantSpec] = []
        for arch in self.archs:
            for lr in self.lrs:
                for kind in self.kinds:
                    large = lr != self.base_lr and self.large_lr_kinds is not None
                    if large and kind not in (self.large_lr_kinds or ()):
                        continue
                    out.append(VariantSpec(arch, kind, lr))
            if self.extra_archs is not None and arch not in self.extra_archs:
                continue
            for scale in self.init_scales:
                for kind in ("standard", "batchnorm"):
                    out.append(VariantSpec(arch, kind, self.base_lr, init_scale=scale))
            for batch in self.small_batches:
                for kind in ("batchnorm", "layernorm"):
                    out.append(VariantSpec(arch, kind, self.base_lr, batch_size=batch))
        return out

    def runs(self) -> list[tuple[VariantSpec, int]]:
        """Every training run: each variant once per seed (seed-major, so a cut-short run has
        whole seeds)."""
        return [(spec, seed) for seed in self.seed_list for spec in self.variants()]

    def diagnosed(self, spec: VariantSpec) -> bool:
        """Whether the diagnostic callbacks (ICS, Lipschitz, Smoothness) run on ``spec``."""
        if spec.init_scale != 1.0 or spec.batch_size is not None:
            return False
        return self.diagnose_kinds is None or spec.kind in self.diagnose_kinds

    def batch_of(self, spec: VariantSpec) -> int:
        """The batch size of a variant."""
        return self.batch_size if spec.batch_size is None else spec.batch_size

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict."""
        data = asdict(self)
        for key in (
            "archs",
            "kinds",
            "lrs",
            "step_sizes",
            "notes",
            "init_scales",
            "small_batches",
            "extra_archs",
            "large_lr_kinds",
            "diagnose_kinds",
        ):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentPlan:
        """Inverse of :meth:`to_dict` (unknown keys are ignored, missing ones take defaults,
        except a missing ``init``: such a plan predates the option and used ``"default"``)."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        # plans written before `init` existed (lightning-bn 0.1.0) used PyTorch's initialisation
        kwargs.setdefault("init", "default")
        for key in ("archs", "kinds", "notes", "extra_archs", "large_lr_kinds", "diagnose_kinds"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(str(v) for v in kwargs[key])
        if "init_scales" in kwargs:
            kwargs["init_scales"] = tuple(float(v) for v in kwargs["init_scales"])
        if "small_batches" in kwargs:
            kwargs["small_batches"] = tuple(int(v) for v in kwargs["small_batches"])
        kwargs["lrs"] = tuple(float(v) for v in kwargs["lrs"])
        if kwargs.get("step_sizes") is not None:
            kwargs["step_sizes"] = tuple(float(v) for v in kwargs["step_sizes"])
        return cls(**kwargs)


def _every(steps: int, per_run: int) -> int:
    return max(1, steps // per_run)


#: Initialisations of ``--init`` (the same names as
#: :data:`lightning_bn.experiments.models.INIT_SCHEMES`, here without importing torch).
INITS: tuple[str, ...] = ("kaiming", "default")


def default_jobs() -> int:
    """Runs at a time by default: 2 (the two cores of a small machine), 1 on a single core."""
    return max(1, min(2, os.cpu_count() or 1))


#: Default number of seeds: ``--quick`` and the full run.
QUICK_SEEDS, FULL_SEEDS = 2, 3


def build_plan(
    experiment: str = DEFAULT_EXPERIMENT,
    *,
    quick: bool = False,
    steps: int | None = None,
    lrs: Sequence[float] | None = None,
    seed: int = 0,
    seeds: int | None = None,
    init: str = "kaiming",
    kinds: Sequence[str] | None = None,
    archs: Sequence[str] | None = None,
    measure_every: int | None = None,
    data_dir: str | None = None,
    accelerator: str | None = None,
    threads: int | None = 1,
    tiny: bool = False,
) -> ExperimentPlan:
    """The plan of one reproduce run, from the command-line choices.

    Defaults per experiment (``quick`` in brackets; each experiment module of
    :mod:`lightning_bn.reproduce.experiments` holds its own):

    =========== ============== ============================ ============ ========== ========
    experiment  architectures  variants                     lrs          steps      seeds
    =========== ============== ============================ ============ ========== ========
    mnist1d     mlp, cnn [mlp] all seven at 0.1; standard   0.1, 1.0     2000       3 [2]
                               and BN at 1.0; init ×0.25,                [1000]
                               ×4 and batch 4 (MLP only)
    digits      mlp, cnn [mlp] as mnist1d                   0.1, 1.0     1000 [300] 3 [2]
    dln         dln            standard, batchnorm          1e-6         10000      3 [2]
                                                                         [1000]
    vgg-cifar10 vgg            all seven [standard, BN,     0.1, 0.5     15000      3 [2]
                               noisy BN]; init and batch                 [500]
                               variants
    =========== ============== ============================ ============ ========== ========

    Only the standard and BatchNorm runs at the default scale and batch size carry the
    diagnostic callbacks (the findings compare those two); the diagnostics measure about 20
    times per run (``measure_every = steps // 20``). Every variant is trained once per seed.

    Args:
        experiment: one of :data:`EXPERIMENTS`.
        quick: the reduced budget.
        steps: optimiser steps per run (overrides the default).
        lrs: learning rates (overrides the default; sorted, duplicates removed).
        seed: the base seed (runs use ``seed, seed + 1, …``).
        seeds: number of seeds (default 2 with ``quick``, else 3).
        init: ``"kaiming"`` (He initialisation, the fair baseline) or ``"default"`` (PyTorch's,
            on which the deep standard MLP sits on a loss plateau).
        kinds: variant kinds to train (default above).
        archs: architectures to train (default above).
        measure_every: steps between diagnostic measurements (default ``steps // 20``).
        data_dir: the CIFAR-10 folder.
        accelerator: Lightning accelerator (default ``"cpu"``, ``"auto"`` for VGG).
        threads: torch intra-op threads on CPU per run (``None``: leave torch's setting).
        tiny: tiny models and few measurements, for tests.

    Returns:
        The plan.

    Raises:
        ValueError: an unknown experiment, kind, architecture or initialisation, or a value out
            of range.
    """
    exp = get_experiment(experiment)
    if init not in INITS:
        raise ValueError(f"Expected `init` to be one of {', '.join(INITS)}, but got {init!r}")
    defaults = exp.defaults(quick, bool(archs), bool(kinds))
    notes = list(defaults.notes)
    init_scales, small_batches = defaults.init_scales, defaults.small_batches
    extra_archs = defaults.extra_archs
    default_archs, default_kinds = defaults.archs, defaults.kinds
    chosen_archs = tuple(archs) if archs else default_archs
    for arch in chosen_archs:
        if arch not in ARCHS[experiment]:
            raise ValueError(
                f"Expected architectures of {experiment!r}, among {', '.join(ARCHS[experiment])},"
                f" but got {arch!r}"
            )
    chosen_kinds = tuple(k for k in KINDS if k in set(kinds)) if kinds else default_kinds
    for kind in kinds or ():
        kind_norm(kind)
    if "layernorm" not in chosen_kinds or "batchnorm" not in chosen_kinds:
        small_batches = ()
    if "standard" not in chosen_kinds or "batchnorm" not in chosen_kinds:
        init_scales = ()
    chosen_lrs = tuple(sorted({float(v) for v in lrs})) if lrs else defaults.lrs
    for lr in chosen_lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"Expected learning rates > 0, but got {lr!r}")
    n_steps = defaults.steps if steps is None else int(steps)
    if n_steps < 1:
        raise ValueError(f"Expected `steps` >= 1, but got {steps!r}")
    n_seeds = (QUICK_SEEDS if quick else FULL_SEEDS) if seeds is None else int(seeds)
    if n_seeds < 1:
        raise ValueError(f"Expected `seeds` >= 1, but got {seeds!r}")
    per_run = 4 if tiny else MEASUREMENTS_PER_RUN
    every = measure_every if measure_every is not None else _every(n_steps, per_run)
    if every < 1:
        raise ValueError(f"Expected `measure_every` >= 1, but got {measure_every!r}")
    if extra_archs is not None:
        extra_archs = tuple(a for a in chosen_archs if a in extra_archs) or None
        if extra_archs is None:  # e.g. --archs cnn: the extra variants go on the CNN
            extra_archs = chosen_archs
    plan = ExperimentPlan(
        experiment=experiment,
        archs=chosen_archs,
        kinds=chosen_kinds,
        lrs=chosen_lrs,
        steps=n_steps,
        batch_size=16 if tiny and defaults.batch_size > 64 else defaults.batch_size,
        measure_every=every,
        log_every=max(1, n_steps // 200),
        power_iters=3 if tiny else 20,
        step_sizes=defaults.step_sizes,
        seed=int(seed),
        seeds=n_seeds,
        init=init,
        init_scales=init_scales,
        small_batches=small_batches,
        extra_archs=extra_archs,
        large_lr_kinds=defaults.large_lr_kinds,
        diagnose_kinds=COMPARED_KINDS,
        quick=quick,
        tiny=tiny,
        data_dir=data_dir,
        accelerator=accelerator or defaults.accelerator,
        threads=threads,
        task=exp.task,
        n_samples=min(64 if exp.task == "regression" else 600, defaults.n_samples)
        if tiny
        else defaults.n_samples,
        val_every_steps=max(1, n_steps // 20),
        notes=tuple(notes),
    )
    return plan if not tiny else replace(plan, notes=(*plan.notes, "tiny models (test mode)."))
