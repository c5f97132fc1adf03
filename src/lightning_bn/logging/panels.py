"""A chart of logged keys: :class:`Panel` (declared by the callback classes with their keys).

Each callback class declares its panels with its keys (:mod:`lightning_bn.logging.keys`); the
W&B charts (:mod:`lightning_bn.logging.wandb`, logged under ``panel.key``) and the PNG figures of
``lightning-bn plot`` (:mod:`lightning_bn.plot.run_figures`, saved as ``<panel.name>.png`` with
``panel.title`` as title) are both drawn from those declarations, so the two show the same
quantities under the same names. The built-in callbacks' table is
:data:`lightning_bn.callbacks.PAPER_PANELS`. This module imports neither W&B nor matplotlib.

Example:
    >>> from lightning_bn.callbacks import PAPER_PANELS
    >>> [p.name for p in PAPER_PANELS][:3]
    ['loss_range', 'grad_predictiveness', 'beta_smoothness']
"""

from __future__ import annotations

from typing import Any

from lightning_bn.logging.keys import Panel

__all__ = ["Panel"]


def __getattr__(name: str) -> Any:
    # the tables of the built-in callbacks moved to lightning_bn.callbacks (which defines them)
    from lightning_bn import _deprecated

    return _deprecated.moved_name(__name__, name)
