"""Per-layer per-example gradient statistics (BackPACK-style), installed as msvag_mb.extensions.

One module per layer type (``linear``, ``conv``, ``embedding``, ``lstm``, ``gru``, ``rnn``,
``batchnorm``; the recurrent ones share ``recurrent``),
each registering its extension in :data:`~msvag_mb.extensions.core.EXTENSIONS` on import;
:mod:`~msvag_mb.extensions.hooks` attaches them to a model for one backward pass.
:mod:`~msvag_mb.extensions.layout` knows where the examples are in each layer's input
(traced from the model's inputs, never guessed from shapes) and
:mod:`~msvag_mb.extensions.uses` finds parameters used outside their layer, both from the
autograd graph of the forward pass (the BackPACK engine uses them too).
"""

from . import (  # noqa: F401  (register extensions)
    attention, batchnorm, conv, conv_transpose, embedding, embedding_bag, generic, group_norm, gru,
    instance_norm, layer_norm, linear, lstm, rms_norm, rnn,
)
from .core import EXTENSIONS, LayerContext, ModuleExtension, OutputGradientExtension
from .core import extension_for, register_extension
from .hooks import SumGradSquaredHooks, unsupported_layer
from .layout import ExampleLayouts
from .uses import ParameterUses

__all__ = [
    "EXTENSIONS",
    "ExampleLayouts",
    "LayerContext",
    "ModuleExtension",
    "OutputGradientExtension",
    "ParameterUses",
    "SumGradSquaredHooks",
    "extension_for",
    "register_extension",
    "unsupported_layer",
]
