"""What a per-layer extension is, and the registry that maps layer types to extensions.

A *layer extension* knows, for one kind of parameter-owning module, how to obtain
``sum_n c_n**2`` for each of the module's parameters during one ordinary backward pass,
where ``c_n`` is example ``n``'s contribution to the batch gradient. Each layer type lives
in its own file (``linear.py``, ``conv.py``, ...) with its maths kept in plain functions
apart from the small class that wires them to hooks; adding a layer is adding a file.

Two wiring styles exist:

* :class:`OutputGradientExtension`: the layer's per-example contributions are a function of
  its input and the gradient w.r.t. its output (Linear, Conv, Embedding, BatchNorm). A
  forward hook saves the input and puts a tensor hook on the output; the statistics are
  computed as soon as the output gradient arrives, and the saved input is released.
* anything else implements :meth:`ModuleExtension.attach` itself (the LSTM swaps in an
  equivalent forward whose backward yields the per-time-step gate gradients).

The glue that attaches extensions to a whole model is :mod:`msvag_mb.extensions.hooks`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Protocol

import torch
from torch import Tensor, nn

from msvag_mb.engines.base import UnsupportedModelError


class Removable(Protocol):
    """Anything with ``remove()``: a hook handle, or an extension's own undo action."""

    def remove(self) -> None:
        """Undo what an extension's ``attach`` (or a hook) installed."""


@dataclass
class LayerContext:
    """What an extension needs to know about one module during one forward/backward pass.

    ``emit(param_name, sum_grad_squared)`` reports a result for the module's parameter
    ``param_name`` (its attribute name, e.g. ``"weight"`` or ``"weight_hh_l1"``).
    """

    name: str
    batch_size: int
    requested: frozenset[str]
    emit: Callable[[str, Tensor], None]
    #: a sequence-first (``batch_first=False``) RNN in the model makes inputs whose dims 0
    #: and 1 both equal the batch size ambiguous (see :func:`batch_axis`)
    model_has_sequence_first_rnn: bool = False
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
                "before squaring. Use engine='vmap'."
            )


class ModuleExtension(ABC):
    """Per-example ``sum_n c_n**2`` for the parameters of one kind of module."""

    #: the exact module types handled (subclasses may override ``forward``: not matched)
    module_types: ClassVar[tuple[type[nn.Module], ...]]

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """``None`` if the module's configuration is handled, else the problem and its fix.

        The text is appended to ``"layer '<name>' (<Type>) "``; it must not run the module.
        """
        return None

    @abstractmethod
    def attach(self, module: nn.Module, context: LayerContext) -> list[Removable]:
        """Arrange for ``context.emit`` to receive the statistics during the next backward.

        Returns what must be removed afterwards to leave the module exactly as it was.
        """


class OutputGradientExtension(ModuleExtension):
    """Layers whose contributions follow from their input and their output gradient."""

    @abstractmethod
    def sum_grad_squared(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                         requested: frozenset[str]) -> dict[str, Tensor]:
        """``{param_name: sum_n c_n**2}`` for the requested parameters.

        ``inputs`` and ``grad_output`` hold the examples along dim 0 and are in the
        parameters' dtype. ``grad_output`` already carries the loss's scaling (e.g. 1/B).
        """

    def batch_axis(self, module: nn.Module, inputs: Tensor, context: LayerContext) -> int:
        """Axis of ``inputs`` (and of the output) that holds the examples."""
        return batch_axis(inputs, context)

    def attach(self, module: nn.Module, context: LayerContext) -> list[Removable]:
        """Register the forward hook that saves the input and hooks the output gradient."""
        dtype = next(p for n, p in module.named_parameters(recurse=False)
                     if n in context.requested).dtype

        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            context.count_call()
            inputs = args[0]
            axis = self.batch_axis(module, inputs, context)
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


def batch_axis(inputs: Tensor, context: LayerContext, sequence_first: bool = True,
               feature_dims: int = 1) -> int:
    """The axis of a layer's input that holds the B examples: 0, or (if ``sequence_first``
    layouts are possible for the layer) 1 for ``(T, B, *features)``, e.g. after an LSTM
    with ``batch_first=False``; ``feature_dims`` trailing dims are not examples' axes.

    Raises :class:`UnsupportedModelError` when neither fits (the model merged the examples
    into another axis) or when both fit in a model with a sequence-first RNN.
    """
    batch = context.batch_size
    shape = tuple(inputs.shape)
    first = inputs.dim() >= 1 and shape[0] == batch
    second = sequence_first and inputs.dim() >= 2 + feature_dims and shape[1] == batch
    if first and second and context.model_has_sequence_first_rnn:
        raise UnsupportedModelError(
            f"layer '{context.name}' got an input of shape {shape} whose dims 0 and 1 both "
            f"equal the batch size {batch}, in a model with a sequence-first RNN: the batch "
            "axis is ambiguous. Use batch_first=True, or a batch size different from the "
            "sequence length."
        )
    if first:
        return 0
    if second:
        return 1
    raise UnsupportedModelError(
        f"layer '{context.name}' got an input of shape {shape} with no batch axis of size "
        f"{batch} in dim 0{' (or dim 1 for sequence-first inputs)' if sequence_first else ''}: "
        "the model merges or "
        "reorders examples before this layer (e.g. flatten(0, 1)), so per-example "
        "contributions cannot be separated. Keep the examples along their own axis, or use "
        "engine='vmap'."
    )


#: per-example tensors of this many elements per chunk (8 MB in float32, a quarter of this
#: machine's L3) are formed, squared and summed together. Measured for one char-LSTM layer
#: (B=50, T=50, per-example (512, 256) matrices; 2 cores, OMP_WAIT_POLICY=PASSIVE):
#: 10.6 ms at 1 << 19, 7.9 at 1 << 20, 6.8-7.0 at 1 << 21, 6.3-6.6 at 1 << 22 (fewer,
#: larger kernels: each launch wakes the worker threads); 1 << 21 keeps the chunk's
#: memory at 8 MB
CACHE_BUDGET_ELEMENTS = 1 << 21


#: elementwise work on tensors below this many elements runs on one thread (see
#: :func:`at_most_threads`)
SMALL_ELEMENTS = 1 << 20


@contextlib.contextmanager
def at_most_threads(count: int | None):
    """Run the block with at most ``count`` intra-op threads, restoring the setting after.

    For short kernels: each parallel kernel wakes the worker threads, which costs about
    50 us on the benchmark machine (2 cores, ``OMP_WAIT_POLICY=PASSIVE``), while squaring a
    (128, 784) float32 tensor on one thread takes 7 us (53 us with two). ``None``: no change.
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


def chunk_size(per_example_elements: int, budget_elements: int = 1 << 24) -> int:
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

