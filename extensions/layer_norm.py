"""``nn.LayerNorm``: ``sum_n c_n**2`` for the elementwise affine ``weight`` and ``bias``.

The layer normalises each row over the trailing ``normalized_shape`` axes,
``x_hat = (x - mean) / sqrt(var + eps)`` (biased variance over those axes), and returns
``x_hat * weight + bias``. Each row's statistics are its own, so the examples are
independent along any axis that is not normalised: example n's weight contribution is
``sum_s G_n[s] * x_hat_n[s]`` over its rows ``s`` (sequence positions, in any layout the
trace reports), its bias contribution ``sum_s G_n[s]``
(:func:`~msvag_mb.extensions.normalization_maths.affine_contributions`).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from msvag_mb.model_checks import unbatched_input_error

from .core import LayerContext, register_extension
from .normalization_maths import AffineNormExtension, affine_contributions, leading_summed_dims


def layer_norm_contributions(module: nn.LayerNorm, inputs: Tensor, grad_output: Tensor,
                             requested: frozenset[str]) -> dict[str, Tensor]:
    """Per-example ``{"weight": ..., "bias": ...}`` (those requested), ``(B,
    *normalized_shape)``, for inputs and output gradients ``(B, *, *normalized_shape)``."""
    shape = module.normalized_shape
    x_hat = None
    if "weight" in requested:
        # a unit weight changes nothing but takes the CPU kernel's vectorised path (the
        # one without a weight is slower)
        x_hat = F.layer_norm(inputs, shape, inputs.new_ones(shape), None, module.eps)
    return affine_contributions(x_hat, grad_output, leading_summed_dims(inputs, len(shape)),
                                bias="bias" in requested)


class TrailingNormExtension(AffineNormExtension):
    """A layer normalising over its trailing ``module.normalized_shape`` axes (LayerNorm,
    RMSNorm): the examples may lie along any other axis."""

    def batch_axes(self, module: nn.Module, inputs: Tensor) -> range:
        """The axes that are not normalised."""
        return range(inputs.dim() - len(module.normalized_shape))

    def batch_axis(self, module: nn.Module, inputs: Tensor, context: LayerContext) -> int:
        """The examples' axis of ``inputs``; an input of ``normalized_shape`` alone (one
        unbatched example) is refused."""
        if inputs.dim() <= len(module.normalized_shape):
            raise unbatched_input_error(context.name, type(module).__name__, inputs.shape)
        return super().batch_axis(module, inputs, context)


@register_extension
class LayerNormExtension(TrailingNormExtension):
    """``nn.LayerNorm`` with ``elementwise_affine=True``, with or without ``bias``, any
    ``normalized_shape``."""

    module_types = (nn.LayerNorm,)

    def contributions(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                      requested: frozenset[str]) -> dict[str, Tensor]:
        """``c`` of ``weight`` and ``bias`` from the recomputed ``x_hat``."""
        return layer_norm_contributions(module, inputs, grad_output, requested)
