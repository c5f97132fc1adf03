"""Tied parameters (one tensor held by several modules) and where a per-layer diagnostic
measures them.

Plain torch. GPT-2's ``lm_head``, BERT's MLM decoder and T5's ``lm_head`` share the input
embedding's weight; ``root.named_parameters()`` lists such a tensor once, under the module that
registered it first (the embedding), although the module that uses it *last* (the output layer)
has the most layers before it. The rule of this package: **a tied parameter belongs to the module
holding its last alias in registration order** (``named_parameters(remove_duplicate=False)``),
the output layer in those models, and it is placed in the forward pass at its **last use**.
Before the output layer, an ICS measurement then sees every earlier layer moved; at the
embedding, where nothing precedes it, it would always see :math:`G = G'`.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

from torch import nn

__all__ = ["left_out_parameters", "tied_aliases", "tied_owner", "warn_left_out_parameters"]

_LISTED = 20


def tied_aliases(root: nn.Module) -> dict[str, list[str]]:
    """``{name in named_parameters(): every qualified name of that tensor}`` for tensors held
    under more than one name, the names in registration order."""
    by_id: dict[int, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names for names in by_id.values() if len(names) > 1}


def tied_owner(root: nn.Module) -> dict[str, str]:
    """``{name in named_parameters(): qualified name of the module holding its last alias}``
    for every tied parameter (the module is ``""`` for the root)."""
    return {name: aliases[-1].rpartition(".")[0] for name, aliases in tied_aliases(root).items()}


def left_out_parameters(
    root: nn.Module, measured: Collection[str], norm_modules: Collection[str]
) -> tuple[list[str], list[str]]:
    """Trainable parameters that no measured layer holds: ``(of normalisation layers, others)``.

    Args:
        root: the model.
        measured: names (as in ``named_parameters()``) of the parameters some layer measures.
        norm_modules: qualified names of the model's normalisation layers.
    """
    norms: list[str] = []
    others: list[str] = []
    for name, p in root.named_parameters():
        if not p.requires_grad or name in measured:
            continue
        owner = name.rpartition(".")[0]
        (norms if owner in norm_modules else others).append(name)
    return norms, others


def warn_left_out_parameters(
    root: nn.Module, measured: Collection[str], norm_modules: Collection[str], what: str
) -> tuple[list[str], list[str]]:
    """One warning naming the trainable parameters no measured layer holds, with the reason;
    nothing when the only ones left out are normalisation layers' (γ, β, left out by design).
    Returns :func:`left_out_parameters`."""
    norms, others = left_out_parameters(root, measured, norm_modules)
    parts = []
    if others:
        listed = ", ".join(others[:_LISTED]) + (
            f", … and {len(others) - _LISTED} more" if len(others) > _LISTED else ""
        )
        parts.append(
            f"{len(others)} held by no measured layer (a module without a weight matrix of its"
            f" own, or the root): {listed}"
        )
    if norms and others:  # alone, a norm layer's γ, β are left out as documented: no warning
        parts.append(
            f"{len(norms)} of normalisation layers (γ, β are not a layer of their own; they count"
            " as earlier layers' parameters)"
        )
    if parts:
        warnings.warn(
            f"{what} measures no layer for these trainable parameters: {'; '.join(parts)}."
            " Pass `layers=` to measure them (a module selected by name or type is measured"
            " with every trainable parameter of its subtree)",
            stacklevel=3,
        )
    return norms, others
