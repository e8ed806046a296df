"""Helpers for running a training script under ``torchrun`` (docs/scaling_out.md).

A runner that works on one process needs five changes to run data-parallel:

.. code-block:: python

    ctx = distributed.init_from_environment()          # no-op without torchrun
    torch.manual_seed(seed)                             # same init on every rank
    model = distributed.wrap_model(model, ctx)          # DDP when world_size > 1
    gv = GradientVariance(model, loss_fn)               # statistics of the global batch
    data = torch.Generator().manual_seed(seed)          # same global batches on every rank
    torch.manual_seed(distributed.rank_seed(seed, ctx)) # own dropout masks per rank
    for step in ...:
        x, y = draw_global_batch(data)
        x, y = distributed.shard_batch(x, y, ctx)       # this rank's share
        opt.zero_grad(); gv.backward(x, y); opt.step()
        if distributed.is_main_process(ctx): log(...)
    distributed.cleanup(ctx)

Every rank draws the same global batch and keeps its contiguous share, so the run sees
exactly the batches of the single-process run, and ``GradientVariance`` makes ``p.grad``
and ``p.grad_variance`` exactly those of the single-process run (to float rounding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    #: True if :func:`init_from_environment` created the process group (cleanup ends it)
    owns_process_group: bool = False

    @property
    def is_distributed(self) -> bool:
        """More than one process: wrap in DDP, shard the batches, all-reduce statistics."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0


def init_from_environment(
    backend: str | None = None,
    init_method: str = "env://",
    device: torch.device | str | None = None,
) -> DistributedContext:
    """Initialise ``torch.distributed`` from torchrun's variables; a no-op on one process.

    Reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (set by ``torchrun``). With
    ``WORLD_SIZE`` unset or 1 it returns a single-process context without touching
    ``torch.distributed``.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default ``nccl`` when CUDA is available (one GPU
            per process, ``cuda:LOCAL_RANK``), else ``gloo`` on the CPU.
        init_method: where the processes meet; torchrun's ``env://`` (``MASTER_ADDR``,
            ``MASTER_PORT``) by default, ``file:///path`` works without a port.
        device: override the device chosen from ``backend`` and ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 1:
        raise ValueError(f"Invalid WORLD_SIZE={world_size} (must be >= 1)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    if device is None:
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    device = torch.device(device)
    if world_size == 1:
        return DistributedContext(device=device)
    if "RANK" not in os.environ:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but RANK is not set: launch with torchrun "
            "(torchrun --nproc_per_node=2 ...), which sets both."
        )
    rank = int(os.environ["RANK"])
    backend = backend or ("nccl" if use_cuda else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL uses the current device
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size)
        owns = True
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"torch.distributed is already initialised with rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, but the environment says rank {rank} of {world_size}."
        )
    return DistributedContext(rank, world_size, local_rank, device, dist.get_backend(), owns)


def wrap_model(model: nn.Module, ctx: DistributedContext, **ddp_kwargs) -> nn.Module:
    """Move ``model`` to the context's device; wrap it in DDP when distributed.

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts
    from the same model. ``ddp_kwargs`` go to ``DistributedDataParallel``.
    """
    model = model.to(ctx.device)
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (for ``state_dict``, evaluation), else ``model`` itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def shard_sizes(total: int, world_size: int) -> list[int]:
    """Local batch sizes of a global batch of ``total`` examples: as even as possible.

    The first ``total % world_size`` ranks get one example more (``torch.tensor_split``);
    a rank may get 0 examples when ``total < world_size``. ``GradientVariance`` is exact for
    any sizes as long as the global batch has >= 2 examples.
    """
    if world_size < 1 or total < 0:
        raise ValueError(f"Invalid shard: {total} examples over {world_size} ranks")
    base, extra = divmod(total, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_batch(
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    ctx: DistributedContext,
) -> tuple[Tensor | tuple[Tensor, ...], Tensor]:
    """This rank's contiguous share of a global batch (examples along dim 0).

    ``inputs`` is a tensor or a tuple of tensors (as ``GradientVariance.backward`` takes);
    on one process the batch is returned unchanged.
    """
    if not ctx.is_distributed:
        return inputs, targets
    share = shard_slice(targets.shape[0], ctx)
    if isinstance(inputs, Tensor):
        return inputs[share], targets[share]
    return tuple(x[share] for x in inputs), targets[share]


def shard_slice(total: int, ctx: DistributedContext) -> slice:
    """This rank's contiguous share of ``total`` examples, as :func:`shard_sizes` splits them."""
    sizes = shard_sizes(total, ctx.world_size)
    start = sum(sizes[:ctx.rank])
    return slice(start, start + sizes[ctx.rank])


def rank_seed(seed: int, ctx: DistributedContext) -> int:
    """A seed for this rank's own randomness (dropout masks): differs between ranks.

    Seed the data generator with ``seed`` on every rank (same global batches), and the
    global torch RNG with ``rank_seed(seed, ctx)``: identical dropout masks on all ranks
    would make examples on different ranks dependent, biasing the variance estimate.
    """
    return seed + 1_000_003 * ctx.rank


def is_main_process(ctx: DistributedContext | None = None) -> bool:
    """True on rank 0 (and on a single process): only it should print and write files."""
    if ctx is not None:
        return ctx.is_main
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_mean(value: float, ctx: DistributedContext) -> float:
    """Mean of a number over the ranks (e.g. a metric on sharded data); itself on one."""
    if not ctx.is_distributed:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64,
                          device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor) / ctx.world_size


def cleanup(ctx: DistributedContext) -> None:
    """End the process group if :func:`init_from_environment` created it."""
    if ctx.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
