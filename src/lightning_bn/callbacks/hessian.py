"""HessianCallback: trace, top-k eigenvalues, spectral density, per-layer blocks, preconditioned
sharpness against the optimiser's stability threshold."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_bn._validation import check_int, check_selection
from lightning_bn.callbacks._docs import fill_doc
from lightning_bn.callbacks.base import DiagnosticCallback, LossFn
from lightning_bn.diagnostics.hessian import (
    HessianSettings,
    HessianState,
    compute_hessian,
    module_layers,
)
from lightning_bn.diagnostics.preconditioned import stability_threshold
from lightning_bn.logging.keys import LoggedKey, LoggedKeys, Panel, peak_memory_keys
from lightning_bn.probe import StepRecord

__all__ = ["HessianCallback"]


@fill_doc
class HessianCallback(DiagnosticCallback):
    r"""Measure the Hessian of the training loss beyond its top eigenvalue, during training.

    At a measured step t, on the step's batch (the step's dropout masks and batch statistics,
    BatchNorm in train mode; nothing of the model or optimiser touched), for
    :math:`H = \nabla^2 L(W^t)` over the trainable parameters, from Hessian-vector products only
    (no dense Hessian):

    * the ``top_k`` largest eigenvalues (Lanczos, one eigenvalue at a time, each orthogonal to
      those found before; at the default ``lanczos_basis=0`` each by the three-term recurrence
      run twice, the second pass summing the Ritz vector, so no basis is kept; each Ritz value
      within ``tol`` relative of an eigenvalue by its residual; warm-started from the previous
      measurement's Ritz vectors plus a random part);
    * the trace by Hutchinson (Rademacher probes), deflated by the top-k eigenvectors (their part
      of the trace is exact, the probes see the rest), until its standard error is within
      ``trace_rtol`` of it;
    * the eigenvalue density by stochastic Lanczos quadrature (``density_starts`` runs of
      ``density_steps`` products, three-term recurrence), logged as a Gaussian-smoothed
      histogram of ``density_bins`` equal bins between ``density/lo`` and ``density/hi``;
    * per layer (the layers of :class:`~lightning_bn.callbacks.ics.ICSCallback`, named as in
      its keys), the trace (from the same probes, free) and top eigenvalue of the diagonal block;
    * the preconditioned sharpness :math:`\lambda_{\max}(P^{-1/2} H P^{-1/2})`, :math:`P` from the
      optimiser's own state (Adam/AdamW: bias-corrected second moment, :math:`\epsilon`
      included; RMSprop; SGD: :math:`P = I`), with the stability threshold beside it (38/η for
      Adam with :math:`\beta_1 = 0.9`, 2/η for gradient descent, 2(1+μ)/η with momentum):
      sharpness reaching the threshold is the edge of stability.

    Every iterative estimate logs whether it met its tolerance (``*_converged``, 1.0 or 0.0),
    so an estimate stopped by an iteration cap is never mistaken for the answer. Under DDP each
    product is averaged over ranks and every rank draws the same random vectors: the values equal
    those of one process on the global batch.

    Cost, in Hessian-vector products (about one backward each): top-k 60-250
    (``lanczos_basis=8``: 30-150); the trace 10 to ``trace_max_samples``, plus ``top_k``; the
    density ``density_starts × density_steps``; each layer 20-60; the preconditioned sharpness as
    the top eigenvalue. Memory, in parameter copies: 3 Lanczos vectors, the eigenvectors found
    (bfloat16 from 2^20 float32 parameters), the gradient's graph, bfloat16 warm starts, S^(1/2)
    (Adam, RMSprop): 6.5-7.5 on an 8.7M MLP, SGD or Adam; 7.8-8.3 resident with glibc's heap (it
    keeps freed blocks). ``None, density_reorth=True``: ``max_iters`` and ``density_steps`` copies.

    Logged metrics (under ``hessian/``, or ``hessian@<name>/``; declared in :attr:`logged_keys`):
    ``eig_1`` … ``eig_<k>`` (the k largest eigenvalues, descending), ``eig_converged``,
    ``eig_iters``; ``trace``, ``trace_stderr``, ``trace_converged``, ``trace_samples``;
    ``<layer>/trace``, ``<layer>/trace_stderr``, ``<layer>/eig_max``, ``<layer>/eig_converged``; ``precond_eig_max``,
    ``precond_converged``, ``stability_threshold`` (from the second measured step for Adam and
    RMSprop, whose state is empty before their first step); ``density/lo``, ``density/hi``,
    ``density/bin_<j>`` (bin masses, summing to about 1).

    Args:
        %(every_n_steps)s
        top_k: how many of the largest eigenvalues (``>= 1``).
        max_iters: most products of the top-k (all k together), of each layer and of the
            preconditioned sharpness (default 300: room for both passes of a cold top-3);
            with ``lanczos_basis=None`` also the most basis vectors kept.
        lanczos_basis: most Lanczos vectors kept: 0 (default: none, each eigenvalue by two
            passes of the three-term recurrence: the least memory, about twice the products of
            one run, at the same tolerance), an int ``>= 4`` (thick restarts in that many
            vectors: that many copies more, fewer products), or ``None`` (one unrestarted run
            keeping up to ``max_iters`` vectors for all k at once: fewest products).
        tol: relative residual tolerance of every eigenvalue (default 1e-3).
        trace: measure the trace (and the per-layer traces).
        trace_rtol: standard error, relative to the trace, that stops Hutchinson (default 0.02).
        trace_max_samples: most Hutchinson probes (default 100).
        density: measure the spectral density.
        density_starts: SLQ random starts (default 2: two give a spread to judge it by).
        density_steps: Lanczos steps per start (default 50: the quadrature is exact for
            moments up to 99 and resolves the bulk finer than more, shorter runs;
            ``benchmarks/hessian_vs_pyhessian.py`` compares).
        density_bins: histogram bins (default 32).
        density_sigma: Gaussian smoothing width relative to the spectrum's range (default 0.01).
        density_reorth: reorthogonalise the density's Lanczos runs (default ``False``: three
            vectors of memory; without it converged eigenvalues get ghost copies but the
            quadrature's moments, hence the histogram's mass, stay accurate; ``True`` keeps
            ``density_steps`` vectors).
        per_layer: measure each layer's diagonal block.
        layers: which layers (module names or types, as ``ICSCallback``'s ``layers``); ``None``
            for its default rule.
        preconditioned: measure the preconditioned sharpness and threshold (SGD, RMSprop, Adam,
            AdamW; another optimiser gets a warning at the first measurement and no such keys).
        %(loss_fn)s
        %(hvp_method)s
        seed: seed of the callback's own generator (the global RNG is never used).
        %(budget)s
        %(name)s

    Raises:
        %(raises)s
        ValueError: at setup, a ``layers`` entry that matches nothing.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[HessianCallback(top_k=2)])  # doctest: +SKIP
    """

    key_base = "hessian"
    logged_keys = LoggedKeys(
        prefix="hessian/",
        keys=(
            LoggedKey("hessian/eig_converged", "min"),
            *peak_memory_keys("hessian"),
            LoggedKey("hessian/eig_iters", "max"),
            LoggedKey("hessian/eig_*", "max"),
            LoggedKey("hessian/trace", "max"),
            LoggedKey("hessian/trace_stderr", "max"),
            LoggedKey("hessian/trace_converged", "min"),
            LoggedKey("hessian/trace_samples", "max"),
            LoggedKey("hessian/precond_eig_max", "max"),
            LoggedKey("hessian/precond_converged", "min"),
            LoggedKey("hessian/stability_threshold", "last"),
            LoggedKey("hessian/density/*", "none"),
            LoggedKey("hessian/{layer}/trace", "max"),
            LoggedKey("hessian/{layer}/trace_stderr", "max"),
            LoggedKey("hessian/{layer}/eig_max", "max"),
            LoggedKey("hessian/{layer}/eig_converged", "min"),
        ),
        panels=(
            Panel(
                "panels/hessian_top_k",
                "Largest Hessian eigenvalues λ_1 ≥ λ_2 ≥ …",
                tuple((f"hessian/eig_{i}", f"λ_{i}") for i in range(1, 11)),
                "λ_i(H)",
                caption="The k largest eigenvalues of the training-loss Hessian at each measured"
                " step (Lanczos, each within tol of an eigenvalue by its residual).",
                source="hessian/eig_1 … eig_k (HessianCallback)",
                order=100,
            ),
            Panel(
                "panels/hessian_trace",
                "Hessian trace (Hutchinson)",
                (("hessian/trace", "tr H"),),
                "tr(H)",
                caption="The trace of the training-loss Hessian, Hutchinson's estimate deflated"
                " by the top eigenvectors (its standard error is hessian/trace_stderr).",
                source="hessian/trace (HessianCallback, trace=True)",
                order=110,
            ),
            Panel(
                "panels/edge_of_stability",
                "Preconditioned sharpness against the optimiser's stability threshold",
                (
                    ("hessian/precond_eig_max", "λ_max(P^-1/2 H P^-1/2)"),
                    ("hessian/stability_threshold", "threshold (2/η SGD, 38/η Adam)"),
                ),
                "sharpness",
                caption="The edge-of-stability picture: the top eigenvalue of the"
                " optimiser-preconditioned Hessian (P = I for SGD) and the threshold above"
                " which the optimiser's quadratic model diverges.",
                source="hessian/precond_eig_max and stability_threshold (HessianCallback)",
                order=120,
            ),
            Panel(
                "panels/hessian_layer_trace",
                "Hessian trace of each layer's diagonal block",
                (("hessian/{layer}/trace", "{layer}"),),
                "tr(H_ii)",
                caption="The trace of each layer's diagonal Hessian block (same probes as the"
                " whole trace).",
                source="hessian/<layer>/trace (HessianCallback, per_layer=True)",
                order=130,
            ),
            Panel(
                "panels/hessian_layer_eig",
                "Top eigenvalue of each layer's diagonal Hessian block",
                (("hessian/{layer}/eig_max", "{layer}"),),
                "λ_max(H_ii)",
                caption="The largest eigenvalue of each layer's diagonal Hessian block.",
                source="hessian/<layer>/eig_max (HessianCallback, per_layer=True)",
                order=140,
            ),
            Panel(
                "panels/hessian_density",
                "Hessian eigenvalue density over training (stochastic Lanczos quadrature)",
                (("hessian/density/*", "density"),),
                "eigenvalue",
                caption="The Hessian's eigenvalue density at each measured step (colour: the"
                " share of eigenvalues in each bin between hessian/density/lo and hi).",
                source="hessian/density/lo, hi, bin_<j> (HessianCallback, density=True)",
                order=150,
                kind="density",
            ),
        ),
    )

    def __init__(
        self,
        every_n_steps: int | Literal["auto"] = "auto",
        top_k: int = 3,
        max_iters: int = 300,
        lanczos_basis: int | None = 0,
        tol: float = 1e-3,
        trace: bool = True,
        trace_rtol: float = 0.02,
        trace_max_samples: int = 100,
        density: bool = True,
        density_starts: int = 2,
        density_steps: int = 50,
        density_bins: int = 32,
        density_sigma: float = 0.01,
        density_reorth: bool = False,
        per_layer: bool = True,
        layers: Sequence[str | type[nn.Module]] | None = None,
        preconditioned: bool = True,
        loss_fn: LossFn | None = None,
        hvp_method: str = "reverse",
        seed: int = 0,
        budget: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(every_n_steps, loss_fn, budget, name)
        self.settings = HessianSettings(  # checks every argument
            top_k=top_k,
            max_iters=max_iters,
            lanczos_basis=lanczos_basis,
            tol=tol,
            trace=trace,
            trace_rtol=trace_rtol,
            trace_max_samples=trace_max_samples,
            density=density,
            density_starts=density_starts,
            density_steps=density_steps,
            density_bins=density_bins,
            density_sigma=density_sigma,
            density_reorth=density_reorth,
            per_layer=per_layer,
            preconditioned=preconditioned,
            hvp_method=hvp_method,
        )
        self.layers = check_selection("layers", layers, nn.Module)
        self.seed = check_int("seed", seed, minimum=0, maximum=2**63 - 1)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.state = HessianState()
        self._layer_params: dict[str, list[str]] = {}
        self._precond_ok = True

    def _settings(self) -> dict[str, Any]:
        layers = None if self.layers is None else [getattr(s, "__name__", s) for s in self.layers]
        return {
            **super()._settings(),
            **vars(self.settings),
            "layers": layers,
            "seed": self.seed,
        }

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.settings.per_layer:
            self._layer_params = module_layers(pl_module, self.layers)

    def measurement_steps(self) -> float:
        """About two passes per Hessian-vector product, at the low end of the counts above: 60
        for the top eigenvalues, 10 for the trace, the density's starts × steps, 20 per layer."""
        s = self.settings
        density = s.density_starts * s.density_steps if s.density else 0
        return 2.0 * (60 + 10 * s.trace + density + 20 * len(self._layer_params))

    def _compute(self, trainer: pl.Trainer, record: StepRecord) -> dict[str, float]:
        optimizer = self._optimizer(trainer)
        device = next(self.probe.module.parameters()).device
        # handed over, not shared: the measurement frees the old warm starts once read (a failed
        # measurement leaves a cold start for the next)
        state, self.state = self.state.to(device), HessianState()
        metrics, self.state = compute_hessian(
            self.probe,
            self.probe.parameters(copy=False),  # W^t, read in place: the step has not run yet
            record,
            self.settings,
            layers=self._layer_params,
            optimizer=optimizer,
            state=state,
            generator=self._generator,
            collective=self.collective,
        )
        return {f"{self.key_prefix}/{k}": v for k, v in metrics.items()}

    def _optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer | None:
        if not (self.settings.preconditioned and self._precond_ok and trainer.optimizers):
            return None
        optimizer = trainer.optimizers[0]
        try:
            stability_threshold(optimizer)
        except TypeError as exc:
            self._precond_ok = False
            rank_zero_warn(f"{type(self).__name__}: no preconditioned sharpness: {exc}")
            return None
        return optimizer

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        cpu = self.state.to("cpu")
        state["warm"] = {"top": cpu.top, "precond": cpu.precond}
        state["generator"] = self._generator.get_state()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        warm = state_dict.get("warm")
        if warm is not None:
            # an older checkpoint's per-layer "blocks" are not needed: blocks start from the top-k
            self.state = HessianState(list(warm.get("top", [])), list(warm.get("precond", [])))
        if state_dict.get("generator") is not None:
            self._generator.set_state(state_dict["generator"])
