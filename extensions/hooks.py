"""Glue: attach the layer extensions to a model for one forward/backward pass.

::

    with SumGradSquaredHooks(model, parameters, batch_size, inputs=(x,)) as hooks:
        loss = loss_fn(model(x), y)
        hooks.check_uses(loss)  # before backward: refuse parameters used outside their layer
        grads = torch.autograd.grad(loss, parameters)
    hooks.sum_grad_squared  # {parameter: sum_n c_n**2}

The hooks know where the examples are in every layer's input
(:class:`~msvag_mb.extensions.layout.ExampleLayouts`, started from the model's ``inputs``)
and refuse during the forward pass a layer whose input's examples cannot be located;
:meth:`SumGradSquaredHooks.check_uses` refuses, after the forward pass and before the
backward pass, a parameter that the forward uses outside its layer
(:class:`~msvag_mb.extensions.uses.ParameterUses`).

Only modules that directly own a requested parameter get the statistics hooks (a frozen
module with an extension gets one forward hook that registers where the examples are in
its output); layers without parameters (activations, pooling, dropout, reshapes,
functional ops) need none, since the output gradient of each hooked layer already contains
everything downstream. On exit every hook,
temporary ``forward`` and saved tensor is removed, so the model is left exactly as it was
(another engine, e.g. ``torch.func.vmap``, can use it right after).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from msvag_mb.model_checks import tied_weights_reason, train_mode_batchnorm_reason

from .core import LayerContext, Removable, extension_for
from .layout import ExampleLayouts
from .uses import ParameterUses


def unsupported_layer(model: nn.Module) -> str | None:
    """``None`` if every layer of ``model`` with trainable parameters has a working
    extension, else a message naming the first layer (qualified name) that has not, and
    the fix. A frozen layer needs no statistics, so it needs no extension either."""
    tied = tied_weights_reason(model)
    if tied:
        return tied
    # a train-mode BatchNorm couples the examples even when it has no parameters
    batchnorm = train_mode_batchnorm_reason(model)
    if batchnorm:
        return batchnorm
    for name, module in model.named_modules():
        trainable = [n for n, p in module._parameters.items()
                     if p is not None and p.requires_grad]
        if not trainable:
            continue
        extension = extension_for(module)
        if extension is None:
            return (f"layer '{name}' ({type(module).__name__}) has parameters but no "
                    "extension in msvag_mb.extensions; use engine='vmap' (or 'auto').")
        problem = extension.unsupported_reason(module)
        unknown = problem is None and sorted(set(trainable) - extension.parameter_names(module))
        if unknown:
            problem = (f"has parameters its extension does not know ({', '.join(unknown)}; "
                       "e.g. from torch.nn.utils.weight_norm); use engine='vmap' (or 'auto').")
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
                 batch_size: int, inputs: Sequence[Tensor] = ()) -> None:
        self.model = model
        self.parameters = [p for p in parameters if p.requires_grad]
        self.batch_size = batch_size
        self.inputs = tuple(inputs)
        self.sum_grad_squared: dict[nn.Parameter, Tensor] = {}
        self._handles: list[list[Removable]] = []
        self._uses: ParameterUses | None = None

    def __enter__(self) -> "SumGradSquaredHooks":
        requested_ids = {id(p) for p in self.parameters}
        hooked, frozen = [], []
        for name, module in self.model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            requested = frozenset(n for n, p in own.items() if id(p) in requested_ids)
            extension = extension_for(module)
            if extension is None:
                continue  # parameter-free, or refused by unsupported_layer
            if requested:
                hooked.append((name, module, extension, own, requested))
            elif own:
                frozen.append((module, extension))  # only where its outputs' examples are
        tracked = {own[n]: (f"{name}.{n}" if name else n, name)
                   for name, module, _, own, requested in hooked for n in requested}
        layouts = ExampleLayouts(self.batch_size, self.inputs)
        self._uses = ParameterUses(tracked)
        try:
            for module, extension in frozen:
                self._handles.append(extension.track_layout(module, layouts))
            for name, module, extension, own, requested in hooked:
                context = LayerContext(
                    name=name, batch_size=self.batch_size, requested=requested,
                    emit=self._emitter(own), layouts=layouts, uses=self._uses)
                self._handles.append(extension.attach(module, context))
        except BaseException:
            self._remove()
            raise
        return self

    def check_uses(self, loss: Tensor) -> None:
        """Refuse, before the backward pass, a parameter that ``loss`` reaches other than
        through its own layer's calls (raises :class:`UnsupportedModelError`)."""
        if self._uses is not None:
            self._uses.check(loss)

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
