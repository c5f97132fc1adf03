"""SmoothnessCallback: gradient predictiveness, effective β-smoothness, Hessian curvature (Fig. 4b-c)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_bn.callbacks.base import DiagnosticCallback, LossFn
from lightning_bn.callbacks.lipschitz import _current_lr, check_step_sizes
from lightning_bn.diagnostics.landscape import compute_smoothness, resolve_step_sizes
from lightning_bn.probe import Params

__all__ = ["SmoothnessCallback"]

_HVP_METHODS = ("reverse", "forward", "auto")


class SmoothnessCallback(DiagnosticCallback):
    r"""Measure how predictive the gradient is and how smooth the loss is, along the gradient.

    At a measured step t, on the step's batch (same dropout masks, batch statistics, nothing of
    the model or optimiser touched), with :math:`g_t = \nabla L(W^t)` and step sizes :math:`\eta`
    (default :math:`\mathrm{lr} \times \{0.5, 0.8, \dots, 3.8, 4.0\}`):

    .. math::
        d_\eta = \lVert g_t - \nabla L(W^t - \eta g_t) \rVert_2, \qquad
        \beta_t = \max_\eta \frac{d_\eta}{\lVert \eta g_t \rVert_2},

    (the paper's Fig. 4b draws the band of :math:`d_\eta`, Fig. 4c :math:`\beta_t`), and with
    ``hessian=True`` the dominant eigenvalue of the Hessian :math:`H = \nabla^2 L(W^t)` by power
    iteration on Hessian-vector products (warm-started from the previous measurement's
    eigenvector, kept in :meth:`state_dict`; it stops when the estimate changes by less than
    ``tol`` relative, or after ``power_iters`` products) and the curvature along the gradient
    :math:`g^\top H g / \lVert g\rVert^2`. Power iteration finds the eigenvalue of largest
    magnitude, logged with its sign.

    Cost of one measurement: one gradient per step size, plus with the Hessian one gradient pass
    that keeps its graph and one backward through it per Hessian-vector product (a warm start
    usually converges in a few). That is why the default ``every_n_steps`` is 500: at 100 the 13
    gradients and the products would add ~20% to a small model's training time; at 500 it stays
    within ~5% (``benchmarks/landscape_overhead.py`` prints the measured ratios).

    Logged metrics: ``smoothness/grad_diff_min``, ``smoothness/grad_diff_max``,
    ``smoothness/beta_eff``, ``smoothness/hessian_top_eig``, ``smoothness/hessian_iters``,
    ``smoothness/grad_curvature``.

    Args:
        every_n_steps: measure when ``global_step % every_n_steps == 0``.
        step_sizes: the grid; ``None`` for the default above.
        relative_to_lr: ``step_sizes`` are multiples of the current learning rate (else absolute).
        hessian: also compute the Hessian quantities.
        power_iters: most Hessian-vector products of one power iteration.
        tol: relative change of the eigenvalue estimate that stops the power iteration.
        loss_fn: ``loss_fn(module, batch) -> Tensor``; default the module's ``training_step``.
        hvp_method: ``"reverse"`` (default: reverse-over-reverse on a kept first-order graph, the
            fastest here), ``"auto"`` (``torch.func`` forward-over-reverse with a
            reverse-over-reverse fallback) or ``"forward"``.
        seed: seed of the callback's own generator for the cold start (the global RNG is never
            used).

    Raises:
        ValueError: bad arguments; at setup, manual optimisation or gradient accumulation.
        NotImplementedError: at setup, a strategy that shards parameters.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[SmoothnessCallback(every_n_steps=500)])  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        step_sizes: Sequence[float] | None = None,
        relative_to_lr: bool = True,
        hessian: bool = True,
        power_iters: int = 20,
        tol: float = 1e-3,
        loss_fn: LossFn | None = None,
        hvp_method: str = "reverse",
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, loss_fn=loss_fn)
        self.step_sizes = check_step_sizes(step_sizes)
        self.relative_to_lr = bool(relative_to_lr)
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(
                f"Expected argument `power_iters` to be a positive integer, but got {power_iters!r}"
            )
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise ValueError(f"Expected argument `tol` to be a finite number >= 0, but got {tol!r}")
        if hvp_method not in _HVP_METHODS:
            raise ValueError(
                f"Expected argument `hvp_method` to be one of {', '.join(map(repr, _HVP_METHODS))},"
                f" but got {hvp_method!r}"
            )
        self.hessian = bool(hessian)
        self.power_iters = power_iters
        self.tol = float(tol)
        self.hvp_method = hvp_method
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.eigenvector: Params | None = None

    def _settings(self) -> dict[str, Any]:
        return {
            **super()._settings(),
            "step_sizes": self.step_sizes,
            "relative_to_lr": self.relative_to_lr,
            "hessian": self.hessian,
            "power_iters": self.power_iters,
            "tol": self.tol,
            "hvp_method": self.hvp_method,
            "seed": self.seed,
        }

    def _compute(self, trainer: pl.Trainer, pending: Mapping[str, Any]) -> dict[str, float]:
        etas = resolve_step_sizes(_current_lr(trainer), self.step_sizes, self.relative_to_lr)
        result = compute_smoothness(
            self.probe,
            self.probe.parameters(),
            pending["batch"],
            pending["batch_idx"],
            pending["rng"],
            etas,
            hessian=self.hessian,
            power_iters=self.power_iters,
            tol=self.tol,
            init=self.eigenvector,
            generator=self._generator,
            hvp_method=self.hvp_method,
            collective=self.collective,
        )
        if result.eigenvector is not None:
            self.eigenvector = {k: v.detach().clone() for k, v in result.eigenvector.items()}
        return {f"smoothness/{k}": v for k, v in result.metrics.items()}

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["eigenvector"] = (
            {k: v.cpu() for k, v in self.eigenvector.items()} if self.eigenvector else None
        )
        state["generator"] = self._generator.get_state()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.eigenvector = state_dict.get("eigenvector")
        if state_dict.get("generator") is not None:
            self._generator.set_state(state_dict["generator"])
