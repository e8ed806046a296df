"""``GradientVariance``: one backward pass that leaves ``p.grad`` and ``p.grad_variance``.

``p.grad_variance`` is the unbiased within-batch estimate of the variance of ``p.grad``
(the paper's App. D and Alg. 5; docs/maths.md, "The within-batch estimate s_hat", (M12)).
In terms of the contributions ``c_n`` of the ``B`` examples to the gradient
(``p.grad = sum_n c_n``, see :mod:`msvag_mb.engines.base`), (M13):

    s_hat = (B * sum_n c_n^2 - p.grad^2) / (B - 1)

which is ``1/(B(B-1)) sum_n (g_n - gbar)^2`` for a mean-reduced loss and ``B^2`` times that
for a sum-reduced one: the scale of ``p.grad`` in both cases.

This module runs the accumulation cycle: several calls before one optimizer step give the
statistics of the concatenated batch (docs/maths.md, "Accumulation"; a new cycle starts
after ``optimizer.zero_grad()`` or :meth:`GradientVariance.zero_grad`). Each call is a few named steps --
:meth:`~GradientVariance._prepare` (choose the engine, validate, snapshot), run the engine,
reduce over the ranks, combine with the cycle so far, check finiteness, commit -- and a
failure in any of them goes through one restore. The pieces live in their own modules:
the engine choice in :mod:`msvag_mb.engines.selection`, the algebra of combining batches
in :mod:`msvag_mb.batch_statistics`, the all-reduce with ``DistributedDataParallel`` in
:mod:`msvag_mb.statistics_allreduce` (docs/scaling_out.md), autocast and GradScaler in
:mod:`msvag_mb.mixed_precision`, and the ``p.grad_variance`` contract in
:mod:`msvag_mb.param_variance`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .batch_statistics import BatchStatistics, CycleSoFar, combined_statistics
from .engines import Engine, EngineResult, engine_candidates, engine_from, select_engine
from .engines.base import LossFunction
from .mixed_precision import (
    current_scale,
    engine_call_setup,
    in_parameter_dtype,
    unscaled_since_update,
)
from .model_checks import UnsupportedModelError, batch_size_of
from .param_variance import all_finite, clear_grad_variance, set_grad_variance
from .statistics_allreduce import DEFAULT_BUCKET_CAP_MB, all_reduce_statistics, report_failure


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


def _unwrap_ddp(model: nn.Module) -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None]:
    """``(the module the engines run on, the DDP wrapper or None)``."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return model, None
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
    return model.module, model


def _carried_state(model: nn.Module):
    """The state a model carries from call to call (``get_state``/``set_state``, the
    ``CarriesState`` protocol of the problems), or ``None``: a refused forward pass may
    have advanced it, and the next engine must start where the refused one did."""
    get_state, set_state = getattr(model, "get_state", None), getattr(model, "set_state", None)
    return get_state() if callable(get_state) and callable(set_state) else None


@dataclass
class _Cycle:
    """The accumulation cycle so far: ``N``, ``U``, the GradScaler scale of its calls, and
    the ``(p.grad, its version, p.grad_variance)`` that the last call left."""

    examples: int = 0
    units: int = 0
    scale: float | None = None
    last: dict[nn.Parameter, tuple[Tensor, int, Tensor]] = field(default_factory=dict)


@dataclass
class _Call:
    """One :meth:`GradientVariance.backward` call in flight."""

    params: list[nn.Parameter]
    engine: Engine
    #: with ``engine="auto"``: the engines to try next if ``engine`` refuses the model
    #: while running it (before any backward pass)
    fallbacks: list[Engine]
    local_examples: int
    scale: float | None  # the GradScaler's scale, None without one
    continues: bool  # adds to the cycle so far (else starts a new one)
    #: ``(p.grad, p.grad_variance)`` before the call: what a failure restores
    snapshot: dict[nn.Parameter, tuple[Tensor | None, Tensor | None]]


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
        self.model, self.ddp_model = _unwrap_ddp(model)
        self.process_group = None if self.ddp_model is None else self.ddp_model.process_group
        if bucket_cap_mb <= 0:
            raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb} (must be > 0)")
        self.bucket_cap_mb = bucket_cap_mb
        self.loss_fn = loss_fn
        self.reduction = _resolve_reduction(loss_fn, reduction)
        if self.ddp_model is not None and self.reduction is None:
            raise ValueError(
                "with DistributedDataParallel, GradientVariance needs the loss reduction "
                "to combine the ranks' batches: pass reduction='mean' or 'sum' (or use an "
                "nn loss module)."
            )
        self._engine: Engine | None = engine_from(engine)  # None: "auto", chosen per call
        self._last_engine: Engine | None = None
        self._cycle = _Cycle()

    @property
    def is_distributed(self) -> bool:
        """True when the model is a DDP model: statistics are those of the global batch."""
        return self.ddp_model is not None

    # -- engine choice -------------------------------------------------------------------
    def select_engine(self) -> Engine:
        """The engine the next :meth:`backward` tries first; raises if none is correct.

        With ``engine="auto"`` a call moves on to the next correct engine when this one
        refuses the model while running it (e.g. a layer called twice, or examples merged
        by ``x.flatten(0, 1)``: visible only in the forward pass, before any backward).
        """
        return select_engine(self.model, self._engine)

    @property
    def engine_name(self) -> str:
        """Name of the engine that computed the last call's statistics or, before any call,
        of the engine :meth:`backward` tries first."""
        if self._last_engine is not None:
            return self._last_engine.name
        return self.select_engine().name

    # -- accumulation cycle --------------------------------------------------------------
    def zero_grad(self) -> None:
        """Start a new accumulation cycle: clear ``p.grad`` and ``p.grad_variance``."""
        for param in self._trainable_parameters():
            param.grad = None
            clear_grad_variance(param)
        self._cycle = _Cycle()

    def _trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _cycle_continues(self, params: list[nn.Parameter]) -> bool:
        """True if every result of the previous call is still in place, untouched."""
        if self._cycle.examples == 0 or not self._cycle.last:
            return False
        for param, (grad, version, variance) in self._cycle.last.items():
            if param.grad is not grad or grad._version != version:
                return False
            if getattr(param, "grad_variance", None) is not variance:
                return False
        return all(p.grad is None or p in self._cycle.last for p in params)

    def _start_cycle(self, params: list[nn.Parameter]) -> None:
        for param in params:
            if param.grad is not None and bool(param.grad.any()):
                raise RuntimeError(
                    "p.grad already holds a gradient that GradientVariance did not compute "
                    "(e.g. from loss.backward(), or one that scaler.unscale_ changed); call "
                    "optimizer.zero_grad() before GradientVariance.backward."
                )
            clear_grad_variance(param)
        self._cycle = _Cycle()

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
        call = self._prepare(inputs, scaler)
        try:
            batch = self._batch_statistics(call, inputs, targets, scaler)
            self._check_units(call, batch)
            so_far = CycleSoFar(self._cycle.examples, self._cycle.units,
                                call.snapshot if call.continues else {})
            updates = combined_statistics(call.params, so_far, batch, self.reduction)
            finite = self._check_finite(call, batch, updates)
        except BaseException:
            self._restore(call)
            raise
        self._commit(call, batch, updates, finite)
        return batch.loss if call.scale is None else batch.loss / call.scale

    def _prepare(self, inputs: Tensor | Sequence[Tensor],
                 scaler: torch.amp.GradScaler | None) -> _Call:
        """Choose the engine and validate the call (starting a new cycle if the previous
        call's results are gone); raises before any gradient changes."""
        params = self._trainable_parameters()
        if not params:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        local_examples = batch_size_of(inputs)
        engine, *fallbacks = engine_candidates(self.model, self._engine)
        self._check_engine_fits(engine)
        fallbacks = [e for e in fallbacks if self._engine_fits(e)]
        scale = current_scale(scaler)
        continues = self._cycle_continues(params)
        if continues:
            self._check_cycle_can_continue(scale, scaler)
        else:
            self._start_cycle(params)
            self._check_batch_has_variance(engine, local_examples)
        snapshot = {p: (p.grad, getattr(p, "grad_variance", None)) for p in params}
        return _Call(params, engine, fallbacks, local_examples, scale, continues, snapshot)

    def _engine_fits(self, engine: Engine) -> bool:
        if engine.needs_distributed:
            return self.is_distributed
        return engine.supports_distributed or not self.is_distributed

    def _check_engine_fits(self, engine: Engine) -> None:
        """Refuse an engine whose declared needs the model's (non-)DDP setting cannot meet."""
        if engine.needs_distributed and not self.is_distributed:
            raise ValueError(
                f"engine '{engine.name}' takes the spread of the ranks' gradients: wrap the "
                "model in torch.nn.parallel.DistributedDataParallel and run >= 2 processes "
                "(torchrun --nproc_per_node=2 ...), or use a per-example engine."
            )
        if self.is_distributed and not engine.supports_distributed:
            raise ValueError(
                f"engine '{engine.name}' runs on one process only: with "
                "DistributedDataParallel its units would be formed on every rank apart, "
                "and BatchNorm running statistics updated without DDP's buffer broadcast "
                "would drift apart between the ranks. Use engine='rank_spread' (the ranks "
                "as the units) or variance='moving_average'."
            )

    def _check_cycle_can_continue(self, scale: float | None,
                                  scaler: torch.amp.GradScaler | None) -> None:
        if self.reduction is None:
            raise ValueError(
                "accumulating several GradientVariance.backward calls needs the loss "
                "reduction: pass reduction='mean' or 'sum' to GradientVariance (or use an "
                "nn loss module), or call optimizer.zero_grad() between batches."
            )
        if scale != self._cycle.scale:
            raise ValueError(
                f"the loss scale changed within an accumulation cycle ({self._cycle.scale} "
                f"-> {scale}): pass the same scaler to every call of the cycle and call "
                "scaler.update() only after scaler.step(optimizer) and zero_grad()."
            )
        if unscaled_since_update(scaler):
            raise ValueError(
                "scaler.unscale_(optimizer) (or scaler.step) ran within this accumulation "
                "cycle: p.grad is no longer in the loss-scaled units the next call adds to. "
                "Call scaler.unscale_ and scaler.step only after the cycle's last "
                "GradientVariance.backward (and optimizer.zero_grad() before the next cycle)."
            )

    def _check_batch_has_variance(self, engine: Engine, local_examples: int) -> None:
        """Refuse too few examples up front where they are the units (one process)."""
        # engines with other units check their own (ghost groups), or after the all-reduce
        if (not self.is_distributed and engine.units_are_examples
                and local_examples < engine.min_units):
            raise ValueError(
                f"a batch of {local_examples} example has no within-batch variance: use "
                f"a batch of at least {engine.min_units} examples (or "
                "variance='moving_average')."
            )

    def _batch_statistics(self, call: _Call, inputs: Tensor | Sequence[Tensor],
                          targets: Tensor,
                          scaler: torch.amp.GradScaler | None) -> BatchStatistics:
        """Run the engine and, with DDP, all-reduce: this call's (global) statistics."""
        for param in call.params:
            param.grad = None
        try:
            result = self._run_engine(call, inputs, targets, scaler)
        except Exception:
            if self.is_distributed:
                # take part in the collective anyway, flagged, so the other ranks raise
                # instead of waiting forever in their all-reduce
                report_failure(call.params, self.reduction, bucket_cap_mb=self.bucket_cap_mb,
                               group=self.process_group)
            raise
        if self.is_distributed:
            return all_reduce_statistics(result, call.local_examples, call.params,
                                         self.reduction, bucket_cap_mb=self.bucket_cap_mb,
                                         group=self.process_group)
        return BatchStatistics(result.loss, call.local_examples, result.units,
                               result.statistics)

    def _run_engine(self, call: _Call, inputs: Tensor | Sequence[Tensor], targets: Tensor,
                    scaler: torch.amp.GradScaler | None) -> EngineResult | None:
        """The engine's result for the local batch (None: an empty share of a DDP batch).

        An engine that refuses the model while running it (before any backward pass) hands
        the call to the next of ``call.fallbacks`` (``engine="auto"``), with the model's
        carried state as it was."""
        if call.local_examples == 0 and self.is_distributed:
            return None
        state = _carried_state(self.model) if call.fallbacks else None
        refusals = []
        while True:
            model, loss_fn, context = engine_call_setup(
                call.engine, self.model, self.loss_fn, call.params[0].device.type, scaler,
                call.scale)
            try:
                with context:
                    result = call.engine.compute(model, loss_fn, inputs, targets, call.params,
                                                 self.reduction)
                return in_parameter_dtype(result)
            except UnsupportedModelError as error:
                refusals.append(f"  {call.engine.name}: {error}")
                if not call.fallbacks:
                    if len(refusals) == 1:
                        raise
                    raise UnsupportedModelError(
                        "engine='auto' found no engine that computes correct per-example "
                        "statistics for this model and batch (each refused while running "
                        "it):\n" + "\n".join(refusals)) from error
            for param in call.params:
                param.grad = None  # an engine may refuse after its backward pass
            if state is not None:
                self.model.set_state(state)
            call.engine = call.fallbacks.pop(0)

    def _check_units(self, call: _Call, batch: BatchStatistics) -> None:
        if batch.units < call.engine.min_units and not call.continues:
            where = " over all ranks" if self.is_distributed else ""
            raise ValueError(
                f"engine '{call.engine.name}' returned {batch.units} independent unit(s)"
                f"{where}; the within-batch variance needs at least {call.engine.min_units}: "
                "use a larger batch."
            )

    @staticmethod
    def _check_finite(call: _Call, batch: BatchStatistics,
                      updates: dict[nn.Parameter, tuple[Tensor, Tensor] | None]) -> bool:
        """Whether every new gradient and variance is finite; raises without a scaler."""
        finite = all_finite([t for pair in updates.values() if pair for t in pair])
        if not finite and call.scale is None:
            raise FloatingPointError(
                "the gradient or its within-batch variance contains NaN or Inf (loss "
                f"{float(batch.loss):.4g}); p.grad and p.grad_variance are left as before "
                "this call. Check the data, the loss and the step size, or train with "
                "torch.amp.GradScaler (backward(..., scaler=scaler)), whose "
                "scaler.step(optimizer) skips such steps."
            )
        return finite

    def _restore(self, call: _Call) -> None:
        """Put ``p.grad`` and ``p.grad_variance`` back as they were before the call."""
        for param in call.params:
            grad, variance = call.snapshot.get(param, (None, None))
            param.grad = grad
            if variance is None:
                clear_grad_variance(param)
            else:
                set_grad_variance(param, variance, scale=self._cycle.scale)

    def _commit(self, call: _Call, batch: BatchStatistics,
                updates: dict[nn.Parameter, tuple[Tensor, Tensor] | None],
                finite: bool) -> None:
        """Leave the cycle's statistics in ``p.grad`` / ``p.grad_variance``."""
        self._cycle.last.clear()
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
            set_grad_variance(param, variance, scale=call.scale)
            self._cycle.last[param] = (grad, grad._version, variance)
        self._cycle.examples += batch.examples
        self._cycle.units += batch.units
        self._cycle.scale = call.scale
        self._last_engine = call.engine
