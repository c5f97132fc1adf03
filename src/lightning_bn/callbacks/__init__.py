"""Lightning callbacks: thin wiring around the plain-torch diagnostics."""

from lightning_bn.callbacks.base import BatchPreparer, DiagnosticCallback
from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.noise_injection import DEFAULT_NOISE_TARGETS, NoiseInjectionCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.errors import DiagnosticWarning

__all__ = [
    "DEFAULT_NOISE_TARGETS",
    "BatchPreparer",
    "DiagnosticCallback",
    "DiagnosticWarning",
    "ICSCallback",
    "LipschitzCallback",
    "NoiseInjectionCallback",
    "SmoothnessCallback",
]
