"""What a callback logs, declared on its class: keys with their summaries, and its panels.

Every diagnostic callback class states, in one :class:`LoggedKeys` on its ``logged_keys``
attribute, the keys it logs (``ics/{layer}/l2``), how W&B summarises each one (``max``, ``min``,
``last``) and the charts that show them (:class:`Panel`). Defining the class registers the
declaration here (:class:`DeclaresKeys`), and everything that needs to know the keys reads
them from this registry: the W&B summaries and panels (:mod:`lightning_bn.logging.wandb`), and
the prefixes, figures, titles and captions of ``lightning-bn plot`` (:mod:`lightning_bn.plot`).
A new diagnostic is therefore picked up by both as soon as its callback class exists.

Plain Python (no torch, no Lightning).

Example:
    >>> from lightning_bn.logging.keys import LoggedKey, LoggedKeys, Panel, summaries
    >>> class ToyCallback(DeclaresKeys):
    ...     logged_keys = LoggedKeys(
    ...         prefix="toy/",
    ...         keys=(LoggedKey("toy/{layer}/norm", "max"),),
    ...         panels=(Panel("panels/toy_norm", "Toy norm per layer", (("toy/{layer}/norm", "{layer}"),)),),
    ...     )
    >>> summaries()["toy/*/norm"]
    'max'
    >>> forget("ToyCallback")
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

__all__ = [
    "DeclaresKeys",
    "LoggedKey",
    "LoggedKeys",
    "Panel",
    "declared",
    "forget",
    "instance_of",
    "instance_summaries",
    "owners",
    "panels",
    "panels_for",
    "peak_memory_keys",
    "prefixes",
    "summaries",
]


@dataclass(frozen=True)
class Panel:
    """One chart of the paper's diagnostics.

    Attributes:
        key: The key the W&B chart is logged under, such as ``"panels/loss_range"``; without
            its ``panels/`` it is the name of the PNG file of ``lightning-bn plot``.
        title: The chart title.
        lines: ``(key, label)`` per line. A key containing ``{layer}`` stands for one line
            per layer found in the history (``"ics/{layer}/l2"``); ``{layer}`` in the label
            is replaced by the layer name.
        ylabel: The y-axis label of the PNG figure.
        caption: One sentence on what the figure shows (the line of ``lightning-bn plot``'s
            ``index.md``).
        source: What fills the panel, said when ``lightning-bn plot`` skips it for want of
            data (e.g. ``"smoothness/beta_eff (SmoothnessCallback)"``).
        order: Where the panel goes among all declared panels (ascending; ties keep the
            order of declaration).
        guide: A horizontal dashed line drawn at this value in per-layer PNG figures (such as
            the bound 1 of a ratio), or ``None``.
        kind: How the lines are drawn: ``"line"`` (one line per key), ``"band"`` (two keys,
            the lower and upper edge of a band: Fig. 4a and 4b; a margin chart in TensorBoard)
            or ``"density"`` (a histogram over training, one key family ``<prefix>lo``,
            ``<prefix>hi``, ``<prefix>bin_<j>``: the first line's key is ``<prefix>*``; a
            heatmap of step × value in ``lightning-bn plot``, a table in W&B).
    """

    key: str
    title: str
    lines: tuple[tuple[str, str], ...]
    ylabel: str = ""
    caption: str = ""
    source: str = ""
    order: int = 1000
    guide: float | None = None
    kind: str = "line"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(
                f"Expected `kind` to be one of {', '.join(_KINDS)}, but got {self.kind!r}"
            )
        if self.kind == "band" and len(self.lines) != 2:
            raise ValueError(f"Expected a band panel to have two lines, but got {len(self.lines)}")

    @property
    def name(self) -> str:
        """The panel's short name: its key without ``panels/`` (the PNG file's stem)."""
        return self.key.removeprefix("panels/")

    @property
    def per_layer(self) -> bool:
        """Whether the panel has one line per layer (its keys hold ``{layer}``)."""
        return any("{layer}" in key for key, _ in self.lines)

    def for_prefix(self, base: str, prefix: str) -> Panel:
        """This panel for a callback instance logging under ``prefix`` instead of ``base``.

        ``prefix`` is ``<base>@<name>/`` (``"ics@late/"`` for ``base="ics/"``): the keys are
        moved under it, the chart key and PNG name get ``@<name>`` (``panels/ics_l2@late``) and
        the title names the instance.
        """
        if prefix == base:
            return self
        instance = prefix.removesuffix("/")
        tag = instance.partition("@")[2] or instance
        lines = tuple(
            ((prefix + key.removeprefix(base)) if key.startswith(base) else key, label)
            for key, label in self.lines
        )
        return replace(
            self, key=f"{self.key}@{tag}", title=f"{self.title} [{instance}]", lines=lines
        )

    def resolve(self, keys: Iterable[str]) -> list[tuple[str, str]]:
        """The concrete ``(key, label)`` lines among ``keys``, in panel then history order."""
        keys = list(keys)
        out: list[tuple[str, str]] = []
        for template, label in self.lines:
            if "{layer}" not in template:
                if template in keys:
                    out.append((template, label))
                continue
            head, _, tail = template.partition("{layer}")
            pattern = re.compile(re.escape(head) + "(?P<layer>.+)" + re.escape(tail) + r"\Z")
            for key in keys:
                match = pattern.match(key)
                if match:
                    out.append((key, label.replace("{layer}", match["layer"])))
        return out


@dataclass(frozen=True)
class LoggedKey:
    """One key (or family of keys) a callback logs.

    Attributes:
        pattern: The key; ``{layer}`` stands for a layer name (``"ics/{layer}/cos"``) and a
            trailing ``*`` for anything (``"noise/*"``).
        summary: How W&B summarises the key over a run: ``"min"``, ``"max"``, ``"mean"``,
            ``"first"``, ``"last"`` or ``"none"`` (the value worth keeping: the worst shift, the
            largest loss range, the end state).
    """

    pattern: str
    summary: str = "last"

    @property
    def glob(self) -> str:
        """The pattern as a glob (``{layer}`` becomes ``*``)."""
        return self.pattern.replace("{layer}", "*")


@dataclass(frozen=True)
class LoggedKeys:
    """Everything one callback class logs.

    Attributes:
        prefix: The first part of every key it logs, with its ``/`` (``"ics/"``);
            ``lightning-bn plot`` reads a run that logs a key with one of the declared prefixes.
        keys: Its keys with their summaries (first match wins within a callback).
        panels: Its charts (W&B line series at the end of fit, PNG files of ``lightning-bn plot``).
        owner: The class that declared it (filled in when the class is defined).
    """

    prefix: str
    keys: tuple[LoggedKey, ...] = ()
    panels: tuple[Panel, ...] = ()
    owner: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.prefix.endswith("/"):
            raise ValueError(f"Expected `prefix` to end with '/', but got {self.prefix!r}")
        for key in self.keys:
            if not key.pattern.startswith(self.prefix):
                raise ValueError(
                    f"Expected every key to start with {self.prefix!r}, but got {key.pattern!r}"
                )


_DECLARED: dict[str, LoggedKeys] = {}
_KINDS = ("line", "band", "density")
# A logged key's first part: a declared prefix's base, and the instance's `@<name>` if any.
_INSTANCE = re.compile(r"(?P<base>[^/@]+)(?:@[^/]+)?/")


class DeclaresKeys:
    """A class whose ``logged_keys`` (a :class:`LoggedKeys`) is registered when it is defined.

    Subclasses that set ``logged_keys`` replace an earlier declaration of a class of the same
    name (a class redefined in a notebook); subclasses that do not set it declare nothing.
    """

    logged_keys: ClassVar[LoggedKeys | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        logged = cls.__dict__.get("logged_keys")
        if logged is not None:
            if not isinstance(logged, LoggedKeys):
                raise TypeError(
                    f"Expected `{cls.__name__}.logged_keys` to be a LoggedKeys, but got {logged!r}"
                )
            _DECLARED[cls.__name__] = replace(logged, owner=cls.__name__)


def forget(owner: str) -> None:
    """Remove the declaration of the class named ``owner`` (no error if there is none)."""
    _DECLARED.pop(owner, None)


def declared() -> tuple[LoggedKeys, ...]:
    """Every declaration, in the order the classes were defined."""
    return tuple(_DECLARED.values())


def prefixes() -> tuple[str, ...]:
    """The declared key prefixes (``"ics/"``, ...), each once, in declaration order."""
    return tuple(dict.fromkeys(d.prefix for d in _DECLARED.values()))


def summaries() -> dict[str, str]:
    """Glob pattern -> W&B summary of every declared key (first declaration of a glob wins)."""
    out: dict[str, str] = {}
    for logged in _DECLARED.values():
        for key in logged.keys:
            out.setdefault(key.glob, key.summary)
    return out


def panels() -> tuple[Panel, ...]:
    """Every declared panel, by :attr:`Panel.order` (ties in declaration order)."""
    every = [p for logged in _DECLARED.values() for p in logged.panels]
    return tuple(sorted(every, key=lambda p: p.order))


def owners(prefix_of: Iterable[str]) -> list[str]:
    """The classes that declared the given prefixes (for messages)."""
    wanted = set(prefix_of)
    return [d.owner for d in _DECLARED.values() if d.prefix in wanted]


def instance_of(key: str) -> tuple[LoggedKeys, str] | None:
    """The declaration a logged key belongs to and the prefix it was logged under.

    A callback with ``name="late"`` logs ``<base>@late/...`` (``ics@late/model.0/l2``), and
    several unnamed callbacks of one class ``<base>@1/...``, ``<base>@2/...``: the key belongs
    to the declaration of prefix ``<base>/``.

    Example:
        >>> import lightning_bn.callbacks
        >>> logged, prefix = instance_of("ics@late/model.0/l2")
        >>> logged.owner, prefix
        ('ICSCallback', 'ics@late/')
        >>> instance_of("train/loss") is None
        True
    """
    match = _INSTANCE.match(key)
    if match is None:
        return None
    base = match["base"] + "/"
    for logged in _DECLARED.values():
        if logged.prefix == base:
            return logged, match.group(0)
    return None


def instance_summaries() -> dict[str, str]:
    """:func:`summaries` plus the same summaries for every instance prefix (``ics@*/*/l2``)."""
    out = summaries()
    for glob, summary in list(out.items()):
        base, _, rest = glob.partition("/")
        out.setdefault(f"{base}@*/{rest}", summary)
    return out


def panels_for(keys: Iterable[str]) -> tuple[Panel, ...]:
    """Every declared panel, plus each panel again for every instance prefix among ``keys``.

    The instance panels (``panels/ics_l2@late`` for keys ``ics@late/...``) come right after the
    declared panel they copy.

    Example:
        >>> import lightning_bn.callbacks
        >>> [p.key for p in panels_for(["ics@late/0/l2"]) if p.key.startswith("panels/ics")]
        ['panels/ics_l2', 'panels/ics_l2@late', 'panels/ics_cos', 'panels/ics_cos@late']
    """
    found: dict[str, list[str]] = {}
    for key in keys:
        hit = instance_of(key)
        if hit is not None and hit[1] != hit[0].prefix:
            seen = found.setdefault(hit[0].prefix, [])
            if hit[1] not in seen:
                seen.append(hit[1])
    out: list[Panel] = []
    for panel in panels():
        out.append(panel)
        base = next((d.prefix for d in _DECLARED.values() if panel in d.panels), "")
        out.extend(panel.for_prefix(base, prefix) for prefix in found.get(base, []))
    return tuple(out)


def peak_memory_keys(key_base: str) -> tuple[LoggedKey, LoggedKey]:
    """The declarations of ``<key_base>/peak_mem_mb`` and ``peak_cuda_mem_mb`` (W&B keeps the max).

    Every diagnostic callback logs them the same way (see ``log_peak_memory`` on
    :class:`lightning_bn.callbacks.base.DiagnosticCallback`).
    """
    return (
        LoggedKey(f"{key_base}/peak_mem_mb", "max"),
        LoggedKey(f"{key_base}/peak_cuda_mem_mb", "max"),
    )
