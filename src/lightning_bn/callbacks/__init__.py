"""Lightning callbacks: thin wiring around the plain-torch diagnostics."""

from lightning_bn.callbacks.base import BatchPreparer, DiagnosticCallback, DiagnosticWarning
from lightning_bn.callbacks.hessian import HessianCallback
from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.noise_injection import DEFAULT_NOISE_TARGETS, NoiseInjectionCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback

__all__ = [
    "DEFAULT_NOISE_TARGETS",
    "BatchPreparer",
    "DiagnosticCallback",
    "DiagnosticWarning",
    "HessianCallback",
    "ICSCallback",
    "LipschitzCallback",
    "NoiseInjectionCallback",
    "SmoothnessCallback",
]
