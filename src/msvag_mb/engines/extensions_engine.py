"""Engine ``"extensions"``: our own per-layer statistics (:mod:`msvag_mb.extensions`).

One ordinary forward and one backward pass; each parameter-owning layer computes
``sum_n c_n**2`` from its saved input and its output gradient (Linear, convolutions,
embeddings, the norm layers), recurrent layers and attention run exact re-implementations
whose backward yields what their weights' per-example contributions need, any other
module goes through the generic ``torch.func`` fallback over that module alone, and
parameters used several times (tied, reused, functional uses) have their uses'
contributions added before squaring (:mod:`msvag_mb.extensions`). The hooks exist only
during :meth:`ExtensionsEngine.compute` (or a ``collect`` block). Preferred by
``engine="auto"`` whenever the model is supported.

With DDP it *streams*: each parameter's ``(grad, sum_n c_n**2)`` is announced as soon as
both are final in the backward pass (its gradient through a tensor hook on the parameter,
which fires under ``torch.autograd.grad`` too; the statistic when its layer emits it), so
the statistics' all-reduce overlaps the rest of the backward pass (docs/scaling_out.md).

Refused during the forward pass (before any backward, so ``engine="auto"`` falls back to
the next engine): a layer whose input's examples cannot be located
(:mod:`msvag_mb.extensions.layout`), a module the fallback cannot re-run per example, and
-- after the forward pass, from the autograd graph -- a use of a parameter without an
exact per-example rule (:mod:`msvag_mb.extensions.uses`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from msvag_mb.extensions import SumGradSquaredHooks, unsupported_layer
from msvag_mb.extensions.uses import tensors_in

from ..model_checks import (
    batch_size_of,
    model_inputs,
    qualified_names,
    used_outside_its_layer_error,
)
from .base import (
    CollectSession,
    Engine,
    EngineResult,
    LossFunction,
    ParameterStatistics,
    StatisticsListener,
    register_engine,
)
from .independence import check_examples_independent
from .selection import refuse_unsupported


@register_engine
class ExtensionsEngine(Engine):
    """Per-example second moments from per-layer hooks in one backward pass."""

    name = "extensions"
    auto_priority = 10
    serves_collect = True  # the hooks see any forward and backward, the user's too
    streams_statistics = True

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """``None`` if every parameter-owning layer has an extension, else the first that has not and the fix."""
        return unsupported_layer(model)

    def compute(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        inputs: Tensor | Sequence[Tensor],
        targets: Tensor,
        parameters: Sequence[nn.Parameter],
        reduction: str | None = None,
        *,
        on_ready: StatisticsListener | None = None,
    ) -> EngineResult:
        """One forward and backward with the layer hooks attached; see :meth:`Engine.compute`
        (``on_ready``: :attr:`Engine.streams_statistics`)."""
        refuse_unsupported(self, model)
        batch_size = batch_size_of(inputs)
        trainable = [p for p in parameters if p.requires_grad]
        args = model_inputs(inputs)
        check_examples_independent(model, args, engine=self.name)
        announced = _Announcements(trainable, on_ready)
        try:
            with SumGradSquaredHooks(model, trainable, batch_size, inputs=args,
                                     on_statistic=announced.on_statistic) as hooks:
                loss = loss_fn(model(*args), targets)
                hooks.check_uses(loss)  # a parameter used outside its layer: refused here
                announced.attach()  # after the forward: a gradient taken inside it is no batch's
                # autograd.grad leaves p.grad of parameters we do not report on untouched
                grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        finally:
            announced.remove()
        statistics = _layer_statistics(model, hooks, zip(trainable, grads))
        return EngineResult(loss.detach(), batch_size, statistics)

    def collect_session(self, model: nn.Module, parameters: Sequence[nn.Parameter], *,
                        on_ready: StatisticsListener | None = None) -> CollectSession:
        """The same hooks around a forward and backward that the user runs."""
        refuse_unsupported(self, model)
        return _ExtensionsSession(model, [p for p in parameters if p.requires_grad],
                                  on_ready)


class _Announcements:
    """Pairs each parameter's gradient with its layer's ``sum_n c_n**2`` during the
    backward pass and hands the pair to ``on_ready`` once both are there (nothing at all
    without ``on_ready``)."""

    def __init__(self, parameters: Sequence[nn.Parameter],
                 on_ready: StatisticsListener | None) -> None:
        self.parameters = list(parameters)
        self.on_ready = on_ready
        self._grads: dict[nn.Parameter, Tensor] = {}
        self._squares: dict[nn.Parameter, Tensor] = {}
        self._handles: list = []
        self.on_statistic: Callable[[nn.Parameter, Tensor], None] | None = (
            None if on_ready is None else self._statistic)

    def attach(self) -> None:
        """Hook the parameters' gradients (a leaf's tensor hook sees its total gradient
        once, under ``loss.backward()`` and ``torch.autograd.grad`` alike)."""
        if self.on_ready is not None and not self._handles:
            self._handles = [p.register_hook(self._gradient_hook(p)) for p in self.parameters]

    def _gradient_hook(self, param: nn.Parameter):
        def hook(grad: Tensor) -> None:
            self._grads[param] = grad
            self._announce(param)
        return hook

    def _statistic(self, param: nn.Parameter, value: Tensor) -> None:
        self._squares[param] = value
        self._announce(param)

    def _announce(self, param: nn.Parameter) -> None:
        if param in self._grads and param in self._squares:
            self.on_ready(param, ParameterStatistics(self._grads[param], self._squares[param]))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _layer_statistics(model: nn.Module, hooks: SumGradSquaredHooks,
                      grads) -> dict[nn.Parameter, ParameterStatistics]:
    """``(grad, sum_n c_n**2)`` for each ``(parameter, grad)``; a gradient without its
    layer's statistic came from a use outside the layer (refused)."""
    names = qualified_names(model)
    statistics = {}
    for param, grad in grads:
        if grad is None:
            continue  # no gradient reached this parameter: omitted
        sum_grad_squared = hooks.sum_grad_squared.get(param)
        if sum_grad_squared is None:
            raise used_outside_its_layer_error(names.get(param, str(tuple(param.shape))))
        statistics[param] = ParameterStatistics(grad, sum_grad_squared)
    return statistics


class _ExtensionsSession(CollectSession):
    """The layer hooks for one ``GradientVariance.collect()`` block."""

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter],
                 on_ready: StatisticsListener | None = None) -> None:
        self.model = model
        self.guarded_parameters = trainable
        self.hooks: SumGradSquaredHooks | None = None
        self.announced = _Announcements(trainable, on_ready)

    def begin(self, batch_size: int, inputs: Sequence[Tensor]) -> None:
        """Attach the layer hooks (the examples' layouts start from ``inputs``)."""
        self.hooks = SumGradSquaredHooks(
            self.model, self.guarded_parameters, batch_size, inputs=tuple(inputs),
            on_statistic=self.announced.on_statistic).__enter__()

    def check_output(self, output) -> None:
        """Refuse a parameter that the outputs reach other than through its layer."""
        for tensor in tensors_in(output):
            self.hooks.check_uses(tensor)
        self.announced.attach()

    def statistics(self) -> dict[nn.Parameter, ParameterStatistics]:
        """``p.grad`` (this batch's) and the layers' ``sum_n c_n**2``."""
        return _layer_statistics(self.model, self.hooks,
                                 ((p, p.grad) for p in self.guarded_parameters))

    def close(self) -> None:
        """Remove the layer hooks."""
        self.announced.remove()
        if self.hooks is not None:
            self.hooks.__exit__(None, None, None)
            self.hooks = None
