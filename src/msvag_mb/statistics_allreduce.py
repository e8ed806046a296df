"""The all-reduce of one call's statistics over the ranks of a DDP model, in buckets.

Each rank turns its engine result into the sums ``(S1, S2)`` per parameter and the counts
``(N, U)`` (:mod:`msvag_mb.batch_statistics`); one sum over the ranks gives the statistics
of the global batch on every rank, unequal local batch sizes included (docs/maths.md,
"Ranks"; docs/scaling_out.md).

The sums travel in flat buffers, planned as DDP plans its gradient buckets: in the order
the gradients become ready in the backward pass (the parameters in reverse registration
order), one device and communication dtype per buffer (float64 stays float64, everything
else travels as float32), the first at most ``min(1 MiB, bucket_cap_mb)`` (so that
communication starts early) and the others at most ``bucket_cap_mb``, a parameter of
more than half of that in a buffer of its own (it goes out as soon as it is ready).
:class:`StatisticsStream` launches buffer ``k`` asynchronously as soon as all its
parameters' statistics are known and buffers ``0..k-1`` are launched -- during the
backward pass for an engine that announces its statistics as they become final
(``Engine.streams_statistics``), after it for the others. Collectives are matched by
their order, so every rank launches the same buffers in the same order, whichever path
and however its gradients happen to arrive. The last buffer (the first layers', the last
to be ready) goes out after the backward pass with the counts, the loss, a has-gradient
flag per parameter and a failure flag at its end, so the usual small model needs one
all-reduce per call: a rank whose engine failed still launches every buffer (zeros where
it has nothing), the last one flagged, so that the others raise instead of waiting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .batch_statistics import BatchStatistics, contributions_from_sums, sums_from_contributions
from .engines.base import EngineResult, ParameterStatistics

#: size of one all-reduce buffer; DDP's default ``bucket_cap_mb`` as well
DEFAULT_BUCKET_CAP_MB = 25.0
#: size of the first buffer, as DDP's first bucket (``dist._DEFAULT_FIRST_BUCKET_BYTES``)
FIRST_BUCKET_CAP_MB = 1.0


def communication_dtype(param: Tensor) -> torch.dtype:
    """float64 for float64 parameters, float32 for every other dtype."""
    # float16/bfloat16 sums of squares would lose most digits (and overflow sooner)
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def plan_buckets(params: list[nn.Parameter], cap_mb: float, first_cap_mb: float | None = None,
                 alone_over_mb: float | None = None) -> list[list[nn.Parameter]]:
    """Consecutive parameters of one device and communication dtype, ``(S1, S2)`` of at
    most ``cap_mb`` per bucket (the first: ``first_cap_mb``, default ``cap_mb``); a
    parameter larger than the cap, or than ``alone_over_mb``, gets a bucket of its own."""
    caps = [cap_mb if first_cap_mb is None else first_cap_mb, cap_mb]
    alone = float("inf") if alone_over_mb is None else alone_over_mb * 1024 * 1024
    buckets: list[list[nn.Parameter]] = []
    key = None
    size = 0.0
    for param in params:
        dtype = communication_dtype(param)
        nbytes = 2 * param.numel() * torch.empty((), dtype=dtype).element_size()
        this_key = (param.device, dtype)
        cap = (caps[0] if len(buckets) == 1 else caps[1]) * 1024 * 1024
        if not buckets or this_key != key or (
                buckets[-1] and (size + nbytes > cap or max(size, nbytes) > alone)):
            buckets.append([])
            key, size = this_key, 0.0
        buckets[-1].append(param)
        size += nbytes
    return buckets


class StatisticsStream:
    """One call's all-reduce of ``(S1, S2)`` per parameter and ``(N, U, loss)``.

    ``params`` are the call's trainable parameters in registration order, ``examples``
    this rank's ``N_r`` (may be set later, before the backward pass: a ``collect`` block
    learns it when the model's forward starts). A streaming engine calls :meth:`ready`
    with each parameter's final ``(grad, sum_u c_u^2)`` during the backward pass (its
    units are its examples); :meth:`finish` takes the engine's result after it and
    returns the global batch's statistics, :meth:`fail` takes part flagged as failed.
    """

    def __init__(self, params: list[nn.Parameter], examples: int | None,
                 reduction: str | None, *, bucket_cap_mb: float, group=None) -> None:
        self.params = list(params)
        self.examples = examples
        self.reduction = reduction
        self.group = group
        # a parameter of more than half a bucket goes alone: it starts as soon as it is
        # ready, instead of waiting for the layers before it (at one collective more)
        self.buckets = plan_buckets(self.params[::-1], bucket_cap_mb,
                                    min(FIRST_BUCKET_CAP_MB, bucket_cap_mb), bucket_cap_mb / 2)
        self._bucket_of = {param: k for k, bucket in enumerate(self.buckets)
                           for param in bucket}
        self._sums: dict[nn.Parameter, list[Tensor]] = {}  # packed, not yet launched
        self._announced = False  # ready() packed something
        self._pending: list[tuple[list[nn.Parameter], Tensor, object]] = []
        self._closed = False

    @property
    def launched_any(self) -> bool:
        """Whether a buffer went out already (the call can no longer start over)."""
        return bool(self._pending)

    def ready(self, param: nn.Parameter, stats: ParameterStatistics) -> None:
        """``param``'s statistics are final: pack them; launch every bucket now complete.

        A second announcement of a parameter (a second backward pass, refused later by
        the caller) is ignored: the first one is sent."""
        bucket = self._bucket_of.get(param)
        if bucket is None or bucket < len(self._pending) or param in self._sums:
            return
        self._sums[param] = self._pieces(param, stats, self.examples)
        self._announced = True
        # the last buffer waits for the counts (its parameters, the first layers', are
        # the last to be ready anyway)
        while len(self._pending) < len(self.buckets) - 1 and all(
                p in self._sums for p in self.buckets[len(self._pending)]):
            self._launch_next()

    def reset(self) -> None:
        """Forget what was announced (an engine refused the model before anything was
        sent, and the next engine starts over)."""
        if self.launched_any:
            raise RuntimeError("statistics already sent to the other ranks cannot be reset")
        self._sums.clear()
        self._announced = False

    def finish(self, result: EngineResult | None) -> BatchStatistics:
        """Send what is left from ``result`` (``None``: an empty local batch), then the
        counts; the global batch's statistics. Raises if another rank failed, or if the
        global batch is empty."""
        self._send_rest(result, failed=False)
        reduced, meta = self._wait()
        return _global_statistics(reduced, meta, self.params, self.reduction)

    def fail(self) -> None:
        """Send the rest as zeros and the counts flagged as failed, so the other ranks
        raise. Any error of the collective itself is swallowed: this rank's own error is
        the one to see."""
        if self._closed:
            return
        try:
            self._sums.clear()
            self._announced = False
            self._send_rest(None, failed=True)
            self._wait()
        except Exception:  # noqa: BLE001
            pass

    def _send_rest(self, result: EngineResult | None, failed: bool) -> None:
        if self._closed:
            raise RuntimeError("this call's statistics were already sent")
        self._closed = True
        examples = 0 if result is None else self.examples
        units = 0 if result is None else result.units
        statistics = {} if result is None else result.statistics
        if self._announced and units != examples:
            raise RuntimeError("a streaming engine's units must be its examples")
        for param in self.params:
            if param not in self._sums and self._bucket_of[param] >= len(self._pending):
                stats = statistics.get(param)
                self._sums[param] = (self._pieces(param, stats, examples, units)
                                     if stats is not None else [self._zeros(param)])
        loss_sum = 0.0
        if result is not None:
            loss_sum = float(result.loss) * (examples if self.reduction == "mean" else 1)
        meta = [float(examples), float(units), loss_sum, float(failed)]
        meta += [1.0 if p in statistics else 0.0 for p in self.params]
        while len(self._pending) < len(self.buckets) - 1:
            self._launch_next()
        self._launch_next(meta)

    def _pieces(self, param: nn.Parameter, stats: ParameterStatistics, examples: int,
                units: int | None = None) -> list[Tensor]:
        """``(S1, S2)`` of ``param``, flat, in its communication dtype."""
        dtype = communication_dtype(param)
        # the same casts as the engine result's (mixed_precision.in_parameter_dtype), so
        # that announced and returned statistics travel bitwise alike
        first, second = sums_from_contributions(
            stats.grad.detach().to(param.dtype).to(dtype),
            stats.sum_grad_squared.detach().to(param.dtype).to(dtype),
            examples, examples if units is None else units, self.reduction)
        return [first.reshape(-1), second.reshape(-1)]

    @staticmethod
    def _zeros(param: nn.Parameter) -> Tensor:
        return torch.zeros(2 * param.numel(), dtype=communication_dtype(param),
                           device=param.device)

    def _launch_next(self, meta: list[float] | None = None) -> None:
        """Launch the next bucket's buffer; the last one carries ``meta`` at its end."""
        bucket = self.buckets[len(self._pending)]
        pieces = [piece for param in bucket for piece in self._sums.pop(param)]
        if meta is not None:
            pieces.append(torch.tensor(meta, dtype=pieces[0].dtype, device=pieces[0].device))
        buffer = torch.cat(pieces)
        self._pending.append((bucket, buffer, self._all_reduce(buffer)))

    def _all_reduce(self, buffer: Tensor):
        return dist.all_reduce(buffer, group=self.group, async_op=True)

    def _wait(self) -> tuple[dict[nn.Parameter, tuple[Tensor, Tensor]], list[float]]:
        """Wait for every buffer; the summed ``(S1, S2)`` per parameter and the summed
        counts."""
        reduced: dict[nn.Parameter, tuple[Tensor, Tensor]] = {}
        for bucket, buffer, work in self._pending:
            work.wait()
            offset = 0
            for param in bucket:
                size = param.numel()
                reduced[param] = (buffer[offset:offset + size].view(param.shape),
                                  buffer[offset + size:offset + 2 * size].view(param.shape))
                offset += 2 * size
        return reduced, self._pending[-1][1][offset:].tolist()  # the last one's tail


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
