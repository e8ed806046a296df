"""``GradientVariance``: one backward pass that leaves ``p.grad`` and ``p.grad_variance``.

``p.grad_variance`` is the unbiased within-batch estimate of the variance of ``p.grad``
(ALGORITHMS.md, "The within-batch estimate s_hat"). In terms of the contributions ``c_n``
of the ``B`` examples to the gradient (``p.grad = sum_n c_n``, see
:mod:`msvag_mb.engines.base`):

    s_hat = (B * sum_n c_n^2 - p.grad^2) / (B - 1)

which is ``1/(B(B-1)) sum_n (g_n - gbar)^2`` for a mean-reduced loss and ``B^2`` times that
for a sum-reduced one: the scale of ``p.grad`` in both cases.

Several calls before one optimizer step accumulate: ``p.grad`` and ``p.grad_variance``
become those of the combined batch. A new accumulation cycle starts after
``optimizer.zero_grad()`` (or :meth:`GradientVariance.zero_grad`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .engines import ENGINES, Engine, UnsupportedModelError
from .engines.base import LossFunction, batch_size_of
from .optimizers import clear_grad_variance, set_grad_variance


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


class GradientVariance:
    """Compute ``p.grad`` and the within-batch gradient variance ``p.grad_variance``.

    Args:
        model: the network; examples lie along dim 0 of its inputs.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, mean- or sum-reduced over
            examples. It must not contain terms that belong to no example (put L2
            regularisation in the optimizer's ``weight_decay``).
        engine: ``"auto"`` (default: the fastest engine that is correct for the model),
            a registered name (``"extensions"``, ``"backpack"``, ``"vmap"``,
            ``"ghost_batch"``) or an :class:`~msvag_mb.engines.Engine` instance such as
            ``GhostBatchEngine(groups=8)``.
        reduction: ``"mean"`` or ``"sum"``; read from ``loss_fn.reduction`` when it has
            one. Needed only for accumulation across calls and for ghost batches.

    Example::

        gv = GradientVariance(model, nn.CrossEntropyLoss(), engine="auto")
        opt = MSVAG(model.parameters(), lr=0.1, variance="minibatch")
        opt.zero_grad()
        loss = gv.backward(x, y)
        opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        engine: str | Engine = "auto",
        reduction: str | None = None,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise NotImplementedError(
                "DistributedDataParallel models are not supported yet; pass the wrapped "
                "module (model.module) on a single process."
            )
        self.model = model
        self.loss_fn = loss_fn
        self.reduction = _resolve_reduction(loss_fn, reduction)
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
        self._examples_in_cycle = 0
        self._last: dict[nn.Parameter, tuple[Tensor, int, Tensor]] = {}

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
        self._examples_in_cycle = 0
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
        self, inputs: Tensor | Sequence[Tensor], targets: Tensor
    ) -> Tensor:
        """Compute ``loss_fn(model(inputs), targets)``, ``p.grad`` and ``p.grad_variance``.

        Returns the (detached) loss. Within one accumulation cycle, repeated calls combine
        to the statistics of the concatenated batch.
        """
        params = self._trainable_parameters()
        if not params:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        batch_size = batch_size_of(inputs)
        engine = self.select_engine()
        continues = self._cycle_continues(params)
        if not continues:
            self._start_cycle(params)
            if batch_size < 2 and engine.name != "ghost_batch":
                raise ValueError(
                    f"a batch of {batch_size} example has no within-batch variance: use a "
                    "batch of at least 2 examples (or variance='moving_average')."
                )
        elif self.reduction is None:
            raise ValueError(
                "accumulating several GradientVariance.backward calls needs the loss "
                "reduction: pass reduction='mean' or 'sum' to GradientVariance (or use an "
                "nn loss module), or call optimizer.zero_grad() between batches."
            )
        previous = {p: (p.grad, getattr(p, "grad_variance", None)) for p in params} \
            if continues else {}
        for param in params:
            param.grad = None
        try:
            result = engine.compute(
                self.model, self.loss_fn, inputs, targets, params, self.reduction
            )
        except BaseException:
            for param, (grad, variance) in previous.items():
                param.grad = grad
            raise
        units = result.batch_size
        if units < 2 and not continues:
            raise ValueError(
                f"engine '{engine.name}' returned {units} independent unit; the "
                "within-batch variance needs at least 2."
            )
        self._check_finite(result)
        old_count = self._examples_in_cycle
        new_count = old_count + units
        self._last.clear()
        for param in params:
            stats = result.statistics.get(param)
            old_grad, old_variance = previous.get(param, (None, None))
            if stats is None and old_grad is None:
                param.grad = None
                clear_grad_variance(param)
                continue
            if old_grad is None and old_count == 0:
                grad = stats.grad
                variance = _single_batch_variance(stats.grad, stats.sum_grad_squared, units)
            else:
                grad, variance = self._combine(param, old_grad, old_variance, old_count,
                                               stats, units)
            param.grad = grad
            set_grad_variance(param, variance)
            self._last[param] = (grad, grad._version, variance)
        self._examples_in_cycle = new_count
        return result.loss

    def _start_cycle(self, params: list[nn.Parameter]) -> None:
        for param in params:
            if param.grad is not None and bool(param.grad.any()):
                raise RuntimeError(
                    "p.grad already holds a gradient that GradientVariance did not compute "
                    "(e.g. from loss.backward()); call optimizer.zero_grad() before "
                    "GradientVariance.backward."
                )
            clear_grad_variance(param)
        self._examples_in_cycle = 0
        self._last.clear()

    def _combine(self, param, old_grad, old_variance, old_count, stats, units):
        """Statistics of the concatenation of the cycle so far and this batch."""
        zeros = torch.zeros_like(param)
        old_grad = zeros if old_grad is None else old_grad
        old_variance = zeros if old_variance is None else old_variance
        new_grad = zeros if stats is None else stats.grad
        new_sgs = zeros if stats is None else stats.sum_grad_squared
        n_old, n_new = old_count, units
        total = n_old + n_new
        # Work with S1 = sum_n g_n and S2 = sum_n g_n^2 of the per-example gradients g_n
        # (the mean-loss gradient of one example), recovered from each side's grad and
        # variance; then the single-batch formulas on the union.
        if self.reduction == "mean":
            first_old = old_grad * n_old
            second_old = old_variance * (n_old * (n_old - 1)) + old_grad * old_grad * n_old
            first_new = new_grad * n_new
            second_new = new_sgs * (n_new * n_new)
            first = first_old + first_new
            second = second_old + second_new
            grad = first / total
            variance = (second - first * first / total) / (total * (total - 1))
        else:
            second_old = old_variance * ((n_old - 1) / n_old) + old_grad * old_grad / n_old
            first = old_grad + new_grad
            second = second_old + new_sgs
            grad = first
            variance = (second * total - first * first) / (total - 1)
        return grad, variance.clamp_(min=0.0)

    @staticmethod
    def _check_finite(result) -> None:
        tensors = [t for s in result.statistics.values() for t in (s.grad, s.sum_grad_squared)]
        if not tensors:
            return
        totals = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
        if not bool(torch.isfinite(totals).all()):
            raise FloatingPointError(
                "the gradient or its per-example second moment contains NaN or Inf (loss "
                f"{float(result.loss):.4g}); check the data, the loss and the step size."
            )


def _single_batch_variance(grad: Tensor, sum_grad_squared: Tensor, units: int) -> Tensor:
    """``s_hat = (B sum_n c_n^2 - grad^2) / (B - 1)``, clamped at 0 (float cancellation)."""
    variance = sum_grad_squared.mul(units).addcmul_(grad, grad, value=-1.0)
    return variance.div_(units - 1).clamp_(min=0.0)
