"""lightning-bn: the experiments of "How Does Batch Normalization Help Optimization?" as Lightning tools."""

# The W&B extras of the diagnostic callbacks register themselves on import (the callbacks'
# base knows no logger by name); any submodule import runs this file first.
from lightning_bn import wandb_panels as _wandb_panels  # noqa: F401
from lightning_bn.callbacks import (
    DiagnosticWarning,
    ICSCallback,
    LipschitzCallback,
    NoiseInjectionCallback,
    SmoothnessCallback,
)
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
from lightning_bn.probe import in_probe

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "DiagnosticWarning",
    "ICSCallback",
    "L1Norm",
    "L2Norm",
    "LayerNorm",
    "LinfNorm",
    "LipschitzCallback",
    "LpNorm",
    "NoiseInjectionCallback",
    "SmoothnessCallback",
    "__version__",
    "create_norm_layer",
    "in_probe",
    "swap_norm_layers",
]
