r"""The eigenvalue density of the Hessian by stochastic Lanczos quadrature (SLQ).

Plain torch, on a linear map :math:`v \mapsto Hv` of flat vectors (see
:mod:`lightning_bn.diagnostics.spectrum`, whose Lanczos runs it reuses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_bn._validation import check_int
from lightning_bn.diagnostics.paramvec import FlatLayout
from lightning_bn.diagnostics.spectrum import Matvec, _rademacher, lanczos

__all__ = ["DensityResult", "spectral_density"]


@dataclass(frozen=True)
class DensityResult:
    r"""Stochastic Lanczos quadrature: for start :math:`j`, nodes :math:`\theta^{(j)}_i` (the
    Ritz values of its :math:`T`) and weights :math:`\tau^{(j)}_i` (squared first components of
    :math:`T`'s eigenvectors, summing to 1), so that

    .. math::
        \phi(\lambda) \approx \frac{1}{S}\sum_j \sum_i \tau^{(j)}_i\,\delta(\lambda - \theta^{(j)}_i)

    approximates the eigenvalue distribution :math:`\frac{1}{n}\sum_l \delta(\lambda-\lambda_l)`:
    :math:`\mathbb{E}\sum_i \tau_i \theta_i^p = \mathrm{tr}(H^p)/n` exactly for
    :math:`p \le 2m-1` (a normalised Rademacher start).

    Attributes:
        nodes: one float64 tensor of nodes per start.
        weights: their weights.
        iterations: products taken (all starts).
        converged: whether every run stopped on an invariant subspace (its quadrature exact);
            ``False`` means it ran its ``steps``, the usual case: the density is then the
            quadrature of degree :math:`2m-1`, not an iteration to a tolerance.
    """

    nodes: list[Tensor]
    weights: list[Tensor]
    iterations: int
    converged: bool

    def moment(self, p: int) -> tuple[float, float]:
        r""":math:`\int \lambda^p \phi`: the mean over starts and its standard error."""
        values = torch.stack(
            [(w * x**p).sum() for x, w in zip(self.nodes, self.weights, strict=False)]
        )
        err = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
        return float(values.mean()), err

    @property
    def support(self) -> tuple[float, float]:
        """The smallest and largest node."""
        return (
            min(float(x.min()) for x in self.nodes),
            max(float(x.max()) for x in self.nodes),
        )

    def histogram(self, bins: int = 32, sigma: float = 0.01) -> tuple[Tensor, float, float]:
        r"""Gaussian-smoothed bin masses on ``bins`` equal bins.

        The bins span the nodes' range :math:`[\theta_{\min}, \theta_{\max}]` widened by
        :math:`3s` on each side, :math:`s = \sigma (\theta_{\max} - \theta_{\min})` the smoothing
        width (``sigma`` relative to the range, as PyHessian's); each node's weight is spread as a
        normal of standard deviation :math:`s` and integrated exactly over each bin (masses sum
        to 1 up to the tails beyond :math:`3s`; with ``sigma=0`` each node falls into its bin).

        Returns:
            ``(masses, lo, hi)``: float64 masses, and the outer bin edges.
        """
        lo, hi = self.support
        s = sigma * (hi - lo)
        lo, hi = lo - 3 * s, hi + 3 * s
        if hi <= lo:  # one distinct node
            lo, hi = lo - 0.5, hi + 0.5
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        x = torch.cat(self.nodes)
        w = torch.cat(self.weights) / len(self.nodes)
        if s > 0:
            cdf = torch.special.ndtr((edges[None, :] - x[:, None]) / s)
            masses = (w[:, None] * (cdf[:, 1:] - cdf[:, :-1])).sum(0)
        else:
            index = torch.bucketize(x, edges[1:-1])
            masses = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, w)
        return masses, lo, hi


def spectral_density(
    matvec: Matvec,
    layout: FlatLayout,
    *,
    starts: int = 2,
    steps: int = 50,
    generator: torch.Generator | None = None,
    reorthogonalize: bool = True,
) -> DensityResult:
    r"""The eigenvalue density of :math:`H` by stochastic Lanczos quadrature.

    ``starts`` Lanczos runs of ``steps`` products (fewer on a breakdown), each from an independent
    normalised Rademacher vector (as PyHessian), with full reorthogonalisation (no ghost copies of
    converged eigenvalues). Cost: ``starts × steps`` products; memory: ``steps`` basis vectors
    at a time.

    ``reorthogonalize=False``: the plain three-term recurrence, three vectors of memory whatever
    ``steps``. In floating point its basis loses orthogonality as Ritz values converge, which
    adds ghost copies of converged eigenvalues (nodes) but leaves the quadrature's moments
    :math:`\int \lambda^p\phi` accurate (Knizhnerman 1996; Ubaru, Chen & Saad 2017): the
    density's mass stays where the spectrum's is. A breakdown is then only detected at
    :math:`\beta = 0` to rounding (``converged`` rarely ``True``).

    Returns:
        :class:`DensityResult` (nodes, weights, moments, smoothed histogram).
    """
    check_int("starts", starts, minimum=1)
    check_int("steps", steps, minimum=1)
    generator = generator or torch.Generator().manual_seed(0)  # one stream for all the starts
    nodes, weights = [], []
    iterations, exact = 0, True
    for _ in range(starts):
        q = _rademacher(layout.numel, layout, generator).div_(math.sqrt(layout.numel))
        run = lanczos(matvec, q, steps, reorthogonalize=reorthogonalize)
        iterations += run.steps
        if not run.finite or not run.steps:
            nan = torch.tensor([math.nan], dtype=torch.float64)
            nodes.append(nan)
            weights.append(torch.ones(1, dtype=torch.float64))
            exact = False
            continue
        values, vectors = run.eigh()
        nodes.append(values)
        weights.append(vectors[0] ** 2)
        exact = exact and run.breakdown
        del run, q  # three vectors: freed before the next start is drawn
    return DensityResult(nodes, weights, iterations, exact)
