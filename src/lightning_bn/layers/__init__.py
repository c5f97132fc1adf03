"""Interchangeable normalisation layers: BatchNorm, ℓ1 / ℓ2 / ℓ∞ normalisation, LayerNorm."""

from lightning_bn.layers.batch_norm import BatchNorm
from lightning_bn.layers.layer_norm import LayerNorm
from lightning_bn.layers.lp_norm import L1Norm, L2Norm, LinfNorm, LpNorm
from lightning_bn.layers.registry import NORM_LAYERS, create_norm_layer, is_batch_stat_norm

__all__ = [
    "NORM_LAYERS",
    "BatchNorm",
    "L1Norm",
    "L2Norm",
    "LayerNorm",
    "LinfNorm",
    "LpNorm",
    "create_norm_layer",
    "is_batch_stat_norm",
]
