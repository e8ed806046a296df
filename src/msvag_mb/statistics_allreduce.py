"""The all-reduce of one call's statistics over the ranks of a DDP model, in buckets.

Each rank turns its engine result into the sums ``(S1, S2)`` per parameter and the counts
``(N, U)`` (:mod:`msvag_mb.batch_statistics`); one sum over the ranks gives the statistics
of the global batch on every rank, unequal local batch sizes included (docs/maths.md,
"Ranks"; docs/scaling_out.md).

The sums travel in flat buffers of at most ``bucket_cap_mb`` per device and communication
dtype (float64 stays float64, everything else travels as float32), each launched
asynchronously as soon as it is packed. The first buffer also carries the counts, the loss,
a has-gradient flag per parameter and a failure flag, so the usual case is exactly one
all-reduce per call, and a rank whose engine failed still takes part (flagged), so that the
others raise instead of waiting forever.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .batch_statistics import BatchStatistics, contributions_from_sums, sums_from_contributions
from .engines.base import EngineResult, ParameterStatistics

#: size of one all-reduce buffer; DDP's default ``bucket_cap_mb`` as well
DEFAULT_BUCKET_CAP_MB = 25.0


def communication_dtype(param: Tensor) -> torch.dtype:
    """float64 for float64 parameters, float32 for every other dtype."""
    # float16/bfloat16 sums of squares would lose most digits (and overflow sooner)
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def plan_buckets(params: list[nn.Parameter], cap_mb: float) -> list[list[nn.Parameter]]:
    """Consecutive parameters of one device and communication dtype, <= ``cap_mb`` each."""
    cap = cap_mb * 1024 * 1024
    buckets: list[list[nn.Parameter]] = []
    key = None
    size = 0.0
    for param in params:
        dtype = communication_dtype(param)
        nbytes = 2 * param.numel() * torch.empty((), dtype=dtype).element_size()
        this_key = (param.device, dtype)
        if not buckets or this_key != key or (size + nbytes > cap and buckets[-1]):
            buckets.append([])
            key, size = this_key, 0.0
        buckets[-1].append(param)
        size += nbytes
    return buckets


def all_reduce_statistics(result: EngineResult | None, examples: int,
                          params: list[nn.Parameter], reduction: str, *, bucket_cap_mb: float,
                          group=None) -> BatchStatistics:
    """Sum ``(S1, S2)`` per parameter and ``(N, U, loss)`` over the ranks.

    ``result`` is this rank's engine result for its ``examples`` (``None``: an empty local
    batch). Raises if another rank failed, or if the global batch is empty.
    """
    meta = _meta(result, examples, params, reduction, failed=False)
    pending = _launch(result, examples, params, reduction, meta, bucket_cap_mb, group)
    reduced, meta = _wait(pending)
    return _global_statistics(reduced, meta, params, reduction)


def report_failure(params: list[nn.Parameter], reduction: str | None, *, bucket_cap_mb: float,
                   group=None) -> None:
    """Take part in this call's all-reduce flagged as failed, so the other ranks raise.

    Any error of the collective itself is swallowed: this rank's own error is the one to see.
    """
    try:
        meta = _meta(None, 0, params, reduction, failed=True)
        _wait(_launch(None, 0, params, reduction, meta, bucket_cap_mb, group))
    except Exception:  # noqa: BLE001
        pass


def _meta(result: EngineResult | None, examples: int, params: list[nn.Parameter],
          reduction: str | None, failed: bool) -> list[float]:
    """``[N, U, loss sum, failed, has-gradient flag per parameter]`` of this rank."""
    statistics = {} if result is None else result.statistics
    units = 0 if result is None else result.units
    loss_sum = 0.0
    if result is not None:
        loss_sum = float(result.loss) * (examples if reduction == "mean" else 1)
    meta = [float(examples), float(units), loss_sum, float(failed)]
    return meta + [1.0 if p in statistics else 0.0 for p in params]


def _launch(result: EngineResult | None, examples: int, params: list[nn.Parameter],
            reduction: str | None, meta: list[float], bucket_cap_mb: float, group):
    """Pack and launch one asynchronous all-reduce per bucket; the first carries ``meta``."""
    statistics = {} if result is None else result.statistics
    units = 0 if result is None else result.units
    pending = []
    for index, bucket in enumerate(plan_buckets(params, bucket_cap_mb)):
        pieces = []
        for param in bucket:
            dtype = communication_dtype(param)
            stats = statistics.get(param)
            if stats is None:
                pieces.append(torch.zeros(2 * param.numel(), dtype=dtype, device=param.device))
                continue
            first, second = sums_from_contributions(
                stats.grad.to(dtype), stats.sum_grad_squared.to(dtype), examples, units,
                reduction)
            pieces += [first.reshape(-1), second.reshape(-1)]
        if index == 0:
            pieces.append(torch.tensor(meta, dtype=pieces[0].dtype, device=pieces[0].device))
        buffer = torch.cat(pieces)
        pending.append((bucket, buffer, dist.all_reduce(buffer, group=group, async_op=True)))
    return pending


def _wait(pending) -> tuple[dict[nn.Parameter, tuple[Tensor, Tensor]], list[float]]:
    """Wait for every bucket; the summed ``(S1, S2)`` per parameter and the summed meta."""
    reduced: dict[nn.Parameter, tuple[Tensor, Tensor]] = {}
    meta: list[float] = []
    for index, (bucket, buffer, work) in enumerate(pending):
        work.wait()
        offset = 0
        for param in bucket:
            size = param.numel()
            reduced[param] = (buffer[offset:offset + size].view(param.shape),
                              buffer[offset + size:offset + 2 * size].view(param.shape))
            offset += 2 * size
        if index == 0:
            meta = buffer[offset:].tolist()
    return reduced, meta


def _global_statistics(reduced: dict[nn.Parameter, tuple[Tensor, Tensor]], meta: list[float],
                       params: list[nn.Parameter], reduction: str) -> BatchStatistics:
    """The global batch's statistics, in contributions, from the summed buffers."""
    total_examples, total_units = int(round(meta[0])), int(round(meta[1]))
    failures = int(round(meta[3]))
    if failures:
        raise RuntimeError(
            f"GradientVariance.backward failed on {failures} other rank(s) (see their "
            "error); this rank's p.grad and p.grad_variance are left as before the call."
        )
    if total_examples == 0:
        raise ValueError(
            "the global batch is empty on every rank: give at least 2 examples in total."
        )
    out: dict[nn.Parameter, ParameterStatistics] = {}
    for param, flag in zip(params, meta[4:]):
        if flag < 0.5:
            continue  # no rank produced a gradient: p.grad stays None, as on one process
        first, second = reduced[param]
        grad, sgs = contributions_from_sums(first, second, total_examples, total_units,
                                            reduction)
        out[param] = ParameterStatistics(grad.to(param.dtype), sgs.to(param.dtype))
    loss = meta[2] / total_examples if reduction == "mean" else meta[2]
    return BatchStatistics(torch.tensor(loss), total_examples, total_units, out)
