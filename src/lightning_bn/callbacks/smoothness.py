"""SmoothnessCallback: gradient predictiveness, effective β-smoothness, Hessian curvature (Fig. 4b-c)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_bn._types import LossFn
from lightning_bn._validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
)
from lightning_bn.callbacks._docs import fill_doc
from lightning_bn.callbacks._guards import drop_empty_grid
from lightning_bn.callbacks.along_gradient import AlongGradientCallback
from lightning_bn.diagnostics.landscape import (
    compute_smoothness,
    resolve_max_iters,
)
from lightning_bn.diagnostics.restart import check_basis_size
from lightning_bn.logging.keys import LoggedKey, LoggedKeys, Panel, peak_memory_keys
from lightning_bn.probe import Params, StepRecord
from lightning_bn.probe.batched import VmapChunkSize

__all__ = ["SmoothnessCallback"]

_HVP_METHODS = ("reverse", "forward", "auto")
_EIG_ALGORITHMS = ("power", "lanczos")
#: Lanczos steps without a basis assumed in the a-priori cost (``measurement_steps``): 19
#: products, where ``benchmarks/cost_table.py`` measured a mean of 15.4 on the digits MLP and
#: 18.2 on the 13-conv ResNet.
_TWO_PASS_STEPS = 10


@fill_doc
class SmoothnessCallback(AlongGradientCallback):
    r"""Measure how predictive the gradient is and how smooth the loss is, along the gradient.

    At a measured step t, on the step's batch (same dropout masks, batch statistics, nothing of
    the model or optimiser touched), with :math:`g_t = \nabla L(W^t)` and step sizes :math:`\eta`
    (default :math:`\mathrm{lr} \times \{0.5, 0.8, \dots, 3.8, 4.0\}`; with several optimiser
    parameter groups a relative step c moves each group by
    :math:`c \times \mathrm{lr}_\text{group} \times g_\text{group}` and :math:`\lVert \eta g_t
    \rVert_2` below is the length of that move):

    .. math::
        d_\eta = \lVert g_t - \nabla L(W^t - \eta g_t) \rVert_2, \qquad
        \beta_t = \max_\eta \frac{d_\eta}{\lVert \eta g_t \rVert_2},

    (the paper's Fig. 4b draws the band of :math:`d_\eta`, Fig. 4c :math:`\beta_t`), and with
    ``hessian=True`` the dominant eigenvalue of the Hessian :math:`H = \nabla^2 L(W^t)` from
    Hessian-vector products (warm-started from the previous measurement's eigenvector, kept in
    :meth:`state_dict`; it stops when the estimate changes by less than ``tol`` relative, or after
    ``max_iters`` products) and the curvature along the gradient
    :math:`g^\top H g / \lVert g\rVert^2`. The eigenvalue is the one of largest magnitude,
    logged with its sign (:math:`|\lambda| = \lVert H\rVert_2`, the local β-smoothness).

    How the eigenvalue is found (``eig_algorithm``): ``"power"`` is power iteration (as in
    PyHessian), two vectors of memory. The default, here and in
    :func:`~lightning_bn.diagnostics.landscape.compute_smoothness`, is ``"lanczos"`` (the Ritz
    value of largest magnitude; see :func:`~lightning_bn.diagnostics.eigen.top_hessian_eigenvalue`):
    it estimates the same quantity and, at the same ``tol``, needs fewer Hessian-vector products
    and lands closer to the exact value, warm or cold (``benchmarks/hessian_vs_pyhessian.py``
    measures both). By default (``lanczos_basis=0``) it keeps no basis: the three-term
    recurrence runs twice, the second time to sum the eigenvector, so its memory is three vectors
    besides the product's own (one of them the previous eigenvector's memory) at any number of
    products, for :math:`2m - 1` products where a stored, fully reorthogonalised basis takes
    :math:`m`.

    Cost of one measurement: one gradient per step size, plus with the Hessian one gradient pass
    that keeps its graph and one backward through it per Hessian-vector product (a warm start
    usually converges in a few). At a fixed 100 the 13 gradients and the products would add ~20% to
    a small model's training time, so the default ``every_n_steps="auto"`` times the first
    measurement and spaces the next ones within the Trainer's shared ``budget``
    (``benchmarks/cost_table.py`` prints the cost in training steps).

    Logged metrics: ``smoothness/grad_diff_min``, ``smoothness/grad_diff_max``,
    ``smoothness/beta_eff``, ``smoothness/hessian_top_eig``, ``smoothness/hessian_iters``,
    ``smoothness/hessian_converged`` (1.0 if the eigenvalue met ``tol`` within ``max_iters``),
    ``smoothness/grad_curvature``.

    Args:
        %(every_n_steps)s
        %(budget)s
        %(step_sizes)s
        hessian: also compute the Hessian quantities.
        max_iters: most Hessian-vector products of one eigenvalue estimate (either algorithm;
            with ``lanczos_basis=None`` also the most parameter-sized vectors Lanczos keeps);
            default 40: twenty Lanczos steps without a basis (each but the last costs two
            products). On the first five steps of an 8.7M-parameter BatchNorm MLP the
            measurements took 21-37 products and all converged (with ``lanczos_basis=5`` and a
            cap of 20, two of the five stopped unconverged).
        tol: relative change of the eigenvalue estimate that stops the iteration.
        %(loss_fn)s
        %(hvp_method)s
        seed: seed of the callback's own generator for the cold start (the global RNG is never
            used).
        eig_algorithm: ``"lanczos"`` (default: fewer products and a closer value; memory set by
            ``lanczos_basis``) or ``"power"`` (power iteration; two vectors of memory). See
            above.
        lanczos_basis: most Lanczos vectors kept (0 or ``>= 2``; restarted beyond; ``None``: up
            to ``max_iters``). Default 0: no basis, the three-term recurrence run twice (the
            value of Lanczos with a full basis, in twice its products less one), so a fit
            measuring at every step peaks 7.3-7.6 parameter copies above one without the
            callback (an 8.7M-parameter MLP, ``benchmarks/peak_memory.py``): the warm start's
            memory (the start, then the new eigenvector), the last two Lanczos vectors, the
            product, the gradient with its graph. A basis of ``k`` vectors costs about ``k - 3``
            copies more and takes fewer products (on that MLP 14-20 a measurement with 5,
            against 21-37; thick restarts, within 0.4% of the exact eigenvalue on two BatchNorm
            MLPs; 8: 0.2%; 4: 1.4%).
        power_iters: deprecated name of ``max_iters`` (a :class:`DeprecationWarning`); the
            attribute ``power_iters`` and the run-config key of that name remain as aliases.
        %(name)s
        vmap_chunk_size: how the grid is evaluated, as for :class:`LipschitzCallback`.

    Raises:
        %(raises)s

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[SmoothnessCallback(every_n_steps=500)])  # doctest: +SKIP
    """

    logged_keys = LoggedKeys(
        prefix="smoothness/",
        keys=(
            LoggedKey("smoothness/grad_diff_min", "min"),
            *peak_memory_keys("smoothness"),
            LoggedKey("smoothness/grad_diff_max", "max"),
            LoggedKey("smoothness/beta_eff", "max"),
            LoggedKey("smoothness/hessian_top_eig", "max"),
            LoggedKey("smoothness/grad_curvature", "max"),
            LoggedKey("smoothness/hessian_iters", "last"),
            LoggedKey("smoothness/hessian_converged", "min"),
        ),
        panels=(
            Panel(
                "panels/grad_predictiveness",
                "Gradient predictiveness: ‖∇L(x) − ∇L(x − η∇L(x))‖, min-max over η (Fig. 4b)",
                (
                    ("smoothness/grad_diff_min", "min over η"),
                    ("smoothness/grad_diff_max", "max over η"),
                ),
                "‖g − ∇L(W − ηg)‖, min to max over η",
                caption="Gradient predictiveness (Fig. 4b): the band of ‖g − ∇L(W − ηg)‖ over η;"
                " lower means the gradient stays predictive along a step.",
                source="smoothness/grad_diff_min and grad_diff_max (SmoothnessCallback)",
                order=20,
                kind="band",
            ),
            Panel(
                "panels/beta_smoothness",
                "Effective β-smoothness (Fig. 4c)",
                (("smoothness/beta_eff", "β_eff"),),
                "β_eff = max_η ‖g − ∇L(W − ηg)‖ / ‖ηg‖",
                caption="Effective β-smoothness (Fig. 4c): the largest ‖g − ∇L(W − ηg)‖ / ‖ηg‖"
                " over η; lower is smoother.",
                source="smoothness/beta_eff (SmoothnessCallback)",
                order=30,
            ),
            Panel(
                "panels/hessian_top_eig",
                "Top Hessian eigenvalue λ_max",
                (("smoothness/hessian_top_eig", "λ_max"),),
                "λ_max(H)",
                caption="Top eigenvalue of the loss Hessian, the sharpest curvature.",
                source="smoothness/hessian_top_eig (SmoothnessCallback, hessian=True)",
                order=80,
            ),
            Panel(
                "panels/grad_curvature",
                "Curvature along the gradient gᵀHg / ‖g‖²",
                (("smoothness/grad_curvature", "gᵀHg / ‖g‖²"),),
                "gᵀHg / ‖g‖²",
                caption="Curvature along the gradient, gᵀHg / ‖g‖² (the quadratic term of a"
                " gradient step, Theorem 4.2).",
                source="smoothness/grad_curvature (SmoothnessCallback, hessian=True)",
                order=90,
            ),
        ),
    )

    def __init__(
        self,
        every_n_steps: int | Literal["auto"] = "auto",
        step_sizes: Sequence[float] | None = None,
        relative_to_lr: bool = True,
        hessian: bool = True,
        max_iters: int | None = None,
        tol: float = 1e-3,
        loss_fn: LossFn | None = None,
        hvp_method: str = "reverse",
        seed: int = 0,
        eig_algorithm: str = "lanczos",
        power_iters: int | None = None,
        budget: float | None = None,
        name: str | None = None,
        vmap_chunk_size: VmapChunkSize = "auto",
        lanczos_basis: int | None = 0,
    ) -> None:
        super().__init__(
            every_n_steps, step_sizes, relative_to_lr, loss_fn, budget, name, vmap_chunk_size
        )
        self.lanczos_basis = (
            None if lanczos_basis is None else check_basis_size("lanczos_basis", lanczos_basis, 2)
        )
        self.max_iters = resolve_max_iters(max_iters, power_iters, default=40)
        self.tol = check_float("tol", tol, minimum=0)
        self.hvp_method = check_choice("hvp_method", hvp_method, _HVP_METHODS)
        self.eig_algorithm = check_choice("eig_algorithm", eig_algorithm, _EIG_ALGORITHMS)
        self.hessian = check_bool("hessian", hessian)
        self.seed = check_int("seed", seed, minimum=0, maximum=2**63 - 1)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.eigenvector: Params | None = None

    key_base = "smoothness"

    def measurement_steps(self) -> float:
        """A gradient at :math:`W^t` and at each step size; with ``hessian``, about two passes per
        Hessian-vector product: a Lanczos basis's worth (warm starts converge within about one;
        without a basis, ten Lanczos steps, which cost 19 products) and one for
        :math:`g^\top H g`."""
        if self.lanczos_basis == 0:
            lanczos = min(2 * _TWO_PASS_STEPS - 1, self.max_iters)
        else:
            lanczos = self.lanczos_basis or self.max_iters  # None: up to max_iters vectors
        products = lanczos + 1 if self.hessian else 0
        return 1.0 + self.grid_size + 2.0 * products

    def _settings(self) -> dict[str, Any]:
        return {
            **super()._settings(),
            "hessian": self.hessian,
            "max_iters": self.max_iters,
            "power_iters": self.max_iters,  # the key's name before `max_iters` (stable config)
            "tol": self.tol,
            "hvp_method": self.hvp_method,
            "eig_algorithm": self.eig_algorithm,
            "lanczos_basis": self.lanczos_basis,
            "seed": self.seed,
        }

    @property
    def power_iters(self) -> int:
        """Deprecated alias of :attr:`max_iters`."""
        return self.max_iters

    def _compute(self, trainer: pl.Trainer, record: StepRecord) -> dict[str, float]:
        etas, scales = self._steps(trainer)
        # the warm start's memory becomes Lanczos's working vector (kept only if this succeeds)
        init, self.eigenvector = self.eigenvector, None
        result = compute_smoothness(
            self.probe,
            self.probe.parameters(copy=False),  # W^t: the step has not run yet
            record,
            etas,
            hessian=self.hessian,
            max_iters=self.max_iters,
            tol=self.tol,
            init=init,
            generator=self._generator,
            hvp_method=self.hvp_method,
            eig_algorithm=self.eig_algorithm,
            collective=self.collective,
            scales=scales,
            basis_size=self.lanczos_basis,
            reuse_init=True,
        )
        self.eigenvector = result.eigenvector  # its own memory, no view of the model's
        metrics = {f"{self.key_prefix}/{k}": v for k, v in result.metrics.items()}
        grid = ("grad_diff_min", "grad_diff_max", "beta_eff")
        kept, self._empty_grid_warned = drop_empty_grid(
            self, metrics, etas, scales, grid, record.step, self._empty_grid_warned
        )
        return kept

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
