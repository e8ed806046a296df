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
after ``optimizer.zero_grad()`` or :meth:`GradientVariance.zero_grad`). Each call is a few
named steps -- :meth:`~GradientVariance._prepare` (choose the engine, validate, snapshot),
run the engine, reduce over the ranks, combine with the cycle so far, check finiteness,
commit -- and a failure in any of them goes through one restore.
:meth:`GradientVariance.collect` runs the same steps around a forward and backward that
the user writes (the engine's :class:`~msvag_mb.engines.base.CollectSession`, watched by
:mod:`msvag_mb.collect`). The pieces live in their own modules: the engine choice in
:mod:`msvag_mb.engines.selection`, the algebra of combining batches in
:mod:`msvag_mb.batch_statistics`, the all-reduce with ``DistributedDataParallel`` in
:mod:`msvag_mb.statistics_allreduce` (docs/scaling_out.md), autocast and GradScaler in
:mod:`msvag_mb.mixed_precision`, and the ``p.grad_variance`` contract in
:mod:`msvag_mb.param_variance`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .batch_statistics import (
    BatchStatistics,
    CombinedStatistics,
    CycleSoFar,
    combined_statistics,
)
from .collect import (
    GradientWrites,
    RootForwardWatch,
    UsesOutsideModel,
    example_tensors,
    infer_batch_size,
)
from .engines import (
    Engine,
    EngineResult,
    auto_candidates,
    engine_candidates,
    engine_from,
    select_engine,
)
from .engines.selection import checked_for, next_supported_engine
from .engines.base import CollectSession, LossFunction, ParameterStatistics
from .engines.independence import check_examples_independent
from .mixed_precision import (
    current_scale,
    engine_call_setup,
    in_parameter_dtype,
    unscaled_since_update,
)
from .model_checks import UnsupportedModelError, batch_size_of, carried_state, qualified_names
from .param_variance import all_finite, clear_grad_variance, set_grad_variance
from .statistics_allreduce import DEFAULT_BUCKET_CAP_MB, StatisticsStream


def _resolve_reduction(loss_fn: LossFunction | None, reduction: str | None) -> str | None:
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


@dataclass
class _Cycle:
    """The accumulation cycle so far: ``N``, ``U``, the GradScaler scale of its calls, and
    the ``(p.grad, its version, p.grad_variance)`` that the last call left."""

    examples: int = 0
    units: int = 0
    scale: float | None = None
    reduction: str | None = None
    last: dict[nn.Parameter, tuple[Tensor, int, Tensor]] = field(default_factory=dict)


@dataclass
class _Call:
    """One :meth:`GradientVariance.backward` call or :meth:`GradientVariance.collect`
    block in flight."""

    params: list[nn.Parameter]
    engine: Engine
    #: with ``engine="auto"``: the engines to try next if ``engine`` refuses the model
    #: while running it (before any backward pass); each checks the model only then
    fallbacks: list[type[Engine]]
    local_examples: int | None  # None: a collect block before the model's forward
    scale: float | None  # the GradScaler's scale, None without one
    continues: bool  # adds to the cycle so far (else starts a new one)
    #: ``(p.grad, p.grad_variance)`` before the call: what a failure restores
    snapshot: dict[nn.Parameter, tuple[Tensor | None, Tensor | None]]
    reduction: str | None  # of the loss whose gradient the call adds
    loss_known: bool = True  # False in collect: the user's loss is not seen


class GradientVariance:
    """Compute ``p.grad`` and the within-batch gradient variance ``p.grad_variance``.

    Args:
        model: the network; examples lie along dim 0 of its inputs. A
            :class:`torch.nn.parallel.DistributedDataParallel` model makes every rank's
            ``p.grad`` and ``p.grad_variance`` those of the *global* batch (all ranks'
            examples, unequal local batch sizes included); see docs/scaling_out.md.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, mean- or sum-reduced over
            examples, for :meth:`backward`. It must not contain terms that belong to no
            example (put L2 regularisation in the optimizer's ``weight_decay``). Optional:
            :meth:`collect` runs without one (the loss is written in the block).
        engine: ``"auto"`` (default: the fastest engine that is correct for the model),
            a registered name (``"extensions"``, ``"backpack"``, ``"vmap"``,
            ``"ghost_batch"``, ``"rank_spread"``) or an :class:`~msvag_mb.engines.Engine`
            instance such as ``GhostBatchEngine(groups=8)``.
        reduction: ``"mean"`` or ``"sum"``; read from ``loss_fn.reduction`` when it has
            one. Needed for accumulation across calls, for ghost batches and with DDP
            (:meth:`collect` takes its own ``reduction=``, defaulting to this one).
        bucket_cap_mb: with DDP, the statistics travel in all-reduce buffers of at most
            this size (MiB; the first at most 1 MiB), planned in the order the gradients
            become ready, as DDP's buckets.
        stream_statistics: with DDP and an engine that declares ``streams_statistics``
            (``extensions``), launch each buffer's all-reduce during the backward pass as
            soon as its parameters' statistics are final, overlapping the rest of the
            backward; ``False``: all of them after it. The results are bitwise the same.

    Example::

        gv = GradientVariance(model, nn.CrossEntropyLoss(), engine="auto")
        opt = MSVAG(model.parameters(), lr=0.1, variance="minibatch")
        opt.zero_grad()
        loss = gv.backward(x, y)                  # or gv.backward(x, y, scaler=scaler)
        opt.step()                                # or scaler.step(opt); scaler.update()

        gv = GradientVariance(model)              # your own forward and loss instead
        with gv.collect():
            loss = my_loss(model(x, mask=m), y)
            loss.backward()
        opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction | None = None,
        engine: str | Engine = "auto",
        reduction: str | None = None,
        *,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        stream_statistics: bool = True,
    ) -> None:
        self.model, self.ddp_model = _unwrap_ddp(model)
        self.process_group = None if self.ddp_model is None else self.ddp_model.process_group
        if bucket_cap_mb <= 0:
            raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb} (must be > 0)")
        self.bucket_cap_mb = bucket_cap_mb
        self.stream_statistics = stream_statistics
        self.loss_fn = loss_fn
        self.reduction = _resolve_reduction(loss_fn, reduction)
        if self.ddp_model is not None and self.reduction is None and loss_fn is not None:
            raise ValueError(
                "with DistributedDataParallel, GradientVariance needs the loss reduction "
                "to combine the ranks' batches: pass reduction='mean' or 'sum' (or use an "
                "nn loss module)."
            )
        self._engine: Engine | None = engine_from(engine)  # None: "auto", chosen per call
        self._last_engine: Engine | None = None
        self._cycle = _Cycle()
        self._open_block: _CollectBlock | None = None

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
        self._check_no_open_block("gv.zero_grad()")
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
        if self.loss_fn is None:
            raise ValueError(
                "GradientVariance was created without a loss_fn, so backward(inputs, "
                "targets) has no loss to compute: pass one (GradientVariance(model, "
                "loss_fn)), or run your own forward and backward inside gv.collect().")
        self._check_no_open_block("backward")
        call = self._prepare(inputs, scaler)
        try:
            batch = self._batch_statistics(call, inputs, targets, scaler)
            updates, finite = self._combine(call, batch)
        except BaseException:
            self._restore(call)
            raise
        self._commit(call, batch, updates, finite)
        return batch.loss if call.scale is None else batch.loss / call.scale

    def collect(self, batch_size: int | None = None, *, reduction: str | None = None,
                scaler: torch.amp.GradScaler | None = None) -> "_CollectBlock":
        """A block in which your own forward and backward leave ``p.grad`` and
        ``p.grad_variance``, as :meth:`backward` would::

            with gv.collect():                     # or gv.collect(batch_size=B)
                loss = my_loss(model(x, mask=m), y)
                loss.backward()                    # or scaler.scale(loss).backward()
            opt.step()

        Inside the block run exactly one forward of the model and one backward of a loss
        that is a sum or a mean of per-example terms (examples along dim 0 of the model's
        tensor arguments); see docs/your_training_loop.md. ``p.grad_variance`` is exact for
        that loss: the engine reads each example's contribution as the gradient carries it,
        so a mean loss, a sum loss or a constant factor need no declaration for one block.
        Accumulation (several blocks, or blocks and :meth:`backward` calls, before one
        optimizer step), the NaN/Inf rules and DDP behave as with :meth:`backward`.

        Args:
            batch_size: the number of examples; default: dim 0 of the tensor arguments of
                the model's forward, which must agree (else pass it).
            reduction: ``"mean"`` or ``"sum"``: how the block's loss reduces over the
                examples. Needed to accumulate several blocks and with DDP; defaults to the
                ``reduction`` of this ``GradientVariance``.
            scaler: the :class:`torch.amp.GradScaler` whose ``scaler.scale(loss)`` you
                backpropagate in the block (its scale is recorded as in :meth:`backward`).

        Raises (before any backward pass, leaving everything as before the block):
            ValueError: the engine cannot serve a block (``vmap`` and ghost batches run the
                model themselves; the message names an engine that works), or the batch
                size is ambiguous.
            UnsupportedModelError: inside the model's forward, as the engine refuses; or in
                your code, where it uses a parameter outside the model's forward.
        """
        self._check_no_open_block("gv.collect()")
        if reduction is not None:
            reduction = _resolve_reduction(None, reduction)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 0):
            raise ValueError(f"Invalid batch_size: {batch_size!r} (a number of examples)")
        return _CollectBlock(self, batch_size, reduction or self.reduction, scaler)

    def _collect_engines(self, after: str | None = None) -> list[Engine]:
        """The engine a collect block uses, as a list of one: ``engine`` if it serves
        collect and supports the model, or the first that ``"auto"`` may choose that does
        (``after``: the first after that one, for a refusal's hint; the rest are not
        checked, which costs every call otherwise)."""
        if self._engine is not None:
            if after is not None:
                return []
            if not self._engine.serves_collect:
                raise ValueError(self._not_serving_collect(self._engine))
            engines = [select_engine(self.model, self._engine)]
        else:
            candidates = [cls for cls in auto_candidates() if cls.serves_collect]
            if after is not None:
                names = [cls.name for cls in candidates]
                candidates = candidates[names.index(after) + 1:] if after in names else []
            engines = next(([cls()] for cls in candidates if self._engine_fits(cls)
                            and cls.unsupported_reason(self.model) is None), [])
            if after is not None:
                return engines
            if not engines:
                reasons = [f"  {cls.name}: {cls.unsupported_reason(self.model)}"
                           for cls in auto_candidates() if cls.serves_collect]
                raise UnsupportedModelError(
                    "engine='auto' found no engine that serves gv.collect() and computes "
                    "correct per-example statistics for this model:\n" + "\n".join(reasons)
                    + "\nUse gv.backward(inputs, targets) with a loss_fn, where 'auto' also "
                    "tries the engines that run the model themselves (vmap).")
        self._check_engine_fits(engines[0])
        return engines

    def _not_serving_collect(self, engine: Engine) -> str:
        """Why ``engine`` refuses a collect block, naming an engine that would serve it."""
        why = ("runs the model itself (its own forward passes), so it cannot take its "
               "statistics from the forward and backward you run" if engine.reruns_model
               else "does not serve gv.collect()")
        working = [cls.name for cls in auto_candidates() if cls.serves_collect
                   and self._engine_fits(cls) and cls.unsupported_reason(self.model) is None]
        fix = (f"use engine='{working[0]}' (or 'auto') with gv.collect()" if working else
               "no engine that serves gv.collect() supports this model")
        return (f"engine '{engine.name}' {why}: {fix}, or keep engine='{engine.name}' and "
                "call gv.backward(inputs, targets) with a loss_fn.")

    def _prepare(self, inputs: Tensor | Sequence[Tensor],
                 scaler: torch.amp.GradScaler | None) -> _Call:
        """Choose the engine and validate the call (starting a new cycle if the previous
        call's results are gone); raises before any gradient changes."""
        params = self._parameters_or_raise()
        local_examples = batch_size_of(inputs)
        engine, fallbacks = engine_candidates(self.model, self._engine)
        self._check_engine_fits(engine)
        fallbacks = [e for e in fallbacks if self._engine_fits(e)]
        return self._open_call(params, engine, fallbacks, local_examples, scaler,
                               self.reduction)

    def _parameters_or_raise(self) -> list[nn.Parameter]:
        params = self._trainable_parameters()
        if not params:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        return params

    def _open_call(self, params: list[nn.Parameter], engine: Engine,
                   fallbacks: list[type[Engine]],
                   local_examples: int | None, scaler: torch.amp.GradScaler | None,
                   reduction: str | None) -> _Call:
        """Validate the call against the cycle so far (starting a new cycle if the previous
        call's results are gone) and snapshot what a failure restores."""
        scale = current_scale(scaler)
        continues = self._cycle_continues(params)
        if continues:
            self._check_cycle_can_continue(scale, scaler, reduction)
        else:
            self._start_cycle(params)
            if local_examples is not None:
                self._check_batch_has_variance(engine, local_examples)
        snapshot = {p: (p.grad, getattr(p, "grad_variance", None)) for p in params}
        return _Call(params, engine, fallbacks, local_examples, scale, continues, snapshot,
                     reduction)

    def _combine(self, call: _Call, batch: BatchStatistics
                 ) -> tuple[dict[nn.Parameter, tuple[Tensor, Tensor] | None], bool]:
        """This call's statistics combined with the cycle so far, and whether all finite."""
        self._check_units(call, batch)
        so_far = CycleSoFar(self._cycle.examples, self._cycle.units,
                            call.snapshot if call.continues else {})
        combined = combined_statistics(call.params, so_far, batch, call.reduction)
        return combined.updates, self._check_finite(call, batch, combined)

    def _check_no_open_block(self, what: str) -> None:
        if self._open_block is not None:
            raise RuntimeError(
                f"{what} inside an open gv.collect() block: a block holds one forward and "
                "one backward of the model; finish it first.")

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
                                  scaler: torch.amp.GradScaler | None,
                                  reduction: str | None) -> None:
        if reduction is None:
            raise ValueError(
                "accumulating several GradientVariance.backward calls (or gv.collect() "
                "blocks) needs the loss reduction: pass reduction='mean' or 'sum' to "
                "GradientVariance (or use an nn loss module) or to gv.collect(), or call "
                "optimizer.zero_grad() between batches."
            )
        if self._cycle.reduction is not None and reduction != self._cycle.reduction:
            raise ValueError(
                f"the loss reduction changed within an accumulation cycle "
                f"({self._cycle.reduction!r} -> {reduction!r}): use one reduction per cycle.")
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
        stream = self._open_stream(call)
        try:
            result = self._run_engine(call, inputs, targets, scaler, stream)
        except Exception:
            if stream is not None:
                # take part in the collective anyway, flagged, so the other ranks raise
                # instead of waiting forever in their all-reduce
                stream.fail()
            raise
        if stream is not None:
            return stream.finish(result)
        return BatchStatistics(result.loss, call.local_examples, result.units,
                               result.statistics)

    def _open_stream(self, call: _Call) -> StatisticsStream | None:
        """With DDP, the call's all-reduce over the ranks (None on one process)."""
        if not self.is_distributed:
            return None
        return StatisticsStream(call.params, call.local_examples, call.reduction,
                                bucket_cap_mb=self.bucket_cap_mb, group=self.process_group)

    def _listener(self, engine: Engine, stream: StatisticsStream | None) -> dict:
        """``{"on_ready": ...}`` for an engine that streams its statistics into the
        all-reduce during the backward pass, else ``{}``."""
        if stream is None or not self.stream_statistics or not engine.streams_statistics:
            return {}
        return {"on_ready": stream.ready}

    def _run_engine(self, call: _Call, inputs: Tensor | Sequence[Tensor], targets: Tensor,
                    scaler: torch.amp.GradScaler | None,
                    stream: StatisticsStream | None) -> EngineResult | None:
        """The engine's result for the local batch (None: an empty share of a DDP batch).

        An engine that refuses the model while running it (before any backward pass) hands
        the call to the next of ``call.fallbacks`` (``engine="auto"``), with the model's
        carried state as it was -- unless it already sent statistics to the other ranks."""
        if call.local_examples == 0 and self.is_distributed:
            return None
        state = carried_state(self.model) if call.fallbacks else None
        refusals = []
        while True:
            model, loss_fn, context = engine_call_setup(
                call.engine, self.model, self.loss_fn, call.params[0].device.type, scaler,
                call.scale)
            try:
                # _prepare (or next_supported_engine below) has just checked the model
                with context, checked_for(call.engine, model):
                    result = call.engine.compute(model, loss_fn, inputs, targets, call.params,
                                                 self.reduction,
                                                 **self._listener(call.engine, stream))
                return in_parameter_dtype(result)
            except UnsupportedModelError as error:
                refusals.append(f"  {call.engine.name}: {error}")
                following = None if stream is not None and stream.launched_any else (
                    next_supported_engine(self.model, call.fallbacks, refusals))
                if following is None:
                    if len(refusals) == 1:
                        raise
                    raise UnsupportedModelError(
                        "engine='auto' found no engine that computes correct per-example "
                        "statistics for this model and batch (each refused, before or while "
                        "running it):\n" + "\n".join(refusals)) from error
            for param in call.params:
                param.grad = None  # an engine may refuse after its backward pass
            if stream is not None:
                stream.reset()
            if state is not None:
                self.model.set_state(state)
            call.engine = following

    def _check_units(self, call: _Call, batch: BatchStatistics) -> None:
        if batch.units < call.engine.min_units and not call.continues:
            where = " over all ranks" if self.is_distributed else ""
            raise ValueError(
                f"engine '{call.engine.name}' returned {batch.units} independent unit(s)"
                f"{where}; the within-batch variance needs at least {call.engine.min_units}: "
                "use a larger batch."
            )

    @staticmethod
    def _check_finite(call: _Call, batch: BatchStatistics, combined: CombinedStatistics) -> bool:
        """Whether every new gradient and variance is finite; raises without a scaler."""
        finite = all_finite([t for pair in combined.updates.values() if pair for t in pair],
                            combined.finiteness_sums)
        if not finite and call.scale is None:
            loss = f" (loss {float(batch.loss):.4g})" if call.loss_known else ""
            raise FloatingPointError(
                f"the gradient or its within-batch variance contains NaN or Inf{loss}; "
                "p.grad and p.grad_variance are left as before this call. Check the data, "
                "the loss and the step size, or train with torch.amp.GradScaler "
                "(backward(..., scaler=scaler) or collect(scaler=scaler)), whose "
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
        self._cycle.reduction = call.reduction
        self._last_engine = call.engine


class _CollectBlock:
    """One ``with gv.collect():`` block (see :meth:`GradientVariance.collect`).

    On entry: the engine is chosen, the cycle checked and ``p.grad`` set aside (this batch's
    backward writes into empty gradients); hooks watch the model's forward and the mode
    :class:`~msvag_mb.collect.UsesOutsideModel` watches the user's code. On exit: this
    batch's statistics are read, all-reduced with DDP and combined with the cycle so far
    exactly as :meth:`GradientVariance.backward` does; after any error (the user's too),
    everything is restored as before the block.
    """

    def __init__(self, owner: GradientVariance, batch_size: int | None,
                 reduction: str | None, scaler: torch.amp.GradScaler | None) -> None:
        self.owner = owner
        self.batch_size = batch_size
        self.reduction = reduction
        self.scaler = scaler
        self.call: _Call | None = None
        self._exits: list = []  # what to undo on exit, last first
        self._watch: RootForwardWatch | None = None
        self._session: CollectSession | None = None
        self._stream: StatisticsStream | None = None  # with DDP: this block's all-reduce
        self._writes: GradientWrites | None = None

    def __enter__(self) -> "_CollectBlock":
        owner = self.owner
        owner._check_no_open_block("gv.collect()")
        if owner.is_distributed and self.reduction is None:
            raise ValueError(
                "with DistributedDataParallel, gv.collect() needs the loss reduction to "
                "combine the ranks' batches: gv.collect(reduction='mean') or 'sum'.")
        params = owner._parameters_or_raise()
        engine = owner._collect_engines()[0]
        call = owner._open_call(params, engine, [], self.batch_size, self.scaler,
                                self.reduction)
        call.loss_known = False
        self.call = call
        self._stream = owner._open_stream(call)
        with checked_for(engine, owner.model):  # _collect_engines has just checked it
            self._session = engine.collect_session(owner.model, params,
                                                   **owner._listener(engine, self._stream))
        for param in params:
            param.grad = None  # this batch's backward writes into empty gradients
        try:
            self._attach(params)
        except BaseException:
            self._detach()
            owner._restore(call)
            raise
        owner._open_block = self
        return self

    def _attach(self, params: list[nn.Parameter]) -> None:
        owner = self.owner
        names = qualified_names(owner.model)
        self._exits.append(self._session.close)
        self._writes = GradientWrites(params, names)
        self._exits.append(self._writes.remove)
        self._watch = RootForwardWatch(owner.model, self._forward_starts,
                                       self._session.check_output)
        self._exits.append(self._watch.remove)
        guarded = {p: names[p] for p in self._session.guarded_parameters}
        contexts = [UsesOutsideModel(guarded, self._watch) if guarded
                    else contextlib.nullcontext()]
        # DDP's reducer would average the gradients in the backward: the statistics are
        # all-reduced on exit instead, as GradientVariance.backward does
        contexts.append(owner.ddp_model.no_sync() if owner.is_distributed
                        else contextlib.nullcontext())
        for context in contexts:
            context.__enter__()
            self._exits.append(lambda context=context: context.__exit__(None, None, None))

    def _detach(self) -> None:
        """Undo :meth:`_attach` (the session's statistics must be read before)."""
        self.owner._open_block = None
        while self._exits:
            self._exits.pop()()

    def _forward_starts(self, args: tuple, kwargs: dict) -> None:
        """The model's forward starts: the batch size, then the engine's hooks."""
        call = self.call
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = infer_batch_size(args, kwargs)
        if not call.continues:
            self.owner._check_batch_has_variance(call.engine, batch_size)
        call.local_examples = batch_size
        if self._stream is not None:
            self._stream.examples = batch_size
        inputs = [t for t in example_tensors(args, kwargs) if t.shape[0] == batch_size]
        if call.engine.units_are_examples:  # before the engine's hooks are attached
            with self._watch.pause():
                check_examples_independent(self.owner.model, args, kwargs,
                                           engine=call.engine.name, batch_size=batch_size)
        self._session.begin(batch_size, inputs)

    def __exit__(self, exc_type, exc, traceback) -> bool:
        owner, call = self.owner, self.call
        if exc_type is not None:
            self._detach()
            owner._restore(call)
            self._report_failure()
            if (isinstance(exc, UnsupportedModelError) and owner._engine is None
                    and self._watch is not None and self._watch.raised):
                raise UnsupportedModelError(f"{exc}{self._no_fallback_hint()}") from exc
            return False
        try:
            try:
                statistics = self._statistics()
            finally:
                self._detach()
            batch = self._batch(statistics)
            updates, finite = owner._combine(call, batch)
        except BaseException:
            owner._restore(call)
            raise
        owner._commit(call, batch, updates, finite)
        return False

    def _statistics(self) -> dict[nn.Parameter, ParameterStatistics]:
        """This batch's statistics from the session, after checking the block ran one
        forward and one backward; with DDP a failure here is reported to the other ranks."""
        try:
            if not self._watch.finished:
                raise RuntimeError(
                    "no forward of the model finished inside the gv.collect() block: run "
                    "`loss = ...model(...)...; loss.backward()` inside it.")
            self._writes.check()
            if not self._writes.any_written:
                raise RuntimeError(
                    "no backward pass reached the model's parameters inside the "
                    "gv.collect() block: call loss.backward() inside it.")
            return self._session.statistics()
        except BaseException:
            self._report_failure()
            raise

    def _batch(self, statistics: dict[nn.Parameter, ParameterStatistics]) -> BatchStatistics:
        """This call's (global, with DDP) statistics."""
        call = self.call
        loss = torch.zeros(())  # the user's loss is not seen
        result = in_parameter_dtype(EngineResult(loss, call.local_examples, statistics))
        if self._stream is not None:
            return self._stream.finish(result)
        return BatchStatistics(loss, call.local_examples, result.units, result.statistics)

    def _report_failure(self) -> None:
        if self._stream is not None:
            self._stream.fail()

    def _no_fallback_hint(self) -> str:
        other = self.owner._collect_engines(after=self.call.engine.name)
        others = (f"engine='{other[0].name}' also serves gv.collect() for this model's "
                  "layers; or " if other else "")
        return ("\ngv.collect() cannot retry with another engine (your forward runs once): "
                f"{others}use gv.backward(inputs, targets) with a loss_fn, where "
                "engine='auto' falls back to the engines that run the model themselves.")
