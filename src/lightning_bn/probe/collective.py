"""Cross-process reductions with DDP semantics for the diagnostics (a no-op in one process).

Plain torch (and torchmetrics' gather of tensors of different sizes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_bn.errors import DiagnosticSkipped
from lightning_bn.layers.agreement import PeerFailed, exchange_failure, guarded

__all__ = ["Collective"]


class Collective:
    """Cross-process reductions with DDP semantics (a no-op in a single process).

    ``mean`` averages a tensor over ranks, as DDP averages gradients; ``gather`` concatenates
    tensors along dimension 0 (the union of the ranks' batches). ``guard`` runs a local stage of a
    diagnostic and then agrees on success with every rank, so a failure on one rank makes every rank
    raise :class:`DiagnosticSkipped` instead of leaving the others waiting in a collective; the
    synchronised layers' collectives inside the stage agree first too
    (:mod:`lightning_bn.layers.agreement`), so the stage may contain them.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group

    @property
    def world_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size(self.group))
        return 1

    def mean(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out / self.world_size

    def mean_(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over ranks in place (no copy); returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            tensor.div_(self.world_size)
        return tensor

    def mean_dict(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Average every tensor of a dict in one flat all-reduce per device and dtype."""
        if self.world_size == 1:
            return dict(tensors)
        groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for k, t in tensors.items():
            groups.setdefault((t.device, t.dtype), []).append(k)
        out: dict[str, Tensor] = {}
        for keys in groups.values():
            flat = self.mean(torch.cat([tensors[k].detach().reshape(-1) for k in keys]))
            offset = 0
            for k in keys:
                n = tensors[k].numel()
                out[k] = flat[offset : offset + n].view_as(tensors[k])
                offset += n
        return {k: out[k] for k in tensors}

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate the ranks' tensors along dimension 0 (sizes may differ)."""
        if self.world_size == 1:
            return tensor
        # torchmetrics pads the ranks' tensors to a common shape, gathers and trims them again
        parts = gather_all_tensors(tensor.detach().contiguous(), group=self.group)
        return torch.cat(parts)

    def guard(self, stage: Callable[[], Any]) -> Any:
        """Run ``stage`` locally, then make every rank agree that it succeeded.

        Raises:
            DiagnosticSkipped: on every rank when the stage raised on any rank (the local
                exception is chained on the rank where it happened).
        """
        error: BaseException | None = None
        result = None
        with guarded(self.group if self.world_size > 1 else None) as state:
            try:
                result = stage()
            except PeerFailed:  # another rank failed: the flags were exchanged in the stage
                pass
            except Exception as exc:
                error = exc
        if state.exchanged is not None:
            failed = state.exchanged
        elif self.world_size > 1:
            failed = exchange_failure(error is not None, self.group, self._device())
        else:
            failed = 0 if error is None else 1
        if error is not None:
            raise DiagnosticSkipped(f"{type(error).__name__}: {error}") from error
        if failed:
            raise DiagnosticSkipped(f"a diagnostic pass failed on {failed} other rank(s)")
        return result

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group) if dist.is_initialized() else "gloo"
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


#: What ``Metric.forward``/``update`` change besides the states: the update count (a "mean"
#: state is reduced with it), the cached ``compute`` and ``forward`` results (Lightning logs an
#: ``on_step`` metric from ``_forward_cache`` at ``self.log`` time, so restoring it is only for
