"""What ``lightning-bn reproduce`` trains: the variants of each experiment and their budgets.

An :class:`ExperimentPlan` is plain data (it is saved as JSON in the run folder, so
``lightning-bn plot`` can redraw a run without re-running it). :func:`build_plan` fills it in
for the three experiments of the paper (spec §6):

- ``digits``: a 6×128 MLP and a small CNN on scikit-learn's digits, every variant of
  :data:`KINDS` at two learning rates. The smaller one (0.1) is one that the standard network
  tolerates (it trains, slowly); at the larger one (1.0) the standard network degrades or
  diverges. ``--quick`` trains the MLP only, for fewer steps.
- ``dln``: the deep linear network (25 layers of 10×10, full-batch gradient descent, lr 1e-6),
  standard and BatchNorm.
- ``vgg-cifar10``: VGG-11 on CIFAR-10 files, SGD at lr 0.1 and 0.5, batch 128 (meant for a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = [
    "ARCHS",
    "EXPERIMENTS",
    "KINDS",
    "ExperimentPlan",
    "VariantSpec",
    "build_plan",
    "kind_norm",
]

#: Experiments of the reproduce command.
EXPERIMENTS: tuple[str, ...] = ("digits", "dln", "vgg-cifar10")

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

#: Architectures of each experiment.
ARCHS: dict[str, tuple[str, ...]] = {
    "digits": ("mlp", "cnn"),
    "dln": ("dln",),
    "vgg-cifar10": ("vgg",),
}

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
    """One training run: an architecture, a variant kind and a learning rate.

    Attributes:
        arch: ``"mlp" | "cnn" | "dln" | "vgg"``.
        kind: one of :data:`KINDS`.
        lr: learning rate of SGD.
    """

    arch: str
    kind: str
    lr: float

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
        """A name unique within a run, usable as a folder name: ``mlp_batchnorm_lr0.1``."""
        return f"{self.arch}_{self.kind}_lr{format_lr(self.lr)}"

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return {"arch": self.arch, "kind": self.kind, "lr": self.lr}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(arch=str(data["arch"]), kind=str(data["kind"]), lr=float(data["lr"]))


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
        seed: seed of the initialisation, the data order and the noise.
        quick: the reduced budget of ``--quick``.
        tiny: tiny models (tests only).
        data_dir: the CIFAR-10 folder (``vgg-cifar10`` only).
        accelerator: Lightning accelerator (``"cpu"``, ``"auto"``, ``"gpu"``, ...).
        threads: torch intra-op threads on CPU (``None``: leave torch's setting).
        task: ``"classification"`` (accuracy is reported) or ``"regression"`` (loss only).
        n_samples: samples of the DLN problem.
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

    def variants(self) -> list[VariantSpec]:
        """Every run of the plan: architecture, then learning rate, then kind."""
        return [
            VariantSpec(arch, kind, lr)
            for arch in self.archs
            for lr in self.lrs
            for kind in self.kinds
        ]

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict."""
        data = asdict(self)
        for key in ("archs", "kinds", "lrs", "step_sizes", "notes"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentPlan:
        """Inverse of :meth:`to_dict` (unknown keys are ignored, missing ones take defaults)."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("archs", "kinds", "notes"):
            if key in kwargs:
                kwargs[key] = tuple(str(v) for v in kwargs[key])
        kwargs["lrs"] = tuple(float(v) for v in kwargs["lrs"])
        if kwargs.get("step_sizes") is not None:
            kwargs["step_sizes"] = tuple(float(v) for v in kwargs["step_sizes"])
        return cls(**kwargs)


def _every(steps: int, per_run: int) -> int:
    return max(1, steps // per_run)


def _dln_step_sizes(n: int = 12) -> tuple[float, ...]:
    # spec §2: for the deep linear network the paper probes η ∈ lr × [1/100, 30]
    lo, hi = math.log(0.01), math.log(30.0)
    return tuple(round(math.exp(lo + (hi - lo) * i / (n - 1)), 6) for i in range(n))


def build_plan(
    experiment: str = "digits",
    *,
    quick: bool = False,
    steps: int | None = None,
    lrs: Sequence[float] | None = None,
    seed: int = 0,
    kinds: Sequence[str] | None = None,
    archs: Sequence[str] | None = None,
    measure_every: int | None = None,
    data_dir: str | None = None,
    accelerator: str | None = None,
    threads: int | None = 1,
    tiny: bool = False,
) -> ExperimentPlan:
    """The plan of one reproduce run, from the command-line choices.

    Defaults per experiment (``quick`` in brackets):

    ========== ================= ============================ ================ ============
    experiment architectures     variants                     learning rates   steps
    ========== ================= ============================ ================ ============
    digits     mlp, cnn [mlp]    all seven                    0.1, 1.0         1000 [400]
    dln        dln               standard, batchnorm          1e-6             10000 [1000]
    vgg-cifar10 vgg              all seven [standard, BN,     0.1, 0.5         15000 [500]
                                 noisy BN]
    ========== ================= ============================ ================ ============

    The diagnostics measure about 20 times per run (``measure_every = steps // 20``).

    Args:
        experiment: one of :data:`EXPERIMENTS`.
        quick: the reduced budget.
        steps: optimiser steps per run (overrides the default).
        lrs: learning rates (overrides the default; sorted, duplicates removed).
        seed: seed of everything random.
        kinds: variant kinds to train (default above).
        archs: architectures to train (default above).
        measure_every: steps between diagnostic measurements (default ``steps // 20``).
        data_dir: the CIFAR-10 folder.
        accelerator: Lightning accelerator (default ``"cpu"``, ``"auto"`` for VGG).
        threads: torch intra-op threads on CPU (``None``: leave torch's setting).
        tiny: tiny models and few measurements, for tests.

    Returns:
        The plan.

    Raises:
        ValueError: an unknown experiment, kind or architecture, or a value out of range.
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(
            f"Expected an experiment, one of {', '.join(EXPERIMENTS)}, but got {experiment!r}"
        )
    notes: list[str] = []
    task = "regression" if experiment == "dln" else "classification"
    if experiment == "digits":
        default_archs: tuple[str, ...] = ("mlp",) if quick else ("mlp", "cnn")
        default_kinds = KINDS
        default_lrs: tuple[float, ...] = (0.1, 1.0)
        default_steps = 400 if quick else 1000
        batch_size = 64
        default_accelerator = "cpu"
        if quick and archs is None:
            notes.append(
                "--quick trains the MLP only (the full run adds the small CNN); every finding is "
                "still evaluated, on the MLP."
            )
    elif experiment == "dln":
        default_archs = ("dln",)
        default_kinds = ("standard", "batchnorm")
        default_lrs = (1e-6,)
        default_steps = 1000 if quick else 10_000
        batch_size = 1000
        default_accelerator = "cpu"
    else:
        default_archs = ("vgg",)
        default_kinds = ("standard", "batchnorm", "noisy-batchnorm") if quick else KINDS
        default_lrs = (0.1, 0.5)
        default_steps = 500 if quick else 15_000
        batch_size = 128
        default_accelerator = "auto"
        if quick and kinds is None:
            notes.append(
                "--quick trains the standard, BatchNorm and noisy-BatchNorm VGG only; the "
                "ℓp-norm finding needs the full run."
            )

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
    chosen_lrs = tuple(sorted({float(v) for v in lrs})) if lrs else default_lrs
    for lr in chosen_lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"Expected learning rates > 0, but got {lr!r}")
    n_steps = default_steps if steps is None else int(steps)
    if n_steps < 1:
        raise ValueError(f"Expected `steps` >= 1, but got {steps!r}")
    per_run = 4 if tiny else MEASUREMENTS_PER_RUN
    every = measure_every if measure_every is not None else _every(n_steps, per_run)
    if every < 1:
        raise ValueError(f"Expected `measure_every` >= 1, but got {measure_every!r}")
    plan = ExperimentPlan(
        experiment=experiment,
        archs=chosen_archs,
        kinds=chosen_kinds,
        lrs=chosen_lrs,
        steps=n_steps,
        batch_size=16 if tiny and experiment == "vgg-cifar10" else batch_size,
        measure_every=every,
        log_every=max(1, n_steps // 200),
        power_iters=3 if tiny else 20,
        step_sizes=_dln_step_sizes() if experiment == "dln" else None,
        seed=int(seed),
        quick=quick,
        tiny=tiny,
        data_dir=data_dir,
        accelerator=accelerator or default_accelerator,
        threads=threads,
        task=task,
        n_samples=64 if tiny else 1000,
        val_every_steps=max(1, n_steps // 20),
        notes=tuple(notes),
    )
    return plan if not tiny else replace(plan, notes=(*plan.notes, "tiny models (test mode)."))
