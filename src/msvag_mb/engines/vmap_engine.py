"""Engine ``"vmap"``: per-example gradients with ``torch.func``.

The model runs once under ``vmap`` with every trainable parameter *expanded* to one
(zero-copy) view per example, so example ``n`` sees its own copy ``theta_n = theta``.
The batch loss is then formed from the stacked outputs exactly as ``loss_fn`` defines it,
and one ``torch.autograd.grad`` w.r.t. the expanded parameters returns
``c_n = d loss / d theta_n``: each example's contribution to the batch gradient. This is
exact for any ``loss_fn`` of the batch output (mean or sum, token-averaged sequence
losses, ``ignore_index``), handles tied weights (``functional_call`` ties them), and draws
independent dropout masks per example (``randomness="different"``).

It materialises ``B`` per-example gradients, so it is the general but memory-hungry engine.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from .base import (
    Engine,
    EngineResult,
    LossFunction,
    ParameterStatistics,
    batch_size_of,
    model_inputs,
    register_engine,
    train_mode_batchnorm,
)


@register_engine
class VmapEngine(Engine):
    """Per-example gradients via ``torch.func.vmap`` over a functional call of the model."""

    name = "vmap"
    auto_priority = 30

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
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
        batchnorm = train_mode_batchnorm(model)
        if batchnorm:
            return (f"BatchNorm layer '{batchnorm[0]}' is in train mode: examples are not "
                    "independent, so per-example gradients are undefined. Call model.eval() "
                    "for these layers, or use engine=msvag_mb.GhostBatchEngine(groups=K).")
        return None

    def compute(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        inputs: Tensor | Sequence[Tensor],
        targets: Tensor,
        parameters: Sequence[nn.Parameter],
        reduction: str | None = None,
    ) -> EngineResult:
        batch_size = batch_size_of(inputs)
        reported = set(parameters)
        per_example_params = {}
        fixed = {}
        for name, param in model.named_parameters():
            if param in reported:
                per_example_params[name] = (
                    param.detach().expand(batch_size, *param.shape).requires_grad_()
                )
            else:
                fixed[name] = param
        buffers = dict(model.named_buffers())

        def single_example_forward(example_params, *example_inputs):
            batched = tuple(x.unsqueeze(0) for x in example_inputs)
            state = {**example_params, **fixed, **buffers}
            output = functional_call(model, state, batched)
            return tree_map(lambda out: out.squeeze(0), output)

        in_dims = (0,) + (0,) * len(model_inputs(inputs))
        outputs = vmap(single_example_forward, in_dims=in_dims, randomness="different")(
            per_example_params, *model_inputs(inputs)
        )
        loss = loss_fn(outputs, targets)
        names = list(per_example_params)
        contributions = torch.autograd.grad(
            loss, [per_example_params[n] for n in names], allow_unused=True
        )
        by_name = dict(model.named_parameters())
        statistics = {}
        for name, contribution in zip(names, contributions):
            if contribution is None:
                continue
            flat = contribution.reshape(batch_size, -1)
            grad = flat.sum(0).reshape(contribution.shape[1:])
            sum_grad_squared = torch.einsum("ni,ni->i", flat, flat).reshape(grad.shape)
            statistics[by_name[name]] = ParameterStatistics(grad, sum_grad_squared)
        return EngineResult(loss.detach(), batch_size, statistics)
