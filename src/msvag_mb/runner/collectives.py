"""What the runner does across the ranks of a ``torchrun`` launch (docs/scaling_out.md).

Every function is a no-op (or the identity) on one process, and a collective otherwise:
every rank calls it at the same point.

* :func:`process_group_for` starts torchrun's process group for a ``--device``;
* :func:`global_mean_loss` and :func:`backward_share`: the global batch's mean loss and
  gradient from each rank's share;
* :func:`global_carried_state` and :func:`local_carried_state`: a carried model state
  (:class:`~msvag_mb.problems.models.CarriesState`) gathered for a checkpoint and handed
  back out on resume, so a checkpoint does not depend on the number of processes;
* :func:`barrier` and :func:`from_main`: wait for, or take the value of, rank 0.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from .. import distributed
from ..distributed import DistributedContext

T = TypeVar("T")


def process_group_for(device: str) -> DistributedContext:
    """torchrun's process group for ``device`` (a single-process context without torchrun):
    NCCL with one GPU per process (``cuda:LOCAL_RANK``) for ``"cuda"``, gloo otherwise."""
    if device.startswith("cuda"):
        return distributed.init_from_environment(backend="nccl" if device == "cuda" else None,
                                                 device=None if device == "cuda" else device)
    return distributed.init_from_environment(backend="gloo", device=device)


def barrier(ctx: DistributedContext) -> None:
    """Wait until every rank arrives."""
    if ctx.is_distributed:
        torch.distributed.barrier()


def from_main(value: T, ctx: DistributedContext) -> T:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not ctx.is_distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def global_mean_loss(local_loss: torch.Tensor, local_size: int, global_size: int,
                     ctx: DistributedContext) -> torch.Tensor:
    """The global batch's mean loss (detached) from each rank's mean over its share."""
    if not ctx.is_distributed:
        return local_loss.detach()
    total = local_loss.detach() * (local_size / global_size)
    torch.distributed.all_reduce(total)
    return total


def backward_share(local_loss: torch.Tensor, local_size: int, global_size: int,
                   ctx: DistributedContext) -> None:
    """Backpropagate this rank's mean loss so that ``p.grad`` is the global batch's mean
    gradient: DDP averages the ranks' gradients, so each is weighted by its share."""
    (local_loss * (local_size * ctx.world_size / global_size)).backward()


def global_carried_state(state: Any, ctx: DistributedContext) -> Any:
    """The carried state of the global batch (rank 0's result; ``None`` on the others).

    ``state`` is a list with, per layer, ``None`` or a tuple of tensors holding the
    examples along dim 1 (as ``nn.LSTM``'s ``(h, c)``); each rank holds its share.
    """
    if not ctx.is_distributed:
        return state
    gathered: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, [None if s is None else
                                                   tuple(t.cpu() for t in s) for s in state])
    if not ctx.is_main:
        return None
    return [None if layer[0] is None else
            tuple(torch.cat([rank_state[i] for rank_state in layer], dim=1)
                  for i in range(len(layer[0])))
            for layer in zip(*gathered)]


def local_carried_state(state: Any, ctx: DistributedContext) -> Any:
    """This rank's share (dim 1) of a state saved by :func:`global_carried_state`."""
    if not ctx.is_distributed:
        return state

    def share(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, distributed.shard_slice(tensor.shape[1], ctx)].to(ctx.device)
    return [None if s is None else tuple(share(t) for t in s) for s in state]
