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
  arrives, and the saved input is released.
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

from msvag_mb.model_checks import UnsupportedModelError

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
    """

    name: str
    batch_size: int
    requested: frozenset[str]
    emit: Callable[[str, Tensor], None]
    layouts: ExampleLayouts
    uses: ParameterUses
    calls: int = field(default=0)

    def count_call(self) -> None:
        """Refuse a second call of the module within one forward pass.

        Per-example contributions of two calls must be added *before* squaring, which the
        layer-local maths cannot do (weight sharing across calls).
        """
        self.calls += 1
        if self.calls > 1:
            raise UnsupportedModelError(
                f"layer '{self.name}' is called more than once in one forward pass (shared "
                "weights): the per-example contributions of its calls would have to be added "
                "before squaring. Use engine='vmap' (engine='auto' falls back to it)."
            )

    def batch_axis(self, tensor: Tensor, kind: str, allowed: Container[int]) -> int:
        """The axis of the layer's input ``tensor`` that holds the examples (see
        :meth:`~msvag_mb.extensions.layout.ExampleLayouts.batch_axis`)."""
        return self.layouts.batch_axis(tensor, self.name, kind, allowed)


class ModuleExtension(ABC):
    """Per-example ``sum_n c_n**2`` for the parameters of one kind of module."""

    #: the exact module types handled (subclasses may override ``forward``: not matched)
    module_types: ClassVar[tuple[type[nn.Module], ...]]

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """``None`` if the module's configuration is handled, else the problem and its fix.

        The text is appended to ``"layer '<name>' (<Type>) "``; it must not run the module.
        """
        return None

    def parameter_names(self, module: nn.Module) -> frozenset[str]:
        """The names of the module's own parameters that the extension reports on."""
        return _WEIGHT_AND_BIAS

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

    @abstractmethod
    def sum_grad_squared(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                         requested: frozenset[str]) -> dict[str, Tensor]:
        """``{param_name: sum_n c_n**2}`` for the requested parameters.

        ``inputs`` and ``grad_output`` hold the examples along dim 0 and are in the
        parameters' dtype. ``grad_output`` already carries the loss's scaling (e.g. 1/B).
        """

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
        dtype = next(p for n, p in module.named_parameters(recurse=False)
                     if n in context.requested).dtype

        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
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
                for name, value in self.sum_grad_squared(module, x, g,
                                                         context.requested).items():
                    context.emit(name, value)

            if isinstance(output, Tensor) and output.requires_grad:
                handles.append(output.register_hook(on_output_gradient))

        handles: list[Removable] = [module.register_forward_hook(forward_hook)]
        return handles


#: per-example tensors of this many elements per chunk (8 MB in float32) are formed,
#: squared and summed together while still in cache: the one chunk budget of every layer
#: (measured on the LSTM and conv layers, docs/benchmarks.md)
CACHE_BUDGET_ELEMENTS = 1 << 21

#: a bound on other per-chunk buffers (e.g. a conv layer's unfolded patches; 64 MB in
#: float32)
MEMORY_BUDGET_ELEMENTS = 1 << 24


#: elementwise work on tensors below this many elements runs on one thread (see
#: :func:`at_most_threads`)
SMALL_ELEMENTS = 1 << 20


@contextlib.contextmanager
def at_most_threads(count: int | None):
    """Run the block with at most ``count`` intra-op threads, restoring the setting after.

    For short kernels: each parallel kernel wakes the worker threads, which can cost more
    than the kernel itself (docs/benchmarks.md). ``None``: no change.
    """
    previous = torch.get_num_threads()
    if count is None or count >= previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def extension_for(module: nn.Module) -> ModuleExtension | None:
    """The extension registered for ``type(module)`` exactly, or ``None``."""
    return EXTENSIONS.get(type(module))

