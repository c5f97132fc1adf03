"""Interchangeable normalisation layers: BatchNorm, ℓ1 / ℓ2 / ℓ∞ normalisation, LayerNorm."""

from lightning_bn.layers.batch_norm import BatchNorm
from lightning_bn.layers.convert import swap_norm_layers
from lightning_bn.layers.layer_norm import LayerNorm
from lightning_bn.layers.lp_norm import L1Norm, L2Norm, LinfNorm, LpNorm
from lightning_bn.layers.registry import (
    BATCH_STAT_NORM_TYPES,
    NORM_LAYERS,
    NORM_TYPES,
    SWAPPABLE_NORM_TYPES,
    create_norm_layer,
    is_batch_stat_norm,
    is_batchnorm,
    is_norm_layer,
    is_rms_norm,
    overrides_norm_forward,
)

__all__ = [
    "BATCH_STAT_NORM_TYPES",
    "NORM_LAYERS",
    "NORM_TYPES",
    "SWAPPABLE_NORM_TYPES",
    "BatchNorm",
    "L1Norm",
    "L2Norm",
    "LayerNorm",
    "LinfNorm",
    "LpNorm",
    "create_norm_layer",
    "is_batch_stat_norm",
    "is_batchnorm",
    "is_norm_layer",
    "is_rms_norm",
    "overrides_norm_forward",
    "swap_norm_layers",
]
