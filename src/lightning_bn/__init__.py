"""lightning-bn: the experiments of "How Does Batch Normalization Help Optimization?" as Lightning tools.

The names below are imported on first use, so that ``import lightning_bn.layers``,
``lightning_bn.probe`` or ``lightning_bn.diagnostics`` (plain torch) load neither Lightning nor
W&B; ``from lightning_bn import ICSCallback`` loads the callbacks (and Lightning) then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_bn import _deprecated
from lightning_bn._version import __version__

#: Public name -> the module it is defined in.
_EXPORTS: dict[str, str] = {
    "BatchNorm": "lightning_bn.layers",
    "DiagnosticWarning": "lightning_bn.errors",
    "HessianCallback": "lightning_bn.callbacks",
    "ICSCallback": "lightning_bn.callbacks",
    "L1Norm": "lightning_bn.layers",
    "L2Norm": "lightning_bn.layers",
    "LayerNorm": "lightning_bn.layers",
    "LinfNorm": "lightning_bn.layers",
    "LipschitzCallback": "lightning_bn.callbacks",
    "LpNorm": "lightning_bn.layers",
    "NoiseInjectionCallback": "lightning_bn.callbacks",
    "SmoothnessCallback": "lightning_bn.callbacks",
    "StochasticWeightAveraging": "lightning_bn.callbacks.swa",
    "SyncNorm": "lightning_bn.plugins",
    "create_norm_layer": "lightning_bn.layers",
    "in_probe": "lightning_bn.probe",
    "plot_runs": "lightning_bn.plot.run_figures",  # needs matplotlib, an optional dependency
    "swap_norm_layers": "lightning_bn.layers",
    "update_norm_stats": "lightning_bn.layers.stats",
}

_deprecated.install()

if TYPE_CHECKING:
    from lightning_bn.callbacks import (
        HessianCallback,
        ICSCallback,
        LipschitzCallback,
        NoiseInjectionCallback,
        SmoothnessCallback,
    )
    from lightning_bn.callbacks.swa import StochasticWeightAveraging
    from lightning_bn.errors import DiagnosticWarning
    from lightning_bn.layers import (
        BatchNorm,
        L1Norm,
        L2Norm,
        LayerNorm,
        LinfNorm,
        LpNorm,
        create_norm_layer,
        swap_norm_layers,
    )
    from lightning_bn.layers.stats import update_norm_stats
    from lightning_bn.plot.run_figures import plot_runs
    from lightning_bn.plugins import SyncNorm
    from lightning_bn.probe import in_probe


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
