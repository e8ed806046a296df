"""``nn.RMSNorm``: ``sum_n c_n**2`` for the elementwise affine ``weight``.

The layer scales each row by the root mean square over the trailing ``normalized_shape``
axes, ``x_hat = x / sqrt(mean(x**2) + eps)``, and returns ``x_hat * weight`` (no bias).
``eps=None`` is torch's default, the machine epsilon of the computation's dtype (float32
for half-precision inputs); ``x_hat`` is recomputed by the same kernel with the same
``eps``. As for LayerNorm, the examples are independent along any axis that is not
normalised, and example n's weight contribution is ``sum_s G_n[s] * x_hat_n[s]`` over its
rows ``s`` (:func:`~msvag_mb.extensions.normalization_maths.affine_contributions`).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from .core import register_extension
from .layer_norm import TrailingNormExtension
from .normalization_maths import affine_contributions, leading_summed_dims


def rms_norm_contributions(module: nn.RMSNorm, inputs: Tensor, grad_output: Tensor,
                           requested: frozenset[str]) -> dict[str, Tensor]:
    """Per-example ``{"weight": ...}`` (if requested), ``(B, *normalized_shape)``, for
    inputs and output gradients ``(B, *, *normalized_shape)``."""
    if "weight" not in requested:
        return {}
    shape = module.normalized_shape
    x_hat = F.rms_norm(inputs, shape, None, module.eps)
    return affine_contributions(x_hat, grad_output, leading_summed_dims(inputs, len(shape)),
                                bias=False)


@register_extension
class RMSNormExtension(TrailingNormExtension):
    """``nn.RMSNorm`` with ``elementwise_affine=True``, any ``normalized_shape`` and ``eps``
    (also ``None``)."""

    module_types = (nn.RMSNorm,)

    def parameter_names(self, module: nn.Module) -> frozenset[str]:
        """Only ``weight``: RMSNorm has no bias."""
        return frozenset({"weight"})

    def contributions(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                      requested: frozenset[str]) -> dict[str, Tensor]:
        """``c`` of ``weight`` from the recomputed ``x_hat``."""
        return rms_norm_contributions(module, inputs, grad_output, requested)
