"""ICSCallback: gradient-based internal covariate shift (Santurkar et al. 2018, Def. 2.1)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn

from lightning_bn._validation import check_bool, check_selection
from lightning_bn.callbacks._docs import fill_doc
from lightning_bn.callbacks.base import DiagnosticCallback, LossFn
from lightning_bn.diagnostics.ics import ICSLayer, compute_ics, measured_layers, warn_left_out
from lightning_bn.errors import DiagnosticWarning
from lightning_bn.layers.selection import describe_modules
from lightning_bn.logging.keys import LoggedKey, LoggedKeys, Panel, peak_memory_keys
from lightning_bn.probe import StepRecord
from lightning_bn.probe.batched import VmapChunkSize

__all__ = ["ICSCallback"]


@fill_doc
class ICSCallback(DiagnosticCallback):
    r"""Measure internal covariate shift, as the paper defines it, on any LightningModule.

    For each layer i and a measured step t, with :math:`W^t` the weights before and
    :math:`W^{t+1}` the weights after the real optimiser step (whatever the optimiser, scheduler,
    weight decay or clipping):

    .. math::
        G_{t,i} = \nabla_{W_i} L(W^t_1, \dots, W^t_k;\ x^t, y^t), \qquad
        G'_{t,i} = \nabla_{W_i} L(W^{t+1}_1, \dots, W^{t+1}_{i-1}, W^t_i, \dots, W^t_k;\ x^t, y^t).

    What a layer is: a group of trainable parameters, by default those owned directly by one
    module, for every submodule that owns a trainable parameter of rank ≥ 2 and is not a
    normalisation layer (``Linear``, ``Conv*``, ``Embedding``, ``nn.MultiheadAttention``'s
    ``in_proj_weight``/``in_proj_bias`` under the attention module and its ``out_proj`` as a
    layer of its own, Hugging Face's ``Conv1D``, custom modules using their weight
    functionally). Layers are ordered by the forward pass's first *use* of their parameters
    (traced once per layout, not by which module's ``forward`` ran), and "earlier than layer i"
    is every trainable parameter first used before layer i's, norm-layer γ, β included: those
    are at :math:`W^{t+1}` in :math:`G'`, layer i and everything after it at :math:`W^t`. A
    parameter shared by several modules (tied embedding and output weights) is measured once,
    in the layer of the module holding its last alias (the output layer), at its last use
    (:mod:`lightning_bn.diagnostics.tied`). Trainable parameters no layer holds (those of
    normalisation layers, biases of modules without a weight matrix, the root's own) are named
    in one warning at setup. Both gradients use
    a private copy of the step's batch, its dropout masks (the RNG state is replayed), the
    step's ``global_step``, and batch statistics, without touching running statistics,
    ``.grad`` or the optimiser: a run with this callback ends with the same weights, bit for
    bit, as one without it.

    Logged metrics (``<layer>`` is the qualified name of the module owning the layer's
    parameters), at the measured step:

    - ``ics/<layer>/l2``: :math:`\|G_{t,i} - G'_{t,i}\|_2` over the layer's trainable parameters
      (ideal 0, the paper's Fig. 3 plots it);
    - ``ics/<layer>/cos``: :math:`\cos(G_{t,i}, G'_{t,i})` (ideal 1);
    - ``ics/<layer>/l2_rel``: :math:`\|G_{t,i} - G'_{t,i}\|_2 / \|G_{t,i}\|_2`;
    - ``ics/<layer>/mean_shift``, ``ics/<layer>/std_shift``: the mean over the layer's input units
      (features of a Linear, channels of a convolution) of the absolute change of the unit's
      batch mean and population standard deviation between the two passes (Ioffe's notion);
    - ``ics/<layer>/emd``: the mean over units of the earth mover's (Wasserstein-1) distance
      between the unit's input values over the batch at the two parameter points, i.e. the mean
      absolute difference of the sorted values (Huang & Yu 2020).

    The three input shifts need the layer's input, the first positional argument of its
    module's ``forward``: they are logged for layers whose ``forward`` runs with a
    floating-point tensor first, not for a layer whose parameters are used without its
    ``forward`` (MHA's ``out_proj``) nor for an embedding (integer inputs).

    Cost: k measured layers take k gradient evaluations (one pass gives every :math:`G`; each other
    :math:`G'` takes one pass whose backward stops at its layer) plus a copy of the weights. The
    default ``every_n_steps="auto"`` times every measurement and spaces them within the Trainer's
    shared ``budget`` (``benchmarks/cost_table.py`` prints the cost in training
    steps, ``benchmarks/ics_overhead.py`` the measured ratio at a fixed interval).

    In DDP the gradients are averaged over ranks before any norm, and the inputs gathered, so the
    values equal those of one process on the union of the ranks' batches (except through per-rank
    BatchNorm statistics, which make the networks themselves differ).

    Args:
        %(every_n_steps)s
        %(budget)s
        layers: module names (globs such as ``"features.*"``) or module types; each selected
            module is measured with the trainable parameters of its subtree (a parameter under
            the deepest selected module holding it). Default: the rule above.
        %(loss_fn)s
        distributional: also log the input shifts (``mean_shift``, ``std_shift``, ``emd``).
        name: tells several ICSCallbacks in one Trainer apart: keys ``ics@<name>/<layer>/...``.
            Unnamed ones on different layers log ``ics/...``; unnamed ones that share a layer
            get ``ics@1/...``, ``ics@2/...`` (in the Trainer's callback order).
        vmap_chunk_size: how the G′ passes are evaluated (:mod:`lightning_bn.probe.batched`):
            ``"auto"`` (default) under :func:`torch.func.vmap` on CUDA, one by one elsewhere;
            ``None`` always one by one; an ``int``, under ``vmap`` with at most that many
            passes per call (each a full backward). The values are the same (to float rounding).

    Raises:
        %(raises)s
        ValueError: at setup, a ``layers`` entry matching no module or only modules without
            trainable parameters (a ``ReLU``), or no layer to measure (the message lists the
            model's modules).

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[ICSCallback(every_n_steps=50)])  # doctest: +SKIP
    """

    measure_after_step = True

    logged_keys = LoggedKeys(
        prefix="ics/",
        # larger l2 / smaller cosine = more shift: W&B keeps the worst value of the run
        keys=(
            *peak_memory_keys("ics"),
            LoggedKey("ics/{layer}/l2", "max"),
            LoggedKey("ics/{layer}/l2_rel", "max"),
            LoggedKey("ics/{layer}/cos", "min"),
            LoggedKey("ics/{layer}/mean_shift", "max"),
            LoggedKey("ics/{layer}/std_shift", "max"),
            LoggedKey("ics/{layer}/emd", "max"),
        ),
        panels=(
            Panel(
                "panels/ics_l2",
                "Internal covariate shift: ‖G − G′‖₂ per layer (Fig. 3)",
                (("ics/{layer}/l2", "{layer}"),),
                "‖G − G′‖₂ (ideal 0)",
                caption="Internal covariate shift (Fig. 3): ‖G − G′‖₂ per layer, the change of a"
                " layer's gradient caused by the updates of the layers before it (ideal 0).",
                source="ics/<layer>/l2 (ICSCallback)",
                order=40,
            ),
            Panel(
                "panels/ics_cos",
                "Internal covariate shift: cos(G, G′) per layer (Fig. 3)",
                (("ics/{layer}/cos", "{layer}"),),
                "cos(G, G′) (ideal 1)",
                caption="Internal covariate shift (Fig. 3): cos(G, G′) per layer (ideal 1).",
                source="ics/<layer>/cos (ICSCallback)",
                order=50,
            ),
        ),
    )
    key_base = "ics"

    def __init__(
        self,
        every_n_steps: int | Literal["auto"] = "auto",
        layers: Sequence[str | type[nn.Module]] | None = None,
        loss_fn: LossFn | None = None,
        distributional: bool = True,
        budget: float | None = None,
        name: str | None = None,
        vmap_chunk_size: VmapChunkSize = "auto",
    ) -> None:
        super().__init__(every_n_steps, loss_fn, budget, name, vmap_chunk_size)
        layers = check_selection("layers", layers, nn.Module)
        self.layers = layers
        self.distributional = check_bool("distributional", distributional)
        self._layers: list[ICSLayer] = []

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = measured_layers(pl_module, self.layers)
        if not self._layers:
            raise ValueError(
                f"ICSCallback found no layer to measure in {type(pl_module).__name__}: by default"
                " a layer is a submodule that directly owns a trainable parameter of rank >= 2 and"
                " is not a normalisation layer, and there is none. The model contains:"
                f" {describe_modules(pl_module)}. Choose modules with trainable parameters by"
                " name or type, e.g. `ICSCallback(layers=['encoder.*', torch.nn.Linear])`"
            )
        warn_left_out(pl_module, self._layers)

    def measurement_steps(self) -> float:
        """One forward and backward pass per measured layer (one gives every :math:`G`, each
        :math:`G'` one more, whose backward stops at its layer)."""
        return float(max(1, len(self._layers)))

    def _key_scope(self, pl_module: pl.LightningModule) -> set[str]:
        try:
            return {layer.name for layer in measured_layers(pl_module, self.layers)}
        except ValueError:  # a glob that matches nothing: this callback's own setup says so
            return set()

    def _settings(self) -> dict[str, Any]:
        layers = None if self.layers is None else [getattr(s, "__name__", s) for s in self.layers]
        return {**super()._settings(), "layers": layers, "distributional": self.distributional}

    def _compute(self, trainer: pl.Trainer, record: StepRecord) -> dict[str, float]:
        assert record.before is not None  # measure_after_step: the base kept W^t
        self._rederive_layers(record.step)
        results = compute_ics(
            self.probe,
            self._layers,
            record.before,
            self.probe.parameters(copy=False),  # W^{t+1}: nothing changes it while measuring
            record,
            collective=self.collective,
            distributional=self.distributional,
        )
        return {
            f"{self.key_prefix}/{layer}/{key}": value
            for layer, vals in results.items()
            for key, value in vals.items()
        }

    def _rederive_layers(self, step: int) -> None:
        """Resolve the layers again and say what changed since the last measurement: a submodule
        replaced (``model.block = NewBlock()``) is measured anew under its name, a layer frozen
        (no trainable parameter left) or removed leaves the set, so no layer's value silently
        takes in another's parameters."""
        current = measured_layers(self.probe.module, self.layers)
        before = {lay.name: lay for lay in self._layers}
        now = {lay.name: lay for lay in current}
        if [(n, id(lay.module), lay.params) for n, lay in before.items()] == [
            (n, id(lay.module), lay.params) for n, lay in now.items()
        ]:
            return
        changes = []
        for name, old in before.items():
            new = now.get(name)
            if new is None:
                changes.append(f"{name} left (frozen: no trainable parameter, or removed)")
            elif new.module is not old.module:
                changes.append(f"{name} was replaced by another module (measured anew)")
            elif new.params != old.params:
                changes.append(f"{name}'s trainable parameters changed (frozen or unfrozen)")
        changes += [f"{name} joined" for name in now if name not in before]
        warnings.warn(
            f"{type(self).__name__}: the measured layers changed before step {step}: "
            f"{'; '.join(changes)}. From this step it measures"
            f" {', '.join(now) or 'no layer'}; a layer that left logs no more values.",
            DiagnosticWarning,
            stacklevel=3,
        )
        self._layers = current
