"""What the commands of ``lightning-bn`` share: the one-line-error parser and argument types."""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from lightning_bn.reproduce import RedrawResult


__all__: list[str] = []

WANDB_CHOICES = ("auto", "online", "offline", "off")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2), no usage block."""

    def error(self, message: str) -> NoReturn:
        one_line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {one_line} (see `{self.prog} --help`)\n")


def arg_learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a learning rate (a number > 0), got {text!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a learning rate > 0, got {text!r}")
    return value


def _int_in(minimum: int, maximum: float, expected: str) -> Callable[[str], int]:
    """A parser of integers in ``[minimum, maximum]``; ``expected`` words the range for errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


arg_positive_int = _int_in(1, math.inf, "a positive integer")
arg_non_negative_int = _int_in(0, math.inf, "an integer >= 0")


def arg_folder(text: str) -> Path:
    """A folder path; the empty string (which would be the current folder) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a folder path, got {text!r}")
    return Path(text)


def arg_labels(text: str) -> list[str]:
    labels = [t.strip() for t in text.split(",")]
    if not all(labels):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-empty labels, got {text!r}")
    return labels


def arg_steps(text: str) -> tuple[int | None, int | None]:
    from lightning_bn.plot.run_logs import parse_steps

    try:
        return parse_steps(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


#: Lightning's ``seed_everything`` (NumPy's legacy seeding) takes seeds in [0, 2**32 - 1].
_MAX_SEED = 2**32 - 1


arg_seed = _int_in(0, _MAX_SEED, "an integer in [0, 2**32 - 1]")


def arg_names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}, got {text!r}"
            )
        return names

    return parse


def check_extras(parser: argparse.ArgumentParser, experiment: str | None) -> None:
    # matplotlib (figures) is optional; an experiment names what else it imports.
    from lightning_bn.reproduce import experiments as registry

    missing: list[tuple[str, str]] = []
    if importlib.util.find_spec("matplotlib") is None:
        missing.append(("matplotlib", "pip install 'lightning-bn[examples]'"))
    missing += registry.missing_requirements(experiment) if experiment else []
    if missing:
        names = ", ".join(dict.fromkeys(name for name, _ in missing))
        how = " and ".join(dict.fromkeys(install for _, install in missing))
        parser.error(f"this command needs {names}: {how}")


def finding_lines(result: RedrawResult) -> list[str]:
    lines = []
    for f in result.findings:
        numbers = ""
        if f.verdict != "not evaluated":
            lo, hi = f.interval
            numbers = f"  {f.median:.3g} [{lo:.3g}, {hi:.3g}] vs {f.threshold:g}"
        lines.append(f"  {f.verdict:<15} {f.title} ({f.arch}){numbers}")
    return lines
