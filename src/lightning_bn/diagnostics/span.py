r"""Directions projected off an operator (eigenvectors found, a trace's deflation), possibly
stored in a narrower dtype than the vectors they act on. Plain torch.

:class:`Span` keeps vectors :math:`Y` (e.g. in bfloat16: half a float32 copy each) and applies
the exact orthogonal projector onto what it stores, :math:`P = Y G^{-1} Y^\top` with
:math:`G = Y^\top Y` accumulated in float64: rounding the vectors changes which subspace is
projected off (by about the rounding, 2^-9 relative for bfloat16), never makes the projector
inexact. :func:`deflated_exact_trace` is the part of a trace that such a projector deflates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import overload

import torch
from torch import Tensor

__all__ = ["Span", "deflated_exact_trace"]

#: Entries converted to the working dtype at a time (4 MiB in float32).
_CHUNK = 1 << 20


class Span(Sequence[Tensor]):
    """Vectors stored in ``dtype`` (``None``: as given) and the orthogonal projector onto their
    span; ``work``: the dtype of the vectors projected (default: the first vector's)."""

    def __init__(
        self,
        vectors: Iterable[Tensor] = (),
        dtype: torch.dtype | None = None,
        work: torch.dtype | None = None,
    ) -> None:
        self.dtype, self.work = dtype, work
        self._vectors: list[Tensor] = []
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self.inverse = self.gram
        for v in vectors:
            self.append(v)

    def append(self, v: Tensor) -> None:
        """Store ``v`` (rounded to ``dtype``; a caller's float32 ``v`` can be freed after)."""
        self.work = self.work or v.dtype
        y = v.detach() if self.dtype is None else v.detach().to(self.dtype)
        k = len(self._vectors)
        gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        gram[:k, :k] = self.gram
        for i, x in enumerate([*self._vectors, y]):
            gram[i, k] = gram[k, i] = _dot(x, y)
        self._vectors.append(y)
        self.gram, self.inverse = gram, torch.linalg.pinv(gram, hermitian=True)

    @overload
    def __getitem__(self, i: int) -> Tensor: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Tensor]: ...
    def __getitem__(self, i: int | slice) -> Tensor | Sequence[Tensor]:
        return self._vectors[i]

    def __len__(self) -> int:
        return len(self._vectors)

    def full(self, i: int) -> Tensor:
        """Vector ``i`` in the working dtype (a new tensor when stored narrower)."""
        y = self._vectors[i]
        return y.to(self.work) if self.work is not None else y

    def project_off(self, w: Tensor) -> None:
        r""":math:`w \leftarrow (I - P) w`, in place (converted a chunk at a time: no copy)."""
        if not self._vectors:
            return
        c = torch.zeros(len(self._vectors), dtype=torch.float64, device=w.device)
        for i in range(0, w.numel(), _CHUNK):  # each chunk's dot in w's dtype, summed in float64
            part = w[i : i + _CHUNK]
            for j, y in enumerate(self._vectors):
                c[j] += torch.dot(y[i : i + _CHUNK].to(w.dtype), part).double()
        for y, a in zip(self._vectors, (self.inverse @ c.cpu()).tolist(), strict=True):
            if y.dtype == w.dtype:
                w.add_(y, alpha=-a)
                continue
            for i in range(0, w.numel(), _CHUNK):
                w[i : i + _CHUNK].add_(y[i : i + _CHUNK].to(w.dtype), alpha=-a)


def deflated_exact_trace(
    matvec: Callable[[Tensor], Tensor],
    vectors: Sequence[Tensor],
    blocks: Mapping[str, Tensor | slice],
) -> tuple[float, dict[str, float]]:
    r"""The exact part of a trace deflated by the projector :math:`P` onto nearly orthonormal
    vectors :math:`Y` (a :class:`Span`, or a list; :math:`G = Y^\top Y`,
    :math:`P = Y G^{-1} Y^\top`): :math:`\mathrm{tr}(PHP) = \mathrm{tr}(G^{-1} M)`,
    :math:`M = Y^\top H Y`, and per block :math:`b` (flat indices; :math:`E_b` its restriction)
    the part of :math:`\mathrm{tr}(E_b H E_b^\top)` that is not
    :math:`\mathrm{tr}(E_b (I-P)H(I-P) E_b^\top)`:

    .. math::
        2\,\mathrm{tr}(G^{-1} X_b) - \langle G_b, G^{-1} M G^{-1}\rangle,
        \qquad X_b = Y^\top E_b^\top E_b H Y, \quad G_b = Y^\top E_b^\top E_b Y

    (:math:`E_b(PHP + 2\,\mathrm{sym}(PH(I-P)))E_b^\top`; over a partition they sum to
    :math:`\mathrm{tr}(G^{-1}M)`; with orthonormal :math:`Y`, :math:`G = I`). One product per
    vector, taken one at a time.

    Raises:
        ValueError: ``vectors`` not nearly orthonormal (their Gram matrix off :math:`I` by more
            than 0.1: the projector would be exact, but a mistake is likelier than a choice).
    """
    span = vectors if isinstance(vectors, Span) else Span(vectors)
    k = len(span)
    if not k:
        return 0.0, dict.fromkeys(blocks, 0.0)
    if float((span.gram - torch.eye(k, dtype=torch.float64)).abs().max()) > 0.1:
        raise ValueError("Expected orthonormal deflation vectors, but their Gram matrix is not I")
    m = torch.zeros(k, k, dtype=torch.float64)
    cross = {name: torch.zeros(k, k, dtype=torch.float64) for name in blocks}
    for i in range(k):
        z = matvec(span.full(i))
        with torch.no_grad():
            for j, x in enumerate(span):
                m[j, i] = _dot(x, z)
                for name, idx in blocks.items():
                    cross[name][j, i] = _dot(x[idx], z[idx])
        del z
    m, inverse = (m + m.T) / 2, span.inverse
    outer = inverse @ m @ inverse
    parts = {}
    for name, idx in blocks.items():
        rows = torch.stack([y[idx] for y in span]).to(torch.float64).cpu()
        trace_x = float(torch.trace(inverse @ cross[name]))
        parts[name] = 2.0 * trace_x - float(((rows @ rows.T) * outer).sum())
    return float(torch.trace(inverse @ m)), parts


def _dot(a: Tensor, b: Tensor, chunk: int = 1 << 16) -> float:
    r""":math:`a^\top b` accumulated in float64 by chunks (a float32 BLAS dot over millions of
    entries is off by about 1e-3 relative; either may be narrower)."""
    parts = [
        torch.dot(a[i : i + chunk].double(), b[i : i + chunk].double())
        for i in range(0, a.numel(), chunk)
    ]
    return float(torch.stack(parts).sum()) if parts else 0.0
