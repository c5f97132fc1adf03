"""Attention in probes: the math backend of ``scaled_dot_product_attention``.

Plain torch. The fused kernels behind :func:`torch.nn.functional.scaled_dot_product_attention`
(flash, memory-efficient, and the CPU's fused kernel) have no double backward, so a
Hessian-vector product through a model that calls it (Hugging Face ViT, BERT, GPT-2 with
``attn_implementation="sdpa"``, :class:`torch.nn.MultiheadAttention`) fails. Every probe
evaluation runs under :func:`torch.nn.attention.sdpa_kernel` with the math backend, which is
built from differentiable primitives: first and second derivatives work on any device. The
training step itself keeps whichever kernel torch picks; the math backend computes the same
attention to float rounding, and all of a diagnostic's passes use it alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["math_attention", "with_math_attention"]


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """A context in which ``scaled_dot_product_attention`` uses its math backend."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # a torch without the context: nothing to choose
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def with_math_attention(
    context: Callable[[], contextlib.AbstractContextManager[Any]],
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """``context`` (a zero-argument context factory) entered together with :func:`math_attention`."""

    @contextlib.contextmanager
    def both() -> Iterator[None]:
        with context(), math_attention():
            yield

    return both
