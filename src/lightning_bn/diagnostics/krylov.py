"""The building blocks of the Lanczos iterations (:mod:`lightning_bn.diagnostics.eigen`,
:mod:`lightning_bn.diagnostics.spectrum`): the orthonormal basis, stored as rows of a few
preallocated blocks, the tridiagonal matrix, and the three-term recurrence's product. Plain
torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

__all__ = ["AddMatvec", "Basis", "Tridiagonal", "recurrence_product"]


class AddMatvec:
    r"""A map :math:`v \mapsto Hv` that can also add its product into a vector in place.

    ``product(v, into)`` returns :math:`Hv` as a new vector when ``into`` is ``None``, else
    ``into`` with :math:`Hv` added to it (e.g.
    :meth:`~lightning_bn.diagnostics.hvp.HessianVectorProduct.matvec` with
    ``accumulate=True``). Calling it is ``product(v, None)``; :func:`recurrence_product` uses
    :meth:`add_into`, so the three-term recurrence writes :math:`Hq_j` where
    :math:`-\beta q_{j-1}` already is: one vector of memory less.
    """

    def __init__(self, product: Callable[[Tensor, Tensor | None], Tensor]) -> None:
        self._product = product

    def __call__(self, v: Tensor) -> Tensor:
        return self._product(v, None)

    def add_into(self, v: Tensor, into: Tensor) -> Tensor:
        """``into`` ← ``into`` + :math:`Hv` (returns ``into``)."""
        return self._product(v, into)


def recurrence_product(
    matvec: Callable[[Tensor], Tensor],
    cur: Tensor,
    prev: Tensor | None,
    beta: float,
    reuse: bool,
) -> tuple[Tensor, Tensor]:
    r""":math:`w = Hq_j - \beta q_{j-1}` (``cur``, ``prev``; ``prev=None``: :math:`Hq_j`) and
    :math:`\lVert Hq_j \rVert` (0-dim).

    With an :class:`AddMatvec` the product is added into :math:`-\beta q_{j-1}`, in ``prev``'s
    memory when ``reuse`` (``prev`` is then spent), else in a new vector; the norm is then its
    bound :math:`\lVert w \rVert + \beta`. Otherwise the product is a new vector that
    :math:`\beta q_{j-1}` is subtracted from.
    """
    if prev is None or not isinstance(matvec, AddMatvec):
        w = matvec(cur)
        with torch.no_grad():
            norm = torch.linalg.vector_norm(w)
            if prev is not None:
                w.sub_(prev, alpha=beta)
        return w, norm
    with torch.no_grad():
        w = prev.mul_(-beta) if reuse else torch.mul(prev, -beta)
    w = matvec.add_into(cur, w)
    with torch.no_grad():
        return w, torch.linalg.vector_norm(w) + beta


class Basis:
    r"""The orthonormal Lanczos vectors :math:`Q_k` as rows of a few blocks.

    Blocks double the capacity (8, 8, 16, 32, ... rows, capped at ``capacity`` in all), so nothing
    is ever copied, at most ``capacity`` rows are allocated, and a product with :math:`Q_k` or
    :math:`Q_k^\top` is one matrix-vector product per block. :meth:`reset` empties the basis and
    keeps the blocks, for the next cycle of a restarted iteration.
    """

    def __init__(self, n: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.capacity, self.dtype, self.device = n, capacity, dtype, device
        self.size = 0
        self._blocks: list[Tensor] = []
        self._views: list[Tensor] = []  # the used rows of every block

    def append(self, v: Tensor | None = None, divisor: float = 1.0) -> Tensor:
        """Store ``v / divisor`` as the next row (``v=None``: leave it to the caller to fill);
        return the stored row (a view)."""
        start = 0
        for block in self._blocks:
            if self.size < start + block.shape[0]:
                break
            start += block.shape[0]
        else:
            rows = min(max(8, self.size), self.capacity - self.size)
            block = torch.empty(rows, self.n, dtype=self.dtype, device=self.device)
            self._blocks.append(block)
        used = self.size - start + 1
        self._views = [*self._views[: len(self._views) - (used > 1)], block[:used]]
        row = block[used - 1]
        if v is not None:
            torch.div(v, divisor, out=row)
        self.size += 1
        return row

    def reset(self) -> None:
        """Forget every row (the blocks stay allocated)."""
        self.size = 0
        self._views = []

    def project_out(self, w: Tensor) -> Tensor:
        r""":math:`w \leftarrow (I - QQ^\top) w` in place (classical Gram-Schmidt); returns the
        coefficients :math:`Q^\top w` it removed."""
        views = self._views
        coeffs = [b @ w for b in views]  # all coefficients first, then one update per block
        for b, c in zip(views, coeffs, strict=True):
            w.addmv_(b.T, c, alpha=-1.0)
        return torch.cat(coeffs) if coeffs else w.new_zeros(0)

    def row(self, i: int) -> Tensor:
        """Row ``i`` (a view)."""
        for b in self._views:
            if i < b.shape[0]:
                return b[i]
            i -= b.shape[0]
        raise IndexError("row beyond the basis")

    def combine(self, s: Tensor, out: Tensor | None = None) -> Tensor:
        r""":math:`Q s` (into ``out`` when given, else a new tensor); ``s`` holds the coefficients
        of the first ``len(s)`` rows (the others count as 0)."""
        if out is None:
            out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        else:
            out.zero_()
        s = s.to(device=self.device, dtype=self.dtype)
        start = 0
        for b in self._views:
            part = s[start : start + b.shape[0]]
            if part.numel():
                out.addmv_(b[: part.numel()].T, part)
            start += b.shape[0]
        return out


class Tridiagonal:
    r"""The Lanczos matrix :math:`T_k` (float64, on the CPU), grown one row at a time.

    Stored dense in a buffer that doubles when full (from at most 32 rows), lower triangle only
    (what :func:`torch.linalg.eigh` reads).
    """

    def __init__(self, capacity: int) -> None:
        self._buffer = torch.zeros(min(capacity, 32), min(capacity, 32), dtype=torch.float64)
        self.size = 0

    def append(self, alpha: float, beta: float) -> None:
        """Add the diagonal entry ``alpha`` below the off-diagonal ``beta`` (unused at first)."""
        k = self.size
        if k == self._buffer.shape[0]:
            grown = self._buffer.new_zeros(2 * k, 2 * k)
            grown[:k, :k] = self._buffer
            self._buffer = grown
        self._buffer[k, k] = alpha
        if k:
            self._buffer[k, k - 1] = beta
        self.size = k + 1

    def eigvalsh(self) -> list[float]:
        """The Ritz values, ascending."""
        return cast(list[float], torch.linalg.eigvalsh(self.matrix()).tolist())

    def matrix(self) -> Tensor:
        return self._buffer[: self.size, : self.size]
