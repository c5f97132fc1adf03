"""The plan's data: one training run (:class:`VariantSpec`) and a whole experiment
(:class:`ExperimentPlan`), with the variant kinds they draw from.

Plain data, no torch and no experiment registry: the experiments (:mod:`lightning_bn.reproduce.
experiments`) and the plan builder (:mod:`lightning_bn.reproduce.plan`) both import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: Variants of a network, in the order they are trained and listed.
KINDS: tuple[str, ...] = (
    "standard",
    "batchnorm",
    "noisy-batchnorm",
    "l1",
    "l2",
    "linf",
    "layernorm",
)
#: Scales of the initial weights of the initialisation finding (besides 1).
INIT_SCALES: tuple[float, ...] = (0.25, 4.0)
#: Small batch size of the batch-size finding (against the plan's batch size).
SMALL_BATCH = 4
#: Kinds whose diagnostics the findings compare.
COMPARED_KINDS: tuple[str, ...] = ("standard", "batchnorm")


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
        power_iters: most Hessian-vector products per Hessian eigenvalue estimate (Lanczos with
            a stored basis of 5 vectors).
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
