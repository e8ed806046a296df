"""Glue: attach the layer extensions to a model for one forward/backward pass.

::

    with SumGradSquaredHooks(model, parameters, batch_size, inputs=(x,)) as hooks:
        loss = loss_fn(model(x), y)
        hooks.check_uses(loss)  # before backward: every use of every parameter
        grads = torch.autograd.grad(loss, parameters)
    hooks.sum_grad_squared  # {parameter: sum_n c_n**2}

The hooks know where the examples are in every layer's input
(:class:`~msvag_mb.extensions.layout.ExampleLayouts`, started from the model's ``inputs``)
and refuse during the forward pass a layer whose input's examples cannot be located.
:meth:`SumGradSquaredHooks.check_uses`, after the forward pass and before the backward
pass, finds every use of the requested parameters in the autograd graph
(:meth:`~msvag_mb.extensions.uses.ParameterUses.find`): a parameter used once, by one
call of its layer, keeps the layer's own maths; one used several times (a layer called
twice, a module registered twice, tied modules) or by operations outside the layers
(``F.linear(h, emb.weight)``, the bare parameters of containers such as a positional
``nn.Parameter``; :mod:`~msvag_mb.extensions.functional`) has the per-example
contributions of all its uses added before squaring (:mod:`~msvag_mb.extensions.reuse`);
what cannot be made exact is refused there, before any gradient.

Only modules that directly own a requested parameter get the statistics hooks (a frozen
module with an extension gets one forward hook that registers where the examples are in
its output); layers without parameters (activations, pooling, dropout, reshapes,
functional ops) need none, since the output gradient of each hooked layer already contains
everything downstream. On exit every hook,
temporary ``forward`` and saved tensor is removed, so the model is left exactly as it was
(another engine, e.g. ``torch.func.vmap``, can use it right after), and the layouts and
uses forget the pass's autograd nodes: hooks that stay on the graph reach them, and a
reference cycle through autograd's C++ graph is one Python's collector cannot free
(``tests/test_no_graph_kept.py``).
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from msvag_mb.model_checks import reused_layer_error, train_mode_batchnorm_reason

from .core import FALLBACK_EXTENSION, LayerContext, ModuleExtension, Removable, extension_for
from .functional import FunctionalRule
from .layout import ExampleLayouts
from .reuse import ReuseState
from .uses import ParameterUses


def unsupported_layer(model: nn.Module) -> str | None:
    """``None`` if every layer of ``model`` with trainable parameters has a working
    extension, else a message naming the first layer (qualified name) that has not, and
    the fix. A frozen layer needs no statistics, so it needs no extension either. The
    bare parameters of containers (:func:`owns_bare_parameters`) and parameters tied
    between layers whose extensions add uses up are checked while the model runs
    (:meth:`SumGradSquaredHooks.check_uses`)."""
    # a train-mode BatchNorm couples the examples even when it has no parameters
    batchnorm = train_mode_batchnorm_reason(model)
    if batchnorm:
        return batchnorm
    tied = _tied_without_reuse(model)
    if tied:
        return tied
    for name, module, extension in hooked_modules(model):
        if owns_bare_parameters(module, extension):
            continue
        own = (extension.parameters_of(module) if extension is not None
               else dict(module.named_parameters(recurse=False)))
        trainable = [n for n, p in own.items() if p.requires_grad]
        if not trainable:
            continue
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


def owns_bare_parameters(module: nn.Module, extension: ModuleExtension | None) -> bool:
    """Whether ``module``'s own parameters are *bare*: it is a container (a submodule owns
    parameters too) without an extension of its own type (none, or only the generic
    fallback), so its forward uses them in operations of its own (``x + self.pos``),
    found in the autograd graph (:mod:`~msvag_mb.extensions.functional`)."""
    if extension is not None and extension not in FALLBACK_EXTENSION:
        return False
    return any(p is not None for child in module.modules() if child is not module
               for p in child._parameters.values())


def _tied_without_reuse(model: nn.Module) -> str | None:
    """The refusal of a Parameter held by several layers where one of their extensions
    cannot add per-example contributions up (:attr:`ModuleExtension.supports_reuse`)."""
    holders: dict[int, list[tuple[str, nn.Module, ModuleExtension | None]]] = {}
    for name, module, extension in hooked_modules(model):
        if owns_bare_parameters(module, extension):
            continue
        own = (extension.parameters_of(module) if extension is not None
               else dict(module.named_parameters(recurse=False)))
        for param in own.values():
            if param.requires_grad:
                holders.setdefault(id(param), []).append((name, module, extension))
    for layers in holders.values():
        for name, module, extension in layers:
            if len(layers) > 1 and extension is not None and not extension.supports_reuse:
                return str(reused_layer_error(name, type(module).__name__, len(layers)))
    return None


def hooked_modules(model: nn.Module):
    """``(qualified name, module, its extension or None)`` for each module of ``model``,
    except the children an ancestor's extension claims (their parameters are reported by
    that ancestor's extension, :meth:`ModuleExtension.claimed_submodules`)."""
    claimed: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in claimed:
            claimed.update(id(m) for m in module.children())
            continue
        extension = extension_for(module)
        if extension is not None:
            claimed.update(id(getattr(module, child))
                           for child in extension.claimed_submodules(module))
        yield name, module, extension


class SumGradSquaredHooks:
    """Context manager collecting ``sum_n c_n**2`` for ``parameters`` during one backward.

    ``batch_size`` is B, the number of examples along dim 0 of the model's input. Call
    :meth:`check_uses` on the forward pass's outputs (or the loss) before the backward
    pass. After the backward pass, :attr:`sum_grad_squared` maps each parameter that
    received a gradient through the uses found to its statistic. ``on_statistic(param,
    value)``, if given, is called with each statistic as the backward pass emits it (a
    parameter used several times is finished only after the backward pass: not called).
    """

    def __init__(self, model: nn.Module, parameters: Sequence[nn.Parameter],
                 batch_size: int, inputs: Sequence[Tensor] = (),
                 on_statistic: Callable[[nn.Parameter, Tensor], None] | None = None) -> None:
        self.model = model
        self.parameters = [p for p in parameters if p.requires_grad]
        self.batch_size = batch_size
        self.inputs = tuple(inputs)
        self._on_statistic = on_statistic
        self._sum_grad_squared: dict[nn.Parameter, Tensor] = {}
        self._handles: list[list[Removable]] = []
        self._uses: ParameterUses | None = None
        self._reuse = ReuseState(batch_size)
        self._layouts: ExampleLayouts | None = None
        self._names: dict[nn.Parameter, str] = {}
        self._layers: dict[str, ModuleExtension] = {}  # hooked layer -> its extension
        self._owners: dict[nn.Parameter, set[str]] = {}
        self._calls: set[tuple[str, int]] = set()  # calls reached by the checked graph
        self._functional: dict[nn.Parameter, int] = {}  # functional uses found

    @property
    def sum_grad_squared(self) -> dict[nn.Parameter, Tensor]:
        """``{parameter: sum_n c_n**2}``; parameters used several times are combined on
        first access after the backward pass (:mod:`~msvag_mb.extensions.reuse`)."""
        for param, value in self._reuse.finished().items():
            self._sum_grad_squared.setdefault(param, value.reshape(param.shape))
        return self._sum_grad_squared

    def __enter__(self) -> "SumGradSquaredHooks":
        hooked, frozen = self._select()
        layouts = ExampleLayouts(self.batch_size, self.inputs)
        self._layouts = layouts
        tracked = {p: (self._names[p], next(iter(layers), None))
                   for p, layers in self._owners.items()}
        self._uses = ParameterUses(tracked, self._owners)
        try:
            for module, extension in frozen:
                self._handles.append(extension.track_layout(module, layouts))
            for name, module, extension, own, requested in hooked:
                context = LayerContext(
                    name=name, batch_size=self.batch_size, requested=requested,
                    emit=self._emitter(own), layouts=layouts, uses=self._uses,
                    reuse=self._reuse, parameters=own)
                self._handles.append(extension.attach(module, context))
        except BaseException:
            self._remove()
            raise
        return self

    def _select(self) -> tuple[list, list]:
        """The hooked layers (with their requested parameters), the frozen layers that
        only track layouts, and the owners and names of every requested parameter (bare
        parameters of containers have no owning layer)."""
        requested_ids = {id(p) for p in self.parameters}
        hooked, frozen = [], []
        for name, module, extension in hooked_modules(self.model):
            if owns_bare_parameters(module, extension):
                for n, p in module.named_parameters(recurse=False):
                    if id(p) in requested_ids:
                        self._names.setdefault(p, f"{name}.{n}" if name else n)
                        self._owners.setdefault(p, set())
                continue
            if extension is None:
                continue  # parameter-free, or refused by unsupported_layer
            own = extension.parameters_of(module)
            requested = frozenset(n for n, p in own.items() if id(p) in requested_ids)
            if requested:
                hooked.append((name, module, extension, own, requested))
                self._layers[name] = extension
                for n in requested:
                    self._names.setdefault(own[n], f"{name}.{n}" if name else n)
                    self._owners.setdefault(own[n], set()).add(name)
            elif own:
                frozen.append((module, extension))  # only where its outputs' examples are
        return hooked, frozen

    def check_uses(self, outputs) -> None:
        """Find, after the forward pass and before the backward pass, every use of the
        requested parameters in the autograd graph of ``outputs`` (the loss, or the
        model's outputs: tensors, possibly nested in tuples, lists and dicts; several
        calls add the parts of the graph not seen before): layer calls, and operations
        outside the layers (:mod:`~msvag_mb.extensions.functional`). Parameters used more
        than once are planned for accumulation; a use that cannot be made exact raises
        :class:`~msvag_mb.model_checks.UnsupportedModelError`, before any gradient."""
        if self._uses is None:
            return
        found = self._uses.find(outputs, self._layouts)
        rules = [FunctionalRule(use, self._layouts, self._names) for use in found.functional]
        calls = self._calls | found.calls
        functional = dict(self._functional)
        for use in found.functional:
            for param in use.parameters:
                functional[param] = functional.get(param, 0) + 1
        plans = self._plans(calls, functional)  # refuses before anything changes
        self._calls, self._functional = calls, functional
        for param, expected in plans.items():
            self._reuse.plan(param, expected)
        handles = [rule.use.consumer.register_prehook(self._prehook(rule)) for rule in rules]
        self._handles.append(handles)
        self._reuse.analysed = True

    def _plans(self, calls: set[tuple[str, int]],
               functional: dict[nn.Parameter, int]) -> dict[nn.Parameter, int]:
        """``{parameter: uses}`` of the parameters that need an accumulator (used more
        than once, or outside a layer); refuses layers that cannot hand over uses."""
        plans = {}
        for param, layers in self._owners.items():
            layer_calls = [call for call in calls if call[0] in layers]
            uses = len(layer_calls) + functional.get(param, 0)
            if uses < 2 and not functional.get(param):
                continue
            for layer in {call[0] for call in layer_calls}:
                extension = self._layers[layer]
                if not extension.supports_reuse:
                    kind = type(dict(self.model.named_modules())[layer]).__name__
                    raise reused_layer_error(layer, kind, uses)
            plans[param] = uses
        return plans

    def _prehook(self, rule: FunctionalRule):
        def prehook(grad_outputs):
            if grad_outputs and grad_outputs[0] is not None:
                for param, use in rule.on_gradient(grad_outputs[0].detach()):
                    self._reuse.add(param, use)
        return prehook

    def __exit__(self, *exc_info) -> None:
        self._remove()

    def _emitter(self, own: dict[str, nn.Parameter]):
        def emit(param_name: str, value: Tensor) -> None:
            param = own[param_name]
            if param in self._sum_grad_squared or self._reuse.is_reused(param):
                raise RuntimeError(f"two results for parameter '{param_name}'")
            self._sum_grad_squared[param] = value.detach().reshape(param.shape)
            if self._on_statistic is not None:
                self._on_statistic(param, self._sum_grad_squared[param])
        return emit

    def _remove(self) -> None:
        # the tensor hooks added during forward are appended to these same lists
        for handles in self._handles:
            for handle in handles:
                handle.remove()
        self._handles.clear()
        # the hooks that stay on the graph (inside autograd Functions, on intermediate
        # tensors) reach the layouts and uses, which hold the graph's nodes: break the cycle
        for graph_state in (self._layouts, self._uses):
            if graph_state is not None:
                graph_state.release()
