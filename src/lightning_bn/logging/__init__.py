"""What the diagnostic callbacks add to Lightning's loggers, and reading a CSVLogger's file back.

- :mod:`~lightning_bn.logging.keys`: what each callback class declares it logs (keys, W&B
  summaries, panels), read by W&B and by ``lightning-bn plot``;
- :mod:`~lightning_bn.logging.extras`: the :class:`~lightning_bn.logging.extras.LoggerExtras`
  hooks every diagnostic callback calls, and :class:`~lightning_bn.logging.extras.MetricHistory`;
- :mod:`~lightning_bn.logging.wandb`: the W&B extras (metric summaries, run config, the paper's
  panels), registered when this package is imported;
- :mod:`~lightning_bn.logging.tensorboard`: the TensorBoard extras (a custom-scalars layout of
  the paper's panels), registered when this package is imported;
- :mod:`~lightning_bn.logging.panels`: :class:`~lightning_bn.logging.keys.Panel`, one chart of logged keys;
- :mod:`~lightning_bn.logging.csv_log`: a CSVLogger ``metrics.csv`` as ``key -> (steps, values)``.

The package is named after what it does for Lightning's loggers; every module inside imports
Python's standard ``logging`` (if at all) by absolute import, so the name does not shadow it.
"""

from __future__ import annotations

# The W&B and TensorBoard extras register themselves with `extras` on import; the callbacks
# import `lightning_bn.logging.extras`, which imports this package first, so every diagnostic
# callback has them without its base knowing either logger by name.
from lightning_bn.logging import tensorboard as _tensorboard  # noqa: F401
from lightning_bn.logging import wandb as _wandb  # noqa: F401

__all__: list[str] = []
