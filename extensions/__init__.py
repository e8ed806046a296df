"""Per-layer per-example gradient statistics (BackPACK-style), installed as msvag_mb.extensions.

One module per layer type (``linear``, ``conv``, ``embedding``, ``lstm``, ``batchnorm``),
each registering its extension in :data:`~msvag_mb.extensions.core.EXTENSIONS` on import;
:mod:`~msvag_mb.extensions.hooks` attaches them to a model for one backward pass.
"""

from . import batchnorm, conv, embedding, linear, lstm  # noqa: F401  (register extensions)
from .core import EXTENSIONS, LayerContext, ModuleExtension, OutputGradientExtension
from .core import extension_for, register_extension
from .hooks import SumGradSquaredHooks, unsupported_layer

__all__ = [
    "EXTENSIONS",
    "LayerContext",
    "ModuleExtension",
    "OutputGradientExtension",
    "SumGradSquaredHooks",
    "extension_for",
    "register_extension",
    "unsupported_layer",
]
