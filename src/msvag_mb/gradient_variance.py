"""``GradientVariance``: one backward pass that leaves ``p.grad`` and ``p.grad_variance``.

``p.grad_variance`` is the unbiased within-batch estimate of the variance of ``p.grad``
(ALGORITHMS.md, "The within-batch estimate s_hat"). In terms of the contributions ``c_n``
of the ``B`` examples to the gradient (``p.grad = sum_n c_n``, see
:mod:`msvag_mb.engines.base`):

    s_hat = (B * sum_n c_n^2 - p.grad^2) / (B - 1)

which is ``1/(B(B-1)) sum_n (g_n - gbar)^2`` for a mean-reduced loss and ``B^2`` times that
for a sum-reduced one: the scale of ``p.grad`` in both cases.

Combining batches (accumulation, several ranks) works with the sums over the per-example
gradients ``g_n`` (the gradient of example n's own loss term)

    S1 = sum_n g_n,   S2 = sum_n g_n^2,   N examples,   U independent units

(``U = N`` for per-example engines; groups or ranks for the engines whose units are
bigger than one example, each unit then standing for its examples with its mean
gradient). Then, for a mean-reduced loss,

    p.grad = S1 / N,   s_hat = (S2 - S1^2 / N) / ((U - 1) N)

and ``N`` times / ``N^2`` times those for a sum-reduced loss. Sums add across batches and
ranks, so both are exact: several calls before one optimizer step give the statistics of
the concatenated batch (a new accumulation cycle starts after ``optimizer.zero_grad()`` or
:meth:`GradientVariance.zero_grad`), and with ``DistributedDataParallel`` one all-reduce of
``(S1, S2, N, U)`` gives the statistics of the global batch on every rank
(docs/scaling_out.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .engines import ENGINES, Engine, EngineResult, ParameterStatistics, UnsupportedModelError
from .engines.base import LossFunction, batch_size_of
from .optimizers import clear_grad_variance, set_grad_variance

#: size of one all-reduce buffer; DDP's default ``bucket_cap_mb`` as well
DEFAULT_BUCKET_CAP_MB = 25.0

#: Engines whose per-layer backward code needs the user's autocast around the backward
#: pass too: BackPACK's einsums of a layer's stored (bfloat16) input with its output
#: gradient fail on mixed dtypes outside autocast. Their sums of squares are then computed
#: in the autocast dtype (about 3 significant digits in bfloat16). The others run outside
#: autocast in the parameters' dtype ("extensions" casts each layer's stored input and
#: output gradient to it; tests/test_amp.py checks both against brute force).
_ENGINES_NEEDING_AUTOCAST_IN_BACKWARD = frozenset({"backpack"})


def _resolve_reduction(loss_fn: LossFunction, reduction: str | None) -> str | None:
    declared = getattr(loss_fn, "reduction", None)
    if reduction is None:
        reduction = declared
    if reduction == "none":
        raise ValueError(
            "loss_fn has reduction='none': GradientVariance needs a scalar loss. Use "
            "reduction='mean' (or 'sum')."
        )
    if reduction not in (None, "mean", "sum"):
        raise ValueError(f"Invalid reduction: {reduction!r} (use 'mean' or 'sum')")
    if declared in ("mean", "sum") and reduction != declared:
        raise ValueError(
            f"reduction={reduction!r} contradicts loss_fn.reduction={declared!r}"
        )
    return reduction


@dataclass
class _CallResult:
    """One call's statistics (after the all-reduce when distributed), in contributions."""

    loss: Tensor
    examples: int  # N: examples in the batch the statistics describe
    units: int  # U: independent units (examples, ghost groups or ranks)
    statistics: dict[nn.Parameter, ParameterStatistics]


class GradientVariance:
    """Compute ``p.grad`` and the within-batch gradient variance ``p.grad_variance``.

    Args:
        model: the network; examples lie along dim 0 of its inputs. A
            :class:`torch.nn.parallel.DistributedDataParallel` model makes every rank's
            ``p.grad`` and ``p.grad_variance`` those of the *global* batch (all ranks'
            examples, unequal local batch sizes included); see docs/scaling_out.md.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, mean- or sum-reduced over
            examples. It must not contain terms that belong to no example (put L2
            regularisation in the optimizer's ``weight_decay``).
        engine: ``"auto"`` (default: the fastest engine that is correct for the model),
            a registered name (``"extensions"``, ``"backpack"``, ``"vmap"``,
            ``"ghost_batch"``, ``"rank_spread"``) or an :class:`~msvag_mb.engines.Engine`
            instance such as ``GhostBatchEngine(groups=8)``.
        reduction: ``"mean"`` or ``"sum"``; read from ``loss_fn.reduction`` when it has
            one. Needed for accumulation across calls, for ghost batches and with DDP.
        bucket_cap_mb: with DDP, the statistics travel in all-reduce buffers of at most
            this size (MiB), launched one after another without waiting.

    Example::

        gv = GradientVariance(model, nn.CrossEntropyLoss(), engine="auto")
        opt = MSVAG(model.parameters(), lr=0.1, variance="minibatch")
        opt.zero_grad()
        loss = gv.backward(x, y)                  # or gv.backward(x, y, scaler=scaler)
        opt.step()                                # or scaler.step(opt); scaler.update()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        engine: str | Engine = "auto",
        reduction: str | None = None,
        *,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    ) -> None:
        self.ddp_model: nn.parallel.DistributedDataParallel | None = None
        self.process_group = None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            if not dist.is_initialized():
                raise RuntimeError(
                    "a DistributedDataParallel model needs torch.distributed to be "
                    "initialised (torch.distributed.init_process_group, or "
                    "msvag_mb.distributed.init_from_environment under torchrun)."
                )
            # The engine runs on the wrapped module: DDP's own reducer averages the ranks'
            # *mean* gradients, wrong for unequal local batches, and has no second moments.
            # Not calling ddp_model.forward never arms the reducer, so its hooks stay idle
            # and a later ordinary ddp_model(x) forward/backward still works.
            self.ddp_model = model
            self.process_group = model.process_group
            model = model.module
        if bucket_cap_mb <= 0:
            raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb} (must be > 0)")
        self.bucket_cap_mb = bucket_cap_mb
        self.model = model
        self.loss_fn = loss_fn
        self.reduction = _resolve_reduction(loss_fn, reduction)
        if self.ddp_model is not None and self.reduction is None:
            raise ValueError(
                "with DistributedDataParallel, GradientVariance needs the loss reduction "
                "to combine the ranks' batches: pass reduction='mean' or 'sum' (or use an "
                "nn loss module)."
            )
        if isinstance(engine, str):
            if engine != "auto" and engine not in ENGINES:
                raise ValueError(
                    f"Invalid engine: {engine!r}. Use 'auto' or one of {sorted(ENGINES)}."
                )
            self._engine: Engine | None = None if engine == "auto" else ENGINES[engine]()
        elif isinstance(engine, Engine):
            self._engine = engine
        else:
            raise TypeError(f"engine must be a name or an Engine instance, got {engine!r}")
        self._examples_in_cycle = 0  # N of the accumulation cycle so far
        self._units_in_cycle = 0  # U of the accumulation cycle so far
        self._cycle_scale: float | None = None  # GradScaler scale of the cycle's calls
        self._last: dict[nn.Parameter, tuple[Tensor, int, Tensor]] = {}

    @property
    def is_distributed(self) -> bool:
        """True when the model is a DDP model: statistics are those of the global batch."""
        return self.ddp_model is not None

    # -- engine choice -------------------------------------------------------------------
    def select_engine(self) -> Engine:
        """The engine the next :meth:`backward` uses; raises if none is correct."""
        if self._engine is not None:
            reason = self._engine.unsupported_reason(self.model)
            if reason is not None:
                raise UnsupportedModelError(f"engine '{self._engine.name}': {reason}")
            return self._engine
        reasons = []
        candidates = sorted(
            (cls for cls in ENGINES.values() if cls.auto_priority is not None),
            key=lambda cls: cls.auto_priority,
        )
        for cls in candidates:
            reason = cls.unsupported_reason(self.model)
            if reason is None:
                return cls()
            reasons.append(f"  {cls.name}: {reason}")
        raise UnsupportedModelError(
            "engine='auto' found no engine that computes correct per-example statistics "
            "for this model:\n" + "\n".join(reasons)
        )

    @property
    def engine_name(self) -> str:
        """Name of the engine :meth:`backward` would use now."""
        return self.select_engine().name

    # -- accumulation cycle --------------------------------------------------------------
    def zero_grad(self) -> None:
        """Start a new accumulation cycle: clear ``p.grad`` and ``p.grad_variance``."""
        for param in self._trainable_parameters():
            param.grad = None
            clear_grad_variance(param)
        self._reset_cycle()

    def _reset_cycle(self) -> None:
        self._examples_in_cycle = 0
        self._units_in_cycle = 0
        self._cycle_scale = None
        self._last.clear()

    def _trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _cycle_continues(self, params: list[nn.Parameter]) -> bool:
        """True if every result of the previous call is still in place, untouched."""
        if self._examples_in_cycle == 0 or not self._last:
            return False
        for param, (grad, version, variance) in self._last.items():
            if param.grad is not grad or grad._version != version:
                return False
            if getattr(param, "grad_variance", None) is not variance:
                return False
        return all(p.grad is None or p in self._last for p in params)

    # -- the main call -------------------------------------------------------------------
    def backward(
        self,
        inputs: Tensor | Sequence[Tensor],
        targets: Tensor,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """Compute ``loss_fn(model(inputs), targets)``, ``p.grad`` and ``p.grad_variance``.

        Returns the (detached) loss; with DDP the loss of the global batch. Within one
        accumulation cycle, repeated calls combine to the statistics of the concatenated
        batch (with DDP: of all ranks' batches of all calls; each call all-reduces).

        Args:
            inputs: a tensor or a tuple of tensors (``model(*inputs)``), examples on dim 0.
            targets: the targets of the examples.
            scaler: a :class:`torch.amp.GradScaler` for mixed precision. The loss is
                scaled by ``scaler.scale``, so ``p.grad`` is in scaled units (as
                ``scaler.scale(loss).backward()`` leaves it) and ``p.grad_variance`` in
                squared scaled units; the scale is recorded so that the optimizer, after
                ``scaler.unscale_(opt)`` / inside ``scaler.step(opt)``, sees the unscaled
                variance. NaN/Inf are then not an error: ``p.grad`` is made to hold an Inf
                wherever the gradient or the variance is not finite, so ``scaler.step``
                skips the step and ``scaler.update()`` lowers the scale. The returned loss
                is unscaled.

        Raises:
            FloatingPointError: NaN/Inf in the gradient or the variance without a scaler
                (``p.grad`` and ``p.grad_variance`` are then left as before the call).
        """
        params = self._trainable_parameters()
        if not params:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        local_examples = batch_size_of(inputs)
        engine = self.select_engine()
        units_are_ranks = getattr(engine, "units_are_ranks", False)
        if units_are_ranks and not self.is_distributed:
            raise ValueError(
                f"engine '{engine.name}' takes the spread of the ranks' gradients: wrap the "
                "model in torch.nn.parallel.DistributedDataParallel and run >= 2 processes "
                "(torchrun --nproc_per_node=2 ...), or use a per-example engine."
            )
        scale = _current_scale(scaler)
        continues = self._cycle_continues(params)
        if not continues:
            self._start_cycle(params)
            if (local_examples < 2 and not self.is_distributed
                    and engine.name != "ghost_batch"):
                raise ValueError(
                    f"a batch of {local_examples} example has no within-batch variance: use "
                    "a batch of at least 2 examples (or variance='moving_average')."
                )
        elif self.reduction is None:
            raise ValueError(
                "accumulating several GradientVariance.backward calls needs the loss "
                "reduction: pass reduction='mean' or 'sum' to GradientVariance (or use an "
                "nn loss module), or call optimizer.zero_grad() between batches."
            )
        elif scale != self._cycle_scale:
            raise ValueError(
                f"the loss scale changed within an accumulation cycle ({self._cycle_scale} "
                f"-> {scale}): pass the same scaler to every call of the cycle and call "
                "scaler.update() only after scaler.step(optimizer) and zero_grad()."
            )
        previous = {p: (p.grad, getattr(p, "grad_variance", None)) for p in params} \
            if continues else {}

        def restore() -> None:
            for param in params:
                grad, variance = previous.get(param, (None, None))
                param.grad = grad
                if variance is None:
                    clear_grad_variance(param)
                else:
                    set_grad_variance(param, variance, scale=self._cycle_scale)

        for param in params:
            param.grad = None
        model, loss_fn = self.model, self.loss_fn
        autocast = _active_autocast(params[0].device.type)
        if autocast is not None and engine.name not in _ENGINES_NEEDING_AUTOCAST_IN_BACKWARD:
            # Mixed precision belongs to the forward pass (model and loss) only: the
            # engines' own sums of squares must run in the parameters' precision, since
            # s_hat = (B sum c^2 - grad^2)/(B-1) cancels digits (a bfloat16 einsum would
            # leave about two). The backward replays the forward's casts either way.
            model = _AutocastForward(model, *autocast)
            loss_fn = _autocast_loss(loss_fn, *autocast)
        else:
            autocast = None
        if scale is not None:
            loss_fn = _scaled_loss(loss_fn, scaler)
        result: EngineResult | None = None
        try:
            if local_examples > 0 or not self.is_distributed:
                # outside the user's autocast for the engine's own maths (see above)
                outside = torch.autocast(params[0].device.type, enabled=False) \
                    if autocast is not None else contextlib.nullcontext()
                with outside:
                    result = engine.compute(
                        model, loss_fn, inputs, targets, params, self.reduction
                    )
                result = _in_parameter_dtype(result)
        except Exception:
            restore()
            if self.is_distributed:
                # Take part in the collective anyway, flagged, so the other ranks raise
                # instead of waiting forever in their all-reduce.
                try:
                    self._all_reduce(None, 0, params, failed=True)
                except Exception:  # noqa: BLE001 - this rank's own error is the one to see
                    pass
            raise
        if self.is_distributed:
            try:
                call = self._all_reduce(result, local_examples, params, failed=False)
            except Exception:
                restore()
                raise
        else:
            call = _CallResult(result.loss, local_examples, result.batch_size,
                               result.statistics)
        if call.units < 2 and not continues:
            restore()
            where = " over all ranks" if self.is_distributed else ""
            raise ValueError(
                f"engine '{engine.name}' returned {call.units} independent unit(s){where}; "
                "the within-batch variance needs at least 2: use a larger batch."
            )
        updates = self._new_statistics(params, previous, call)
        finite = _all_finite([t for pair in updates.values() if pair for t in pair])
        if not finite and scale is None:
            restore()
            raise FloatingPointError(
                "the gradient or its within-batch variance contains NaN or Inf (loss "
                f"{float(call.loss):.4g}); p.grad and p.grad_variance are left as before "
                "this call. Check the data, the loss and the step size, or train with "
                "torch.amp.GradScaler (backward(..., scaler=scaler)), whose "
                "scaler.step(optimizer) skips such steps."
            )
        self._last.clear()
        for param, pair in updates.items():
            if pair is None:
                param.grad = None
                clear_grad_variance(param)
                continue
            grad, variance = pair
            if not finite:
                # GradScaler looks only at p.grad: make sure it sees this step as
                # overflowed when only the variance overflowed (e.g. (scale*g)^2 > max).
                grad.masked_fill_(~torch.isfinite(variance), float("inf"))
            param.grad = grad
            set_grad_variance(param, variance, scale=scale)
            self._last[param] = (grad, grad._version, variance)
        self._examples_in_cycle += call.examples
        self._units_in_cycle += call.units
        self._cycle_scale = scale
        return call.loss if scale is None else call.loss / scale

    def _start_cycle(self, params: list[nn.Parameter]) -> None:
        for param in params:
            if param.grad is not None and bool(param.grad.any()):
                raise RuntimeError(
                    "p.grad already holds a gradient that GradientVariance did not compute "
                    "(e.g. from loss.backward(), or one that scaler.unscale_ changed); call "
                    "optimizer.zero_grad() before GradientVariance.backward."
                )
            clear_grad_variance(param)
        self._reset_cycle()

    def _new_statistics(
        self,
        params: list[nn.Parameter],
        previous: dict[nn.Parameter, tuple[Tensor | None, Tensor | None]],
        call: _CallResult,
    ) -> dict[nn.Parameter, tuple[Tensor, Tensor] | None]:
        """``(p.grad, p.grad_variance)`` of the cycle including this call (None: no grad)."""
        updates: dict[nn.Parameter, tuple[Tensor, Tensor] | None] = {}
        for param in params:
            stats = call.statistics.get(param)
            old_grad, old_variance = previous.get(param, (None, None))
            if stats is None and old_grad is None:
                updates[param] = None
            elif self._examples_in_cycle == 0:
                updates[param] = (stats.grad, _single_batch_variance(
                    stats.grad, stats.sum_grad_squared, call.units))
            else:
                updates[param] = self._combine(param, old_grad, old_variance, stats, call)
        return updates

    def _combine(self, param, old_grad, old_variance, stats, call):
        """Statistics of the concatenation of the cycle so far and this call's batch."""
        zeros = torch.zeros_like(param)
        old_grad = zeros if old_grad is None else old_grad
        old_variance = zeros if old_variance is None else old_variance
        new_grad = zeros if stats is None else stats.grad
        new_sgs = zeros if stats is None else stats.sum_grad_squared
        old_n, old_u = self._examples_in_cycle, self._units_in_cycle
        first_old, second_old = _sums_from_grad_variance(
            old_grad, old_variance, old_n, old_u, self.reduction)
        first_new, second_new = _sums_from_contributions(
            new_grad, new_sgs, call.examples, call.units, self.reduction)
        return _grad_variance_from_sums(
            first_old + first_new, second_old + second_new,
            old_n + call.examples, old_u + call.units, self.reduction)

    # -- distributed ---------------------------------------------------------------------
    def _all_reduce(
        self,
        result: EngineResult | None,
        examples: int,
        params: list[nn.Parameter],
        failed: bool,
    ) -> _CallResult:
        """Sum ``(S1, S2)`` per parameter and ``(N, U, loss)`` over the ranks.

        Bucketed: flat buffers of at most ``bucket_cap_mb`` per device and communication
        dtype (float64 stays float64, everything else travels as float32), each launched
        asynchronously as soon as it is packed. The first buffer also carries the counts,
        the loss, a has-gradient flag per parameter and a failure flag, so the usual case
        is exactly one all-reduce per call.
        """
        statistics = {} if result is None else result.statistics
        units = 0 if result is None else result.batch_size
        loss_sum = 0.0
        if result is not None:
            loss_sum = float(result.loss) * (examples if self.reduction == "mean" else 1)
        meta = [float(examples), float(units), loss_sum, float(failed)]
        meta += [1.0 if p in statistics else 0.0 for p in params]
        buckets = _plan_buckets(params, self.bucket_cap_mb)
        pending = []
        for index, bucket in enumerate(buckets):
            pieces = []
            for param in bucket:
                dtype = _communication_dtype(param)
                stats = statistics.get(param)
                if stats is None:
                    pieces.append(torch.zeros(2 * param.numel(), dtype=dtype,
                                              device=param.device))
                    continue
                first, second = _sums_from_contributions(
                    stats.grad.to(dtype), stats.sum_grad_squared.to(dtype), examples, units,
                    self.reduction)
                pieces += [first.reshape(-1), second.reshape(-1)]
            if index == 0:
                pieces.append(torch.tensor(meta, dtype=pieces[0].dtype,
                                           device=pieces[0].device))
            buffer = torch.cat(pieces)
            work = dist.all_reduce(buffer, group=self.process_group, async_op=True)
            pending.append((bucket, buffer, work))
        reduced: dict[nn.Parameter, tuple[Tensor, Tensor]] = {}
        meta_tensor = None
        for index, (bucket, buffer, work) in enumerate(pending):
            work.wait()
            offset = 0
            for param in bucket:
                size = param.numel()
                reduced[param] = (buffer[offset:offset + size].view(param.shape),
                                  buffer[offset + size:offset + 2 * size].view(param.shape))
                offset += 2 * size
            if index == 0:
                meta_tensor = buffer[offset:].tolist()
        total_examples, total_units = int(round(meta_tensor[0])), int(round(meta_tensor[1]))
        failures = int(round(meta_tensor[3]))
        if failed:
            return _CallResult(torch.zeros(()), 0, 0, {})  # the caller re-raises its error
        if failures:
            raise RuntimeError(
                f"GradientVariance.backward failed on {failures} other rank(s) (see their "
                "error); this rank's p.grad and p.grad_variance are left as before the call."
            )
        if total_examples == 0:
            raise ValueError(
                "the global batch is empty on every rank: give at least 2 examples in total."
            )
        flags = meta_tensor[4:]
        out: dict[nn.Parameter, ParameterStatistics] = {}
        for param, flag in zip(params, flags):
            if flag < 0.5:
                continue  # no rank produced a gradient: p.grad stays None, as on one process
            first, second = reduced[param]
            grad, sgs = _contributions_from_sums(first, second, total_examples, total_units,
                                                 self.reduction)
            out[param] = ParameterStatistics(grad.to(param.dtype), sgs.to(param.dtype))
        if self.reduction == "mean":
            loss = torch.tensor(meta_tensor[2] / total_examples)
        else:
            loss = torch.tensor(meta_tensor[2])
        return _CallResult(loss, total_examples, total_units, out)


# -- the maths of combining batches (module docstring) ---------------------------------------
def _single_batch_variance(grad: Tensor, sum_grad_squared: Tensor, units: int) -> Tensor:
    """``s_hat = (B sum_n c_n^2 - grad^2) / (B - 1)``, clamped at 0 (float cancellation)."""
    # scale by the integer B before cancelling (folding 1/(B-1) in first rounds the two
    # large terms apart: tests/test_amp.py's high signal-to-noise case loses digits)
    variance = sum_grad_squared.mul(units).addcmul_(grad, grad, value=-1.0)
    return variance.div_(units - 1).clamp_(min=0.0)


def _sums_from_contributions(grad: Tensor, sum_grad_squared: Tensor, examples: int,
                             units: int, reduction: str) -> tuple[Tensor, Tensor]:
    """``(S1, S2)`` from an engine's ``grad = sum_u c_u`` and ``sum_u c_u^2``.

    A unit of ``m = N/U`` examples with mean gradient ``G_u`` contributes ``c_u = G_u/U``
    (mean loss) or ``m G_u`` (sum loss) and stands for ``m`` examples of gradient ``G_u``
    in ``S2 = sum_u m G_u^2``.
    """
    if examples == 0:
        return torch.zeros_like(grad), torch.zeros_like(grad)
    if reduction == "mean":
        return grad * examples, sum_grad_squared * (examples * units)
    return grad.clone(), sum_grad_squared * (units / examples)


def _contributions_from_sums(first: Tensor, second: Tensor, examples: int, units: int,
                             reduction: str) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`_sums_from_contributions` for the combined batch."""
    if reduction == "mean":
        return first / examples, second / (examples * units)
    return first.clone(), second * (examples / units)


def _sums_from_grad_variance(grad: Tensor, variance: Tensor, examples: int, units: int,
                             reduction: str) -> tuple[Tensor, Tensor]:
    """``(S1, S2)`` recovered from ``p.grad`` and ``p.grad_variance`` of ``N`` examples."""
    if reduction == "mean":
        first = grad * examples
        return first, variance * ((units - 1) * examples) + grad * grad * examples
    second = variance * ((units - 1) / examples) + grad * grad / examples
    return grad, second


def _grad_variance_from_sums(first: Tensor, second: Tensor, examples: int, units: int,
                             reduction: str) -> tuple[Tensor, Tensor]:
    """``p.grad`` and ``s_hat`` (clamped at 0) from ``(S1, S2, N, U)``."""
    spread = second - first * first / examples  # sum_u m_u (G_u - gbar)^2
    if reduction == "mean":
        return first / examples, (spread / ((units - 1) * examples)).clamp_(min=0.0)
    return first, (spread * (examples / (units - 1))).clamp_(min=0.0)


# -- helpers ------------------------------------------------------------------------------
def _current_scale(scaler: torch.amp.GradScaler | None) -> float | None:
    """The scaler's current scale (initialising it), or None without an enabled scaler."""
    if scaler is None or not scaler.is_enabled():
        return None
    if scaler._scale is None:
        # the same lazy initialisation scaler.scale(loss) performs on its first call
        scaler.scale(torch.ones((), device=_scaler_device(scaler)))
    return scaler.get_scale()


def _scaler_device(scaler: torch.amp.GradScaler) -> torch.device:
    device = getattr(scaler, "_device", "cuda")
    return torch.device(device)


def _scaled_loss(loss_fn: LossFunction, scaler: torch.amp.GradScaler) -> LossFunction:
    """``loss_fn`` multiplied by the scaler's scale, exactly as ``scaler.scale(loss)``."""

    def scaled(outputs, targets):
        return scaler.scale(loss_fn(outputs, targets))

    return scaled


def _active_autocast(device_type: str) -> tuple[str, torch.dtype] | None:
    """``(device_type, dtype)`` of an enclosing ``torch.autocast``, or None."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


class _AutocastForward(nn.Module):
    """Runs ``module``'s forward under autocast, so engines can do the rest outside it.

    Holds ``module`` as its only child: parameters, hooks and per-layer engines see the
    very same modules (qualified names gain a ``module.`` prefix).
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args)


def _autocast_loss(loss_fn: LossFunction, device_type: str, dtype: torch.dtype) -> LossFunction:
    def loss_under_autocast(outputs, targets):
        # as under the user's autocast: e.g. cross_entropy upcasts to float32 there
        with torch.autocast(device_type, dtype=dtype):
            return loss_fn(outputs, targets)

    return loss_under_autocast


def _in_parameter_dtype(result: EngineResult) -> EngineResult:
    """Engines' statistics in each parameter's dtype (BackPACK keeps autocast's bfloat16)."""
    for param, stats in result.statistics.items():
        if stats.grad.dtype != param.dtype or stats.sum_grad_squared.dtype != param.dtype:
            result.statistics[param] = ParameterStatistics(
                stats.grad.to(param.dtype), stats.sum_grad_squared.to(param.dtype))
    return result


def _all_finite(tensors: list[Tensor]) -> bool:
    """True if no element is NaN or Inf; one host sync in the usual case.

    A NaN or Inf element makes its tensor's sum NaN or Inf, so finite sums settle it (a
    sum is ~8x cheaper than ``isfinite(t).all()`` on CPU). A non-finite sum may also come
    from large finite values that overflow; the exact per-element test decides then.
    """
    if not tensors:
        return True
    if bool(torch.stack([t.sum() for t in tensors]).isfinite().all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _communication_dtype(param: Tensor) -> torch.dtype:
    # float16/bfloat16 sums of squares would lose most digits (and overflow sooner)
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _plan_buckets(params: list[nn.Parameter], cap_mb: float) -> list[list[nn.Parameter]]:
    """Consecutive parameters of one device and communication dtype, <= ``cap_mb`` each."""
    cap = cap_mb * 1024 * 1024
    buckets: list[list[nn.Parameter]] = []
    key = None
    size = 0.0
    for param in params:
        dtype = _communication_dtype(param)
        nbytes = 2 * param.numel() * torch.empty((), dtype=dtype).element_size()
        this_key = (param.device, dtype)
        if not buckets or this_key != key or (size + nbytes > cap and buckets[-1]):
            buckets.append([])
            key, size = this_key, 0.0
        buckets[-1].append(param)
        size += nbytes
    return buckets
