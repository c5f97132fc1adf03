"""How the reproduce runs talk to W&B: the mode (online, offline, off) and the logger of a run."""

from __future__ import annotations

import contextlib
import netrc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from lightning_bn.logging.wandb import finish_active_run

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

    from lightning_bn.reproduce.plan import ExperimentPlan, VariantSpec

__all__ = ["DEFAULT_PROJECT", "WANDB_CHOICES", "resolve_wandb_mode"]

#: Values of ``--wandb``.
WANDB_CHOICES: tuple[str, ...] = ("auto", "online", "offline", "off")
#: W&B project of the runs (``--wandb-project`` changes it).
DEFAULT_PROJECT = "lightning-bn"


def _api_key_configured() -> bool:
    """True when W&B has credentials without asking: ``WANDB_API_KEY``, an identity token or netrc.

    Mirrors where ``wandb`` itself looks (the environment, then the netrc entry of the W&B host,
    ``WANDB_BASE_URL`` or ``api.wandb.ai``), without importing ``wandb`` or prompting.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = os.environ.get("NETRC")
    candidates = [Path(path).expanduser()] if path else [Path("~/.netrc").expanduser()]
    if not path:
        candidates.append(Path("~/_netrc").expanduser())
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            creds = netrc.netrc(str(candidate)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if creds and creds[2]:
            return True
    return False


def resolve_wandb_mode(choice: str = "auto") -> str:
    """Decide how W&B runs: ``"online"``, ``"offline"`` or ``"off"`` (no W&B logger).

    ``"auto"`` follows ``WANDB_MODE`` when it is set (``offline``/``dryrun``, ``disabled``,
    ``online``) and otherwise goes online only when an API key is configured (see
    :func:`_api_key_configured`): a user who never logged in gets offline runs and no prompt.

    Args:
        choice: one of :data:`WANDB_CHOICES`.

    Raises:
        ValueError: an unknown choice.
    """
    if choice not in WANDB_CHOICES:
        raise ValueError(
            f"Expected `wandb` to be one of {', '.join(WANDB_CHOICES)}, but got {choice!r}"
        )
    if choice != "auto":
        return choice
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "off"
    return "online" if _api_key_configured() else "offline"


@contextlib.contextmanager
def _restore_env(*names: str) -> Iterator[None]:
    # WandbLogger(offline=True) sets WANDB_MODE=dryrun for the whole process; undo it afterwards.
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _wandb_logger(
    plan: ExperimentPlan,
    spec: VariantSpec,
    seed: int,
    out_dir: Path,
    mode: str,
    group: str,
    project: str,
) -> WandbLogger:
    from lightning.pytorch.loggers import WandbLogger

    finish_active_run()  # WandbLogger would reuse a run left open
    config = {
        "variant": spec.to_dict()
        | {"id": spec.id, "norm": spec.norm, "noise": spec.noise, "seed": seed},
        "plan": plan.to_dict(),
    }
    logger = WandbLogger(
        name=spec.run_id(seed),
        save_dir=str(out_dir),
        project=project,
        group=group,
        job_type=plan.experiment,
        offline=mode == "offline",
        config=config,
        # wandb.init accepts the settings as a mapping: no wandb import here
        settings={"silent": True, "console": "off", "disable_git": True},
    )
    # WandbLogger always passes `anonymous` (None when unset), which wandb >= 0.2x answers with a
    # deprecation warning on every process; leaving it out changes nothing else.
    init_kwargs = getattr(logger, "_wandb_init", None)
    if isinstance(init_kwargs, dict) and init_kwargs.get("anonymous") is None:
        init_kwargs.pop("anonymous", None)
    return logger
