"""Engine ``"vmap"``: per-example gradients with ``torch.func``.

Fast path: the usual ``vmap(grad(loss of one example))`` with unbatched parameters. It is
used when the batch loss is the mean or the sum of the per-example losses, which is
checked on the values of each call (no extra forward).

Exact path for any other loss of the batch output (``ignore_index`` or class weights with
mean reduction, custom losses): the model runs once under ``vmap`` with every trainable
parameter *expanded* to one (zero-copy) view per example, so example ``n`` sees its own
copy ``theta_n = theta``; the batch loss is formed from the stacked outputs exactly as
``loss_fn`` defines it, and one ``torch.autograd.grad`` w.r.t. the expanded parameters
returns ``c_n = d loss / d theta_n``: each example's contribution to the batch gradient.

Both paths handle tied weights (``functional_call`` ties them) and draw independent
dropout masks per example (``randomness="different"``). Both materialise ``B``
per-example gradients: this is the general but memory-hungry engine.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .base import (
    Engine,
    EngineResult,
    LossFunction,
    ParameterStatistics,
    batch_size_of,
    model_inputs,
    register_engine,
    train_mode_batchnorm_reason,
)


@register_engine
class VmapEngine(Engine):
    """Per-example gradients via ``torch.func.vmap`` over a functional call of the model."""

    name = "vmap"
    auto_priority = 30

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """Refuses ``nn.RNN``/``LSTM``/``GRU`` layers, modules extended by BackPACK and BatchNorm
        in train mode; ``None`` otherwise.
        """
        for name, module in model.named_modules():
            if isinstance(module, nn.RNNBase):
                # Measured: vmap over nn.LSTM returned per-example gradients with relative
                # error 1.0 (the fused kernels ignore the batched weights).
                return (f"layer '{name}' ({type(module).__name__}): torch.func.vmap gives "
                        "wrong per-example gradients for nn.RNN/LSTM/GRU. Use "
                        "engine='extensions' or engine='auto'.")
            if getattr(module, "_backpack_extend", False):
                return (f"module '{name or type(module).__name__}' was extended by BackPACK "
                        "(backpack.extend); its hooks break torch.func transforms. Use a "
                        "model that was not extended, or engine='backpack'.")
        return train_mode_batchnorm_reason(model)

    def compute(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        inputs: Tensor | Sequence[Tensor],
        targets: Tensor,
        parameters: Sequence[nn.Parameter],
        reduction: str | None = None,
    ) -> EngineResult:
        """Per-example gradients with ``torch.func``: the fast per-example-loss path when the
        batch loss is their mean or sum, else the exact expanded-parameter path.
        """
        result = self._per_example_losses(model, loss_fn, inputs, targets, parameters)
        if result is None:  # the loss does not split into per-example terms
            result = self._expanded_parameters(model, loss_fn, inputs, targets, parameters)
        return result

    @staticmethod
    def _split_state(model: nn.Module, parameters: Sequence[nn.Parameter]):
        reported = set(parameters)
        trainable = {n: p for n, p in model.named_parameters() if p in reported}
        fixed = {n: p for n, p in model.named_parameters() if p not in reported}
        fixed.update(model.named_buffers())
        return trainable, fixed

    @staticmethod
    def _statistics(model, names, contributions, batch_size) -> dict:
        by_name = dict(model.named_parameters())
        statistics = {}
        for name, contribution in zip(names, contributions):
            if contribution is None:
                continue
            flat = contribution.reshape(batch_size, -1)
            grad = flat.sum(0).reshape(contribution.shape[1:])
            sum_grad_squared = torch.einsum("ni,ni->i", flat, flat).reshape(grad.shape)
            statistics[by_name[name]] = ParameterStatistics(grad, sum_grad_squared)
        return statistics

    def _per_example_losses(self, model, loss_fn, inputs, targets, parameters):
        """Fast path: ``vmap(grad(loss of one example))`` with the parameters unbatched.

        Valid when the batch loss is the mean or the sum of the per-example losses; this is
        checked on the values (no extra forward): returns ``None`` when it does not hold
        (e.g. ``ignore_index`` or class weights with mean reduction).
        """
        batch_size = batch_size_of(inputs)
        if not isinstance(targets, Tensor) or targets.shape[:1] != (batch_size,):
            return None
        trainable, fixed = self._split_state(model, parameters)
        names = list(trainable)

        def example_loss(params, example_targets, *example_inputs):
            batched = tuple(x.unsqueeze(0) for x in example_inputs)
            output = functional_call(model, {**params, **fixed}, batched)
            loss = loss_fn(output, example_targets.unsqueeze(0))
            return loss, (loss.detach(), tree_map(lambda o: o.detach().squeeze(0), output))

        in_dims = (None, 0) + (0,) * len(model_inputs(inputs))
        grads, (losses, outputs) = vmap(
            grad(example_loss, has_aux=True), in_dims=in_dims, randomness="different"
        )({n: trainable[n].detach() for n in names}, targets, *model_inputs(inputs))
        with torch.no_grad():
            batch_loss = loss_fn(outputs, targets)
        scale = None
        for candidate, combined in ((1.0 / batch_size, losses.mean()), (1.0, losses.sum())):
            if torch.allclose(batch_loss, combined, rtol=1e-5, atol=1e-12):
                scale = candidate
                break
        if scale is None:
            return None
        contributions = [grads[n] * scale for n in names]
        statistics = self._statistics(model, names, contributions, batch_size)
        return EngineResult(batch_loss.detach(), batch_size, statistics)

    def _expanded_parameters(self, model, loss_fn, inputs, targets, parameters):
        """Exact path for any loss of the batch output (see the module docstring)."""
        batch_size = batch_size_of(inputs)
        trainable, fixed = self._split_state(model, parameters)
        names = list(trainable)
        per_example_params = {
            n: trainable[n].detach().expand(batch_size, *trainable[n].shape).requires_grad_()
            for n in names
        }

        def single_example_forward(example_params, *example_inputs):
            batched = tuple(x.unsqueeze(0) for x in example_inputs)
            output = functional_call(model, {**example_params, **fixed}, batched)
            return tree_map(lambda out: out.squeeze(0), output)

        in_dims = (0,) + (0,) * len(model_inputs(inputs))
        outputs = vmap(single_example_forward, in_dims=in_dims, randomness="different")(
            per_example_params, *model_inputs(inputs)
        )
        loss = loss_fn(outputs, targets)
        contributions = torch.autograd.grad(
            loss, [per_example_params[n] for n in names], allow_unused=True
        )
        statistics = self._statistics(model, names, contributions, batch_size)
        return EngineResult(loss.detach(), batch_size, statistics)
