"""Gradients summed straight into one flat buffer (plain torch).

:func:`torch.autograd.grad` returns a new tensor per input, and a caller that wants them in one
flat vector copies them there: two copies of the gradient for a moment. Autograd adds into a
leaf's existing ``.grad`` in place (outside ``create_graph``), so :func:`backward_into` makes
each leaf's ``.grad`` a view of the caller's buffer for one backward pass: the gradient exists
once, in the buffer, and a buffer kept across passes costs nothing more per pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["backward_into", "flat_views"]


def flat_views(buffer: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of the 1-D ``buffer`` in the shapes of ``like``, one after another."""
    parts = buffer.split([t.numel() for t in like])
    return [p.view(t.shape) for p, t in zip(parts, like, strict=True)]


def backward_into(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    out: Tensor,
    grad_outputs: Sequence[Tensor] | None = None,
    retain_graph: bool = False,
    accumulate: bool = False,
) -> Tensor:
    """The gradients of ``outputs`` (weighted by ``grad_outputs``) with respect to the leaves
    ``inputs``, written into ``out`` (zeroed here; 0 for an input the outputs do not reach), or
    with ``accumulate=True`` added to what ``out`` holds (autograd adds into it in place: a
    caller that needs ``x + gradient`` puts ``x`` there first and needs no second vector).

    ``out`` is 1-D, as long as the inputs together, in their dtype and on their device (all the
    same). The leaves' ``.grad`` are views of ``out`` during the pass and ``None`` after it; a
    ``.grad`` autograd replaced instead of adding into it (its replacement is the sum of the
    old ``.grad`` and the gradient) is copied into ``out``.
    """
    if not accumulate:
        out.zero_()
    slots = flat_views(out, inputs)
    for leaf, slot in zip(inputs, slots, strict=True):
        leaf.grad = slot
    try:
        torch.autograd.backward(
            list(outputs), grad_tensors=grad_outputs, retain_graph=retain_graph, inputs=list(inputs)
        )
        for leaf, slot in zip(inputs, slots, strict=True):
            if leaf.grad is not None and leaf.grad.data_ptr() != slot.data_ptr():
                slot.copy_(leaf.grad)
    finally:
        for leaf in inputs:
            leaf.grad = None
    return out
