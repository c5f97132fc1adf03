"""Lightning callbacks: thin wiring around the plain-torch diagnostics."""

from lightning_bn.callbacks.base import BatchPreparer, DiagnosticCallback
from lightning_bn.callbacks.hessian import HessianCallback
from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.noise_injection import DEFAULT_NOISE_TARGETS, NoiseInjectionCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.errors import DiagnosticWarning
from lightning_bn.logging.keys import Panel, panels, summaries

#: The paper's charts: the panels the built-in callbacks declare, in the order they are drawn
#: (the W&B charts and the figures of ``lightning-bn plot`` also draw those of any other
#: callback class defined later; see :func:`lightning_bn.logging.keys.panels`).
PAPER_PANELS: tuple[Panel, ...] = panels()

#: W&B summary per key glob of the built-in callbacks (see
#: :func:`lightning_bn.logging.keys.summaries`).
PAPER_SUMMARIES: dict[str, str] = summaries()

__all__ = [
    "DEFAULT_NOISE_TARGETS",
    "PAPER_PANELS",
    "PAPER_SUMMARIES",
    "BatchPreparer",
    "DiagnosticCallback",
    "DiagnosticWarning",
    "HessianCallback",
    "ICSCallback",
    "LipschitzCallback",
    "NoiseInjectionCallback",
    "SmoothnessCallback",
]
