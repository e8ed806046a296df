"""What a per-layer extension is, and the registry that maps layer types to extensions.

A *layer extension* knows, for one kind of parameter-owning module, how to obtain
``sum_n c_n**2`` for each of the module's parameters during one ordinary backward pass,
where ``c_n`` is example ``n``'s contribution to the batch gradient. Each layer type lives
in its own file (``linear.py``, ``conv.py``, ...) with its maths kept in plain functions
apart from the small class that wires them to hooks; adding a layer is adding a file.

Two wiring styles exist:

* :class:`OutputGradientExtension`: the layer's per-example contributions are a function of
  its input and the gradient w.r.t. its output (Linear, Conv, Embedding, BatchNorm). A
  forward hook locates the examples in the input (:meth:`LayerContext.batch_axis`: known
  from the model's inputs, or refused; :mod:`~msvag_mb.extensions.layout`), registers the
  output's layout for the layers after it, records the call's graph for the check of
  uses outside the layer (:mod:`~msvag_mb.extensions.uses`), saves the input and puts a
  tensor hook on the output; the statistics are computed as soon as the output gradient
  arrives, and the saved input is released. For a parameter used several times in the
  forward pass, the call hands over its per-example contributions instead
  (:meth:`OutputGradientExtension.per_example_contributions`, :class:`LayerCallUse`;
  :mod:`~msvag_mb.extensions.reuse` adds the uses up before squaring).
* anything else implements :meth:`ModuleExtension.attach` itself (the LSTM swaps in an
  equivalent forward whose backward yields the per-time-step gate gradients).

The glue that attaches extensions to a whole model is :mod:`msvag_mb.extensions.hooks`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Container, Protocol

import torch
from torch import Tensor, nn

from .layout import ExampleLayouts
from .uses import ParameterUses


_WEIGHT_AND_BIAS = frozenset({"weight", "bias"})


class Removable(Protocol):
    """Anything with ``remove()``: a hook handle, or an extension's own undo action."""

    def remove(self) -> None:
        """Undo what an extension's ``attach`` (or a hook) installed."""


@dataclass
class LayerContext:
    """What an extension needs to know about one module during one forward/backward pass.

    ``emit(param_name, sum_grad_squared)`` reports a result for the module's parameter
    ``param_name`` (its attribute name, e.g. ``"weight"`` or ``"weight_hh_l1"``).
    ``layouts`` knows where the examples are in the tensors of this forward pass (the
    extension asks it for its input's batch axis and registers its output's), ``uses``
    records the graph of each call (to find uses of the parameters outside the layer).
    ``reuse`` (a :class:`~msvag_mb.extensions.reuse.ReuseState`, ``None``: no reuse
    possible) says, once the forward pass has been checked, which parameters are used
    several times (a layer called twice, tied weights): their calls hand per-example
    contributions to :meth:`add_use` instead of emitting (``parameters``: name to
    Parameter).
    """

    name: str
    batch_size: int
    requested: frozenset[str]
    emit: Callable[[str, Tensor], None]
    layouts: ExampleLayouts
    uses: ParameterUses
    calls: int = field(default=0)
    reuse: object | None = None
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)

    def count_call(self) -> None:
        """Count the module's calls in this forward pass. Several calls are allowed: the
        check of the uses (:meth:`~msvag_mb.extensions.hooks.SumGradSquaredHooks.
        check_uses`) plans the parameters used by all of them for accumulation, or
        refuses them where the layer's extension cannot hand over per-example
        contributions."""
        self.calls += 1

    def reused(self) -> frozenset[str]:
        """The requested parameters used more than once in this forward pass (their
        per-example contributions go to :meth:`add_use`, added up before squaring)."""
        if self.reuse is None:
            return frozenset()
        if not self.reuse.analysed and self.calls > 1:
            raise RuntimeError(
                f"layer '{self.name}' was called {self.calls} times, and the uses of its "
                "parameters were not checked before the backward pass; call "
                "SumGradSquaredHooks.check_uses(outputs) after the forward pass.")
        return frozenset(n for n in self.requested
                         if self.reuse.is_reused(self.parameters[n]))

    def add_use(self, param_name: str, use) -> None:
        """Hand over one use's per-example contributions to ``param_name``
        (a :class:`~msvag_mb.extensions.reuse.PerExampleUse`)."""
        self.reuse.add(self.parameters[param_name], use)

    def batch_axis(self, tensor: Tensor, kind: str, allowed: Container[int]) -> int:
        """The axis of the layer's input ``tensor`` that holds the examples (see
        :meth:`~msvag_mb.extensions.layout.ExampleLayouts.batch_axis`)."""
        return self.layouts.batch_axis(tensor, self.name, kind, allowed)


class ModuleExtension(ABC):
    """Per-example ``sum_n c_n**2`` for the parameters of one kind of module."""

    #: the exact module types handled (subclasses may override ``forward``: not matched)
    module_types: ClassVar[tuple[type[nn.Module], ...]]

    #: whether the layer's calls can hand over per-example contributions
    #: (:meth:`LayerContext.add_use`), so that its parameters may be used several times in
    #: one forward pass (called twice, tied to another layer, used outside the layer)
    supports_reuse: ClassVar[bool] = False

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """``None`` if the module's configuration is handled, else the problem and its fix.

        The text is appended to ``"layer '<name>' (<Type>) "``; it must not run the module.
        """
        return None

    def parameter_names(self, module: nn.Module) -> frozenset[str]:
        """The names of the module's own parameters that the extension reports on."""
        return _WEIGHT_AND_BIAS

    def claimed_submodules(self, module: nn.Module) -> tuple[str, ...]:
        """Names of child modules whose parameters this extension reports on, as
        ``"child.weight"``, because ``module`` uses them directly instead of calling the
        child (``nn.MultiheadAttention``'s ``out_proj``); such children get no hooks of
        their own. Default: none."""
        return ()

    def parameters_of(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters this extension reports on, by the names ``emit`` takes: the
        module's own and those of its :meth:`claimed_submodules`."""
        own = dict(module.named_parameters(recurse=False))
        for child in self.claimed_submodules(module):
            for name, param in getattr(module, child).named_parameters():
                own[f"{child}.{name}"] = param
        return own

    @abstractmethod
    def attach(self, module: nn.Module, context: LayerContext) -> list[Removable]:
        """Arrange for ``context.emit`` to receive the statistics during the next backward.

        Returns what must be removed afterwards to leave the module exactly as it was.
        """

    def output_layouts(self, module: nn.Module, input_axis: int | None,
                       output) -> list[tuple[Tensor, int]]:
        """``(tensor, batch axis)`` of the module's outputs, given its input's batch axis
        (``None``: unknown); default: a single output in the input's layout."""
        return [] if input_axis is None else [(output, input_axis)]

    def track_layout(self, module: nn.Module, layouts: ExampleLayouts) -> list[Removable]:
        """For a frozen module (no statistics wanted): register where the examples are in
        its outputs, so that the layers after it can locate them. Never refuses."""
        def forward_hook(module: nn.Module, args: tuple, output) -> None:
            if args and isinstance(args[0], Tensor):
                axis = layouts.known_axis(args[0])
                for tensor, batch_axis in self.output_layouts(module, axis, output):
                    layouts.register(tensor, batch_axis)

        return [module.register_forward_hook(forward_hook)]


class OutputGradientExtension(ModuleExtension):
    """Layers whose contributions follow from their input and their output gradient."""

    supports_reuse = True

    @abstractmethod
    def sum_grad_squared(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                         requested: frozenset[str]) -> dict[str, Tensor]:
        """``{param_name: sum_n c_n**2}`` for the requested parameters.

        ``inputs`` and ``grad_output`` hold the examples along dim 0 and are in the
        parameters' dtype. ``grad_output`` already carries the loss's scaling (e.g. 1/B).
        """

    def per_example_contributions(self, module: nn.Module, inputs: Tensor,
                                  grad_output: Tensor,
                                  requested: frozenset[str]) -> dict[str, Tensor]:
        """``{param_name: c}`` with ``c[n]`` example n's contribution (``(B, *shape)``), for
        parameters used several times in one forward pass (added up before squaring).

        Default: ``c_n = J_n^T G_n`` by ``torch.func`` over this module alone, ``J_n`` the
        Jacobian of the module's output for example n (``inputs[n:n+1]``) with respect to
        its parameters; the module must treat examples along dim 0 as it treats them
        along the axis it saw them on (true of every layer that acts on trailing dims).
        Layers override it where a cheaper exact form exists (Linear, Embedding, Conv).
        """
        return per_example_by_vjp(module, self.parameters_of(module), inputs, grad_output,
                                  requested)

    def batch_axes(self, module: nn.Module, inputs: Tensor) -> Container[int]:
        """The axes of ``inputs`` the layer can take the examples from (default: any but
        the last, the features)."""
        return range(inputs.dim() - 1)

    def batch_axis(self, module: nn.Module, inputs: Tensor, context: LayerContext) -> int:
        """Axis of ``inputs`` (and of the output) that holds the examples: known from the
        model's inputs (:class:`~msvag_mb.extensions.layout.ExampleLayouts`), else refused."""
        return context.batch_axis(inputs, type(module).__name__,
                                  self.batch_axes(module, inputs))

    def attach(self, module: nn.Module, context: LayerContext) -> list[Removable]:
        """Register the forward hook that saves the input and hooks the output gradient."""
        dtype = next(p for n, p in self.parameters_of(module).items()
                     if n in context.requested).dtype

        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if _REPLAYING:
                return  # our own per-example re-run (per_example_by_vjp)
            context.count_call()
            inputs = args[0]
            axis = self.batch_axis(module, inputs, context)
            context.layouts.register(output, axis)  # the layer keeps its input's layout
            context.uses.record_call(context.name, args, output)
            version = inputs._version

            def on_output_gradient(grad_output: Tensor) -> None:
                if inputs._version != version:
                    # the layer's input was overwritten in place after the layer used it
                    raise RuntimeError(
                        f"the input of layer '{context.name}' was modified in place after the "
                        "layer ran, so its per-example statistics cannot be computed; avoid "
                        "the in-place operation (e.g. inplace=False)."
                    )
                x = inputs.detach().movedim(axis, 0)
                if x.is_floating_point():
                    x = x.to(dtype)
                g = grad_output.detach().movedim(axis, 0).to(dtype)
                reused = context.reused()
                single = context.requested - reused
                if single:
                    for name, value in self.sum_grad_squared(module, x, g, single).items():
                        context.emit(name, value)
                for name in reused:  # used elsewhere too: added up before squaring
                    context.add_use(name, LayerCallUse(self, module, name, x, g))

            if isinstance(output, Tensor) and output.requires_grad:
                handles.append(output.register_hook(on_output_gradient))

        handles: list[Removable] = [module.register_forward_hook(forward_hook)]
        return handles


class LayerCallUse:
    """One call of a hooked layer as one use of its parameter ``name``: ``c_n`` from the
    call's input and output gradient (examples along dim 0), by the extension's
    :meth:`OutputGradientExtension.per_example_contributions`
    (a :class:`~msvag_mb.extensions.reuse.PerExampleUse`)."""

    def __init__(self, extension: OutputGradientExtension, module: nn.Module, name: str,
                 inputs: Tensor, grad_output: Tensor) -> None:
        self.extension, self.module, self.name = extension, module, name
        self.inputs, self.grad_output = inputs, grad_output

    def per_example(self, start: int, stop: int) -> Tensor:
        """The call's contributions to ``name`` for the examples ``start:stop``."""
        result = self.extension.per_example_contributions(
            self.module, self.inputs[start:stop], self.grad_output[start:stop],
            frozenset({self.name}))
        return result[self.name]


#: true while :func:`per_example_by_vjp` re-runs a module (its forward hooks stay out)
_REPLAYING = False


@contextlib.contextmanager
def _replaying():
    global _REPLAYING
    previous, _REPLAYING = _REPLAYING, True
    try:
        yield
    finally:
        _REPLAYING = previous


def per_example_by_vjp(module: nn.Module, parameters: dict[str, nn.Parameter],
                       inputs: Tensor, grad_output: Tensor,
                       requested: frozenset[str]) -> dict[str, Tensor]:
    """``c_n = J_n^T G_n`` for the ``requested`` parameters of ``module`` (``(B, *shape)``
    each), by ``torch.func``: ``vmap`` over the examples of the ``vjp`` of
    ``module(inputs[n:n+1])`` at ``grad_output[n:n+1]`` with respect to the parameters."""
    detached = {n: p.detach() for n, p in parameters.items()}
    wanted = {n: detached[n] for n in requested}

    def one_example(x: Tensor, g: Tensor) -> dict[str, Tensor]:
        def output(theta: dict[str, Tensor]) -> Tensor:
            return torch.func.functional_call(module, {**detached, **theta},
                                              (x.unsqueeze(0),))
        _, pullback = torch.func.vjp(output, wanted)
        return pullback(g.unsqueeze(0))[0]

    with _replaying():
        return torch.func.vmap(one_example)(inputs, grad_output)


#: per-example tensors of this many elements per chunk (8 MB in float32) are formed,
#: squared and summed together while still in cache: the one chunk budget of every layer
#: (measured on the LSTM and conv layers, docs/benchmarks.md)
CACHE_BUDGET_ELEMENTS = 1 << 21

#: a bound on other per-chunk buffers (e.g. a conv layer's unfolded patches; 64 MB in
#: float32)
MEMORY_BUDGET_ELEMENTS = 1 << 24


def chunk_size(per_example_elements: int, budget_elements: int) -> int:
    """How many examples' per-example tensors fit in ``budget_elements`` at once."""
    return max(1, budget_elements // max(1, per_example_elements))


#: exact module type -> the extension that handles it
EXTENSIONS: dict[type[nn.Module], ModuleExtension] = {}


def register_extension(cls: type[ModuleExtension]) -> type[ModuleExtension]:
    """Class decorator: handle ``cls.module_types`` with an instance of ``cls``."""
    instance = cls()
    for module_type in cls.module_types:
        if module_type in EXTENSIONS and type(EXTENSIONS[module_type]) is not cls:
            raise ValueError(f"{module_type.__name__} already has an extension")
        EXTENSIONS[module_type] = instance
    return cls


#: the extension of last resort, for modules that own parameters and have no extension
#: (:mod:`~msvag_mb.extensions.generic`); empty until registered
FALLBACK_EXTENSION: list[ModuleExtension] = []


def register_fallback_extension(cls: type[ModuleExtension]) -> type[ModuleExtension]:
    """Class decorator: use an instance of ``cls`` for every module that owns parameters
    and has no extension of its own (one such extension exists)."""
    if FALLBACK_EXTENSION and type(FALLBACK_EXTENSION[0]) is not cls:
        raise ValueError("a fallback extension is already registered")
    FALLBACK_EXTENSION[:] = [cls()]
    return cls


#: methods a subclass may override and still be handled by its base's extension (they
#: do not take part in the forward pass)
_HARMLESS_OVERRIDES = frozenset({"__init__", "extra_repr", "reset_parameters",
                                 "__setstate__", "__repr__"})


def _registered_base(module_type: type[nn.Module]) -> type[nn.Module] | None:
    """The nearest registered base class of ``module_type`` if the classes in between
    override none of its methods (but :data:`_HARMLESS_OVERRIDES`), else ``None``."""
    mro = module_type.__mro__
    for index, base in enumerate(mro[1:], start=1):
        if base in EXTENSIONS:
            overrides = {name for cls in mro[:index] for name, value in vars(cls).items()
                         if callable(value) and hasattr(base, name)}
            return None if overrides - _HARMLESS_OVERRIDES else base
    return None


def extension_for(module: nn.Module) -> ModuleExtension | None:
    """The extension for ``module``: the one registered for its type; for a subclass of a
    registered type that overrides no method of it (e.g. ``forward``) and adds no
    parameters, its base's (``NonDynamicallyQuantizableLinear`` is a ``Linear``); for any
    other module that owns parameters, the fallback
    (:mod:`~msvag_mb.extensions.generic`); else ``None``."""
    extension = EXTENSIONS.get(type(module))
    if extension is not None:
        return extension
    owned = frozenset(n for n, p in module._parameters.items() if p is not None)
    base = _registered_base(type(module))
    if base is not None and owned <= EXTENSIONS[base].parameter_names(module):
        return EXTENSIONS[base]
    if owned and FALLBACK_EXTENSION:
        return FALLBACK_EXTENSION[0]
    return None

