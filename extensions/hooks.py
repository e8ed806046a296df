"""Glue: attach the layer extensions to a model for one forward/backward pass.

::

    with SumGradSquaredHooks(model, parameters, batch_size) as hooks:
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, parameters)
    hooks.sum_grad_squared  # {parameter: sum_n c_n**2}

Only modules that directly own a requested parameter get hooks; layers without parameters
(activations, pooling, dropout, reshapes, functional ops) need none, since the output
gradient of each hooked layer already contains everything downstream. On exit every hook,
temporary ``forward`` and saved tensor is removed, so the model is left exactly as it was
(another engine, e.g. ``torch.func.vmap``, can use it right after).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from msvag_mb.engines.base import find_tied_parameters, train_mode_batchnorm

from .core import LayerContext, Removable, extension_for


def unsupported_layer(model: nn.Module) -> str | None:
    """``None`` if every parameter-owning layer of ``model`` has a working extension, else
    a message naming the first layer (qualified name) that does not, and the fix."""
    tied = find_tied_parameters(model)
    if tied:
        first, second = tied[0]
        return (f"tied weights: '{first}' and '{second}' are one Parameter; per-layer "
                "statistics would square each module's share separately. Use engine='vmap'.")
    # a train-mode BatchNorm couples the examples even when it has no parameters
    batchnorm = train_mode_batchnorm(model)
    if batchnorm:
        return (f"BatchNorm layer '{batchnorm[0]}' is in train mode: examples are not "
                "independent, so per-example gradients are undefined. Call model.eval() "
                "for these layers, or use engine=msvag_mb.GhostBatchEngine(groups=K).")
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        extension = extension_for(module)
        if extension is None:
            return (f"layer '{name}' ({type(module).__name__}) has parameters but no "
                    "extension in msvag_mb.extensions; use engine='vmap' (or 'auto').")
        problem = extension.unsupported_reason(module)
        if problem is not None:
            return f"layer '{name}' ({type(module).__name__}) {problem}"
    return None


class SumGradSquaredHooks:
    """Context manager collecting ``sum_n c_n**2`` for ``parameters`` during one backward.

    ``batch_size`` is B, the number of examples along dim 0 of the model's input. After
    the backward pass, :attr:`sum_grad_squared` maps each parameter that received a
    gradient through its layer to its statistic.
    """

    def __init__(self, model: nn.Module, parameters: Sequence[nn.Parameter],
                 batch_size: int) -> None:
        self.model = model
        self.parameters = [p for p in parameters if p.requires_grad]
        self.batch_size = batch_size
        self.sum_grad_squared: dict[nn.Parameter, Tensor] = {}
        self._handles: list[list[Removable]] = []

    def __enter__(self) -> "SumGradSquaredHooks":
        requested_ids = {id(p) for p in self.parameters}
        sequence_first_rnn = any(isinstance(m, nn.RNNBase) and not m.batch_first
                                 for m in self.model.modules())
        try:
            for name, module in self.model.named_modules():
                own = dict(module.named_parameters(recurse=False))
                requested = frozenset(n for n, p in own.items() if id(p) in requested_ids)
                if not requested:
                    continue
                extension = extension_for(module)
                if extension is None:
                    continue  # refused by unsupported_layer; caught after backward if used
                context = LayerContext(
                    name=name, batch_size=self.batch_size, requested=requested,
                    emit=self._emitter(own), model_has_sequence_first_rnn=sequence_first_rnn)
                self._handles.append(extension.attach(module, context))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._remove()

    def _emitter(self, own: dict[str, nn.Parameter]):
        def emit(param_name: str, value: Tensor) -> None:
            param = own[param_name]
            if param in self.sum_grad_squared:  # guarded by LayerContext.count_call
                raise RuntimeError(f"two results for parameter '{param_name}'")
            self.sum_grad_squared[param] = value.detach().reshape(param.shape)
        return emit

    def _remove(self) -> None:
        # the tensor hooks added during forward are appended to these same lists
        for handles in self._handles:
            for handle in handles:
                handle.remove()
        self._handles.clear()
