"""lightning-bn: the experiments of "How Does Batch Normalization Help Optimization?" as Lightning tools."""

from __future__ import annotations

from typing import Any

# The W&B extras of the diagnostic callbacks register themselves on import (the callbacks'
# base knows no logger by name); any submodule import runs this file first.
from lightning_bn import wandb_panels as _wandb_panels  # noqa: F401
from lightning_bn.callbacks import (
    DiagnosticWarning,
    HessianCallback,
    ICSCallback,
    LipschitzCallback,
    NoiseInjectionCallback,
    SmoothnessCallback,
)
from lightning_bn.callbacks.swa import StochasticWeightAveraging
from lightning_bn.convert import swap_norm_layers
from lightning_bn.layers import (
    BatchNorm,
    L1Norm,
    L2Norm,
    LayerNorm,
    LinfNorm,
    LpNorm,
    create_norm_layer,
)
from lightning_bn.layers.stats import update_norm_stats
from lightning_bn.plugins import SyncNorm
from lightning_bn.probe import in_probe

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # plot_runs needs matplotlib, an optional dependency: imported on first use only.
    if name == "plot_runs":
        from lightning_bn.run_figures import plot_runs

        return plot_runs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchNorm",
    "DiagnosticWarning",
    "HessianCallback",
    "ICSCallback",
    "L1Norm",
    "L2Norm",
    "LayerNorm",
    "LinfNorm",
    "LipschitzCallback",
    "LpNorm",
    "NoiseInjectionCallback",
    "SmoothnessCallback",
    "StochasticWeightAveraging",
    "SyncNorm",
    "__version__",
    "create_norm_layer",
    "in_probe",
    "plot_runs",
    "swap_norm_layers",
    "update_norm_stats",
]
