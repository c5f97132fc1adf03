"""Recompute running statistics of every batch-statistics layer: ``update_bn`` for this package too."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_bn.layers._base import _BatchStatNorm

__all__ = ["update_norm_stats"]


def update_norm_stats(
    loader: Iterable[Any], model: nn.Module, device: torch.device | str | None = None
) -> None:
    r"""Reset and recompute the running statistics of every batch-statistics layer in one pass.

    :func:`torch.optim.swa_utils.update_bn` for torch's BatchNorm layers *and* this package's
    (:class:`~lightning_bn.BatchNorm`, :class:`~lightning_bn.LpNorm` and its ``L1``/``L2``/``Linf``
    variants), which ``update_bn`` does not see (they are not ``torch.nn.modules.batchnorm.
    _BatchNorm`` subclasses). Same semantics: each layer's running statistics are reset, its
    ``momentum`` is set to ``None`` (cumulative average) for the pass, the model runs in training
    mode on every batch of ``loader`` (the first element of a list or tuple batch, moved to
    ``device``), then the momenta and the model's mode are restored. Afterwards, with :math:`K`
    batches,

    .. math::
        \mathrm{running\_mean} = \frac1K \sum_k \mu_k, \qquad
        \mathrm{running\_var} = \frac1K \sum_k \tfrac{m_k}{m_k - 1}\sigma_k^2, \qquad
        \mathrm{running\_divisor} = \frac1K \sum_k s_{p,k}.

    Use it after averaging weights (``AveragedModel``) exactly where ``update_bn`` is used; for
    Lightning's ``StochasticWeightAveraging`` use :class:`lightning_bn.StochasticWeightAveraging`.

    Args:
        loader: batches (tensors, or lists/tuples whose first element is the input).
        model: the model; its layers are updated in place.
        device: where to move each input, or ``None``.

    Example:
        >>> import torch
        >>> from lightning_bn import L1Norm
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), L1Norm(4))
        >>> update_norm_stats([torch.randn(8, 4) for _ in range(3)], net)
        >>> int(net[1].num_batches_tracked)
        3
    """
    momenta: dict[Any, float | None] = {}  # the layers (torch's and ours) and their momenta
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchStatNorm)):
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    try:
        with torch.no_grad():
            for batch in loader:
                if isinstance(batch, (list, tuple)):
                    batch = batch[0]
                if device is not None:
                    batch = batch.to(device)
                model(batch)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)
