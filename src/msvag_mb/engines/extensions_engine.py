"""Engine ``"extensions"``: our own per-layer statistics (:mod:`msvag_mb.extensions`).

One ordinary forward and one backward pass; each parameter-owning layer computes
``sum_n c_n**2`` from its saved input and its output gradient (Linear, Conv1d/2d,
Embedding, eval-mode BatchNorm), and nn.LSTM runs an exact re-implementation whose
backward yields the per-time-step gate gradients (any num_layers, batch_first or not, a
carried initial state). The hooks exist only during :meth:`ExtensionsEngine.compute`.
Preferred by ``engine="auto"`` whenever every layer is supported.

Refused during the forward pass (before any backward, so ``engine="auto"`` falls back to
the next engine): a layer whose input's examples cannot be located
(:mod:`msvag_mb.extensions.layout`), a layer called twice, and -- after the forward pass,
from the autograd graph -- a parameter used outside its layer
(:mod:`msvag_mb.extensions.uses`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from msvag_mb.extensions import SumGradSquaredHooks, unsupported_layer

from ..model_checks import (
    UnsupportedModelError,
    batch_size_of,
    model_inputs,
    qualified_names,
    used_outside_its_layer_error,
)
from .base import Engine, EngineResult, LossFunction, ParameterStatistics, register_engine


@register_engine
class ExtensionsEngine(Engine):
    """Per-example second moments from per-layer hooks in one backward pass."""

    name = "extensions"
    auto_priority = 10

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
    ) -> EngineResult:
        """One forward and backward with the layer hooks attached; see :meth:`Engine.compute`."""
        reason = self.unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModelError(f"engine 'extensions': {reason}")
        batch_size = batch_size_of(inputs)
        trainable = [p for p in parameters if p.requires_grad]
        args = model_inputs(inputs)
        with SumGradSquaredHooks(model, trainable, batch_size, inputs=args) as hooks:
            loss = loss_fn(model(*args), targets)
            hooks.check_uses(loss)  # a parameter used outside its layer: refused here
            # autograd.grad leaves p.grad of parameters we do not report on untouched
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        names = qualified_names(model)
        statistics = {}
        for param, grad in zip(trainable, grads):
            if grad is None:
                continue  # no gradient reached this parameter: omitted
            sum_grad_squared = hooks.sum_grad_squared.get(param)
            if sum_grad_squared is None:
                raise used_outside_its_layer_error(names.get(param, str(tuple(param.shape))))
            statistics[param] = ParameterStatistics(grad, sum_grad_squared)
        return EngineResult(loss.detach(), batch_size, statistics)
