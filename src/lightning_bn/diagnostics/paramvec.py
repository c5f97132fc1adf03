r"""Parameter dicts as vectors: one set of helpers for every diagnostic (plain torch).

A parameter dict ``{name: Tensor}`` (a model's named parameters, a gradient, a Hessian-vector
product, a direction) is one vector :math:`v \in \mathbb{R}^n`: the concatenation of its
flattened values in key order. Every inner product and norm of such vectors in this package goes
through these helpers, so they are computed one way (per-tensor reductions, combined across
tensors), with one rule on keys (two dicts combined must have the same keys) and one choice of
accumulation dtype (``dtype=``: e.g. ``torch.float64`` for a value that is logged).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_bn._types import TensorDict

__all__ = [
    "FlatLayout",
    "TensorDict",
    "dict_axpy",
    "dict_clone",
    "dict_dot",
    "dict_flat",
    "dict_norm",
    "dict_normalise",
    "dict_sub_",
    "vector_change",
]

#: A parameter dict: name -> tensor.


def _check_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    if a.keys() != b.keys():
        raise ValueError(f"Expected dicts with the same keys, but got {sorted(a)} and {sorted(b)}")


def dict_dot(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, dtype: torch.dtype | None = None
) -> Tensor:
    r"""Inner product :math:`\langle a, b \rangle = \sum_k \sum_i a_{k,i} b_{k,i}` (0-dim tensor).

    Args:
        a, b: dicts with the same keys and, key by key, broadcastable shapes.
        dtype: the dtype the per-tensor sums are combined in (default: that of the first sum).

    Raises:
        ValueError: the keys of ``a`` and ``b`` differ.
    """
    _check_keys(a, b)
    terms = [torch.sum(a[k] * b[k]) for k in a]
    if not terms:
        return torch.zeros((), dtype=dtype or torch.get_default_dtype())
    target = dtype if dtype is not None else terms[0].dtype
    return torch.stack([t.to(target) for t in terms]).sum()


def dict_norm(a: Mapping[str, Tensor], *, dtype: torch.dtype | None = None) -> Tensor:
    r"""Euclidean norm :math:`\lVert a \rVert_2` over all entries (0-dim tensor).

    The norm of the per-tensor norms: each tensor is reduced in its own dtype (no float64 copy
    of a parameter-sized tensor), and the combination cannot overflow in half precision.

    Args:
        a: the dict.
        dtype: the dtype the per-tensor norms are combined in (default: that of the first one);
            ``torch.float64`` for a value that is logged.
    """
    values = list(a.values())
    if not values:
        return torch.zeros((), dtype=dtype or torch.get_default_dtype())
    norms = torch._foreach_norm(values)  # one fused kernel where the device has one
    target = dtype if dtype is not None else norms[0].dtype
    return torch.linalg.vector_norm(torch.stack([n.to(target) for n in norms]))


def dict_flat(
    a: Mapping[str, Tensor], *, dtype: torch.dtype | None = None, keys: Sequence[str] | None = None
) -> Tensor:
    r"""The vector :math:`v`: ``a``'s tensors (those of ``keys``, default all, in that order)
    flattened and concatenated, in ``dtype`` (default: the first tensor's) on the first tensor's
    device.

    A copy made once, for several reductions of the same vector: ``torch.float64`` where two
    close vectors are compared and their difference is logged (see :func:`vector_change`).
    """
    names = list(a) if keys is None else list(keys)
    first = a[names[0]]
    target = dtype if dtype is not None else first.dtype
    return torch.cat([a[k].reshape(-1).to(device=first.device, dtype=target) for k in names])


def vector_change(g: Tensor, gp: Tensor, *, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    r"""How far the flat vector ``gp`` is from ``g``: :math:`\lVert g - g'
    Vert_2`, the cosine
        :math:`\langle g, g'
    angle / \max(\lVert g
    Vert\lVert g'
    Vert, \epsilon)` (clamped to
        [-1, 1], which rounding can leave by a few ulps), and
        :math:`\lVert g - g'
    Vert_2 / \max(\lVert g
    Vert_2, \epsilon)` (0-dim tensors, in the
        vectors' dtype).
    """
    diff = torch.linalg.vector_norm(g - gp)
    g_norm = torch.linalg.vector_norm(g)
    gp_norm = torch.linalg.vector_norm(gp)
    cos = (torch.dot(g, gp) / torch.clamp(g_norm * gp_norm, min=eps)).clamp(-1.0, 1.0)
    return diff, cos, diff / torch.clamp(g_norm, min=eps)


def dict_axpy(
    alpha: float | Tensor, x: Mapping[str, Tensor], y: Mapping[str, Tensor]
) -> TensorDict:
    r""":math:`\alpha x + y`, key by key (a new dict; ``x`` and ``y`` are not modified).

    Raises:
        ValueError: the keys of ``x`` and ``y`` differ.
    """
    _check_keys(x, y)
    return {k: y[k] + alpha * x[k] for k in x}


def dict_sub_(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    r""":math:`a \leftarrow a - b` in place (one fused kernel for all tensors); returns ``a``.

    For a dict whose tensors are not used again (saves a parameter-sized allocation).

    Raises:
        ValueError: the keys of ``a`` and ``b`` differ.
    """
    _check_keys(a, b)
    keys = list(a)
    if keys:
        with torch.no_grad():
            torch._foreach_sub_([a[k] for k in keys], [b[k] for k in keys])
    return a


def dict_normalise(a: Mapping[str, Tensor]) -> TensorDict:
    r""":math:`a / \lVert a \rVert_2` (a new dict).

    Raises:
        ValueError: ``a`` has zero (or non-finite) norm.
    """
    norm = float(dict_norm(a))
    if not 0.0 < norm < math.inf:
        raise ValueError(f"Cannot normalise a vector of norm {norm}")
    return {k: t / norm for k, t in a.items()}


def dict_clone(a: Mapping[str, Tensor]) -> TensorDict:
    """Detached copies of every tensor (e.g. a warm start kept across steps)."""
    return {k: t.detach().clone() for k, t in a.items()}


class FlatLayout:
    """A parameter dict as one flat 1-D tensor and back.

    The flat vector has the keys' tensors flattened and concatenated in key order, in a working
    dtype of float32 or wider (the promotion of every tensor's dtype with float32) on the first
    tensor's device.

    Args:
        template: the keys, shapes, dtypes and devices of the dicts to convert.
    """

    def __init__(self, template: Mapping[str, Tensor]) -> None:
        self.keys = list(template)
        self.shapes = [t.shape for t in template.values()]
        self.numels = [t.numel() for t in template.values()]
        self.dtypes = [t.dtype for t in template.values()]
        self.devices = [t.device for t in template.values()]
        self.dtype = functools.reduce(torch.promote_types, self.dtypes, torch.float32)
        self.device = self.devices[0] if self.devices else torch.device("cpu")
        # the common case: no conversion either way (two dispatches fewer per tensor and call)
        self._same = all(d == self.dtype for d in self.dtypes) and all(
            d == self.device for d in self.devices
        )

    @property
    def numel(self) -> int:
        """Length :math:`n` of the flat vector."""
        return sum(self.numels)

    @property
    def uniform(self) -> bool:
        """Whether every tensor has the working dtype and device (no conversion either way:
        :meth:`unflat` returns plain views)."""
        return self._same

    def flat(self, d: Mapping[str, Tensor], out: Tensor | None = None) -> Tensor:
        """A new flat tensor (``torch.cat`` copies: never a view of ``d``), without autograd;
        with ``out`` (1-D, ``numel`` long, the working dtype and device) written there instead.

        Raises:
            ValueError: ``d`` does not have exactly the template's keys.
        """
        if d.keys() != set(self.keys):
            raise ValueError(
                f"Expected a dict with the keys {sorted(self.keys)}, but got {sorted(d)}"
            )
        with torch.no_grad():
            if not self.keys:
                return torch.zeros(0, dtype=self.dtype, device=self.device)
            if self._same:
                parts = [d[k].reshape(-1) for k in self.keys]
            else:
                parts = [
                    d[k].reshape(-1).to(device=self.device, dtype=self.dtype) for k in self.keys
                ]
            return torch.cat(parts) if out is None else torch.cat(parts, out=out)

    def unflat(self, v: Tensor) -> TensorDict:
        """Views of ``v`` in the template's shapes (copies only where a dtype or device differs)."""
        parts = v.split(self.numels)
        if self._same:
            return {
                k: t.view(shape) for k, t, shape in zip(self.keys, parts, self.shapes, strict=True)
            }
        return {
            k: t.view(shape).to(device=device, dtype=dtype)
            for k, t, shape, dtype, device in zip(
                self.keys, parts, self.shapes, self.dtypes, self.devices, strict=True
            )
        }
