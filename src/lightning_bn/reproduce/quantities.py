"""Per-run quantities of the findings, read from a run's CSV history.

- *mean training loss*: the mean of the logged training losses (every ``log_every`` steps;
  infinite when the run diverged);
- *final validation accuracy*: accuracy on the validation split after training, in evaluation
  mode (no noise, BatchNorm running statistics);
- a *diagnostic's median*: the median over the measured steps of its finite values.

The functions taking a generator return a bootstrap redraw of the quantity (the logged losses
redrawn with replacement; the accuracy as a binomial redraw of the correct answers among the
``final/val_samples`` validation samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from lightning_bn.reproduce.history import VariantHistory
from lightning_bn.reproduce.statistics import _median, redraw

__all__ = [
    "final_train_loss",
    "final_val_acc",
    "ics_layers",
    "mean_train_loss",
    "median_diagnostic",
    "median_layer_diagnostic",
]


def _diverged(history: VariantHistory) -> bool:
    return history.last("final/diverged") == 1.0


def mean_train_loss(history: VariantHistory) -> float:
    """Training loss averaged over the run (``inf`` if it diverged, ``nan`` without data).

    Uses ``final/mean_train_loss`` (every step, logged by the reproduce command) when present,
    else the logged ``train/loss`` points.
    """
    return _logged_or_train_loss(history, "final/mean_train_loss", lambda values: values)


def final_train_loss(history: VariantHistory) -> float:
    """Training loss at the end: ``final/train_loss``, else the mean of the last 10% of points."""
    return _logged_or_train_loss(
        history, "final/train_loss", lambda values: values[-max(1, values.size // 10) :]
    )


def _logged_or_train_loss(
    history: VariantHistory, key: str, part: Callable[[np.ndarray], np.ndarray]
) -> float:
    """The last value of ``key`` if logged, else the mean of ``part`` of the logged
    ``train/loss`` points (``nan`` with none, ``inf`` when one of them is not finite)."""
    value = history.last(key)
    if not math.isnan(value):
        return value
    values = history.get("train/loss")[1]
    if values.size == 0:
        return math.nan
    chosen = part(values)
    return float(chosen.mean()) if np.all(np.isfinite(chosen)) else math.inf


def final_val_acc(history: VariantHistory) -> float:
    """Validation accuracy after training: ``final/val_acc``, else the last ``val/acc``."""
    value = history.last("final/val_acc")
    return value if not math.isnan(value) else history.last("val/acc")


def median_diagnostic(history: VariantHistory, key: str) -> float:
    """Median of the finite values of ``key`` over the measured steps (``nan`` if none)."""
    values = history.get(key)[1]
    return _median(values[np.isfinite(values)])


def median_layer_diagnostic(
    history: VariantHistory, prefix: str, suffix: str, layers: Sequence[str] | None = None
) -> float:
    """Median over layers and steps of the finite values of ``<prefix><layer><suffix>``."""
    values = _layer_values(history, prefix, suffix, layers)
    return _median(values[np.isfinite(values)])


def _layer_values(
    history: VariantHistory, prefix: str, suffix: str, layers: Sequence[str] | None
) -> np.ndarray:
    if layers is None:
        return history.values_matching(prefix, suffix)
    parts = [history.get(f"{prefix}{layer}{suffix}")[1] for layer in layers]
    return np.concatenate(parts) if parts else np.zeros(0)


def ics_layers(histories: Sequence[VariantHistory]) -> list[str]:
    """Layers with an ICS measurement that is not identically zero, in first-logged order.

    The first layer's ``G'`` equals ``G`` by definition (no layer runs before it), so its
    ``‖G − G′‖`` is 0 and its cosine 1 in every network; pooling it would only dilute the
    comparison.
    """

    def nonzero(history: VariantHistory, layer: str) -> bool:
        values = history.get(f"ics/{layer}/l2")[1]
        return bool(np.any(values[np.isfinite(values)] != 0))

    layers: list[str] = []
    for history in histories:
        for layer in history.layers("ics/", "/l2"):
            if layer not in layers and any(nonzero(h, layer) for h in histories):
                layers.append(layer)
    return layers


def _mean_loss(history: VariantHistory, rng: np.random.Generator | None) -> float:
    """Mean of the logged training losses (redrawn with ``rng``); ``inf`` if the run diverged."""
    if _diverged(history):
        return math.inf
    values = history.get("train/loss")[1]
    if values.size == 0:
        return mean_train_loss(history)
    if not np.all(np.isfinite(values)):
        return math.inf
    return float(redraw(values, rng).mean())


def _acc(history: VariantHistory, rng: np.random.Generator | None) -> float:
    """Final validation accuracy; with ``rng``, a binomial redraw over the validation samples."""
    acc = final_val_acc(history)
    n = history.last("final/val_samples")
    if rng is None or math.isnan(acc) or math.isnan(n) or n < 1:
        return acc
    return float(rng.binomial(int(n), min(max(acc, 0.0), 1.0)) / int(n))


def _final_loss(history: VariantHistory, rng: np.random.Generator | None) -> float:
    return math.inf if _diverged(history) else final_train_loss(history)
