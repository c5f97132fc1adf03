"""The experiments of ``lightning-bn reproduce``, one module each, and their registry.

:data:`REGISTRY` maps a command-line name to its :class:`~.base.Experiment`; the plan
(:func:`~lightning_bn.reproduce.plan.build_plan`), the runner and the command read it. Adding an
experiment: write a module like :mod:`.mnist1d` and add its ``EXPERIMENT`` below.
"""

from __future__ import annotations

from lightning_bn.reproduce.experiments import digits, dln, mnist1d, vgg_cifar10
from lightning_bn.reproduce.experiments.base import Experiment, PlanDefaults

__all__ = [
    "DEFAULT_EXPERIMENT",
    "REGISTRY",
    "Experiment",
    "PlanDefaults",
    "check_data_dir",
    "data_dir_help",
    "experiments_help",
    "get_experiment",
    "missing_requirements",
    "quick_help",
]

#: Every experiment by name, in the order the command lists them.
REGISTRY: dict[str, Experiment] = {
    e.name: e
    for e in (mnist1d.EXPERIMENT, digits.EXPERIMENT, dln.EXPERIMENT, vgg_cifar10.EXPERIMENT)
}
#: The experiment ``lightning-bn reproduce`` runs when none is named.
DEFAULT_EXPERIMENT = "mnist1d"


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in REGISTRY:
        raise ValueError(f"Expected an experiment, one of {', '.join(REGISTRY)}, but got {name!r}")
    return REGISTRY[name]


def experiments_help() -> str:
    """The command's help for the experiment argument: one clause per experiment."""
    parts = [f"{e.name}: {e.help}" for e in REGISTRY.values()]
    return f"default {DEFAULT_EXPERIMENT}; " + "; ".join(parts)


def quick_help() -> str:
    """What ``--quick`` trains, per experiment."""
    return "; ".join(e.quick_help for e in REGISTRY.values() if e.quick_help)


def data_dir_help() -> str:
    """What ``--data-dir`` means, per experiment that takes one."""
    return "; ".join(f"{e.name}: {e.data_dir_help}" for e in REGISTRY.values() if e.data_dir_help)


def missing_requirements(name: str) -> list[tuple[str, str]]:
    """``(name, install command)`` of each requirement of experiment ``name`` that cannot be
    imported here."""
    import importlib.util

    return [
        (dist, install)
        for module, dist, install in get_experiment(name).requires
        if importlib.util.find_spec(module) is None
    ]


def check_data_dir(name: str, data_dir: str | None) -> str | None:
    """The ``--data-dir`` of experiment ``name``, checked.

    Returns:
        The folder as the plan stores it (``None`` when the experiment takes none).

    Raises:
        ValueError: a folder given to an experiment that takes none, a missing folder for one
            that needs it, or a folder the experiment cannot read (one-line reasons).
    """
    experiment = get_experiment(name)
    if experiment.check_data_dir is None:
        if data_dir is not None:
            takers = [e.name for e in REGISTRY.values() if e.check_data_dir is not None]
            raise ValueError(f"--data-dir applies to {', '.join(takers)} only")
        return None
    if data_dir is None:
        raise ValueError(f"{name} needs --data-dir DIR, {experiment.data_dir_help}")
    return experiment.check_data_dir(str(data_dir))
