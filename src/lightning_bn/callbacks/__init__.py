"""Lightning callbacks: thin wiring around the plain-torch diagnostics."""

from lightning_bn.callbacks.base import DiagnosticCallback, DiagnosticWarning
from lightning_bn.callbacks.ics import ICSCallback

__all__ = ["DiagnosticCallback", "DiagnosticWarning", "ICSCallback"]
