"""``nn.InstanceNorm1d/2d/3d``: ``sum_n c_n**2`` for the per-channel affine ``weight`` and
``bias``.

The layer normalises each channel of each example over its positions, or, in eval mode
with ``track_running_stats=True``, with the running statistics, ``x_hat = (x - mean) /
sqrt(var + eps)``, and returns ``x_hat * weight[c] + bias[c]``. Either way an example's
``x_hat`` depends on that example only (updating the running statistics in train mode does
not couple the gradients, unlike BatchNorm's batch statistics), so example n's weight
contribution is ``sum_l G_n[c, l] * x_hat_n[c, l]`` over the positions ``l``, its bias
contribution ``sum_l G_n[c, l]``
(:func:`~msvag_mb.extensions.normalization_maths.affine_contributions`). The examples
lie along dim 0 of a ``(N, C, *)`` input; the layer's unbatched form ``(C, *)`` is refused.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from msvag_mb.model_checks import unbatched_input_error

from .core import LayerContext, register_extension
from .normalization_maths import (
    AffineNormExtension,
    affine_contributions,
    channel_summed_dims,
)

#: layer type -> the number of dims of its unbatched input ``(C, *positions)``
UNBATCHED_DIMS = {nn.InstanceNorm1d: 2, nn.InstanceNorm2d: 3, nn.InstanceNorm3d: 4}


def instance_normalized_input(module: nn.modules.instancenorm._InstanceNorm,
                              inputs: Tensor) -> Tensor:
    """``x_hat`` of a ``(B, C, *)`` input: from each example's own statistics, or from the
    running statistics where the layer uses them (eval mode, ``track_running_stats``)."""
    if module.training or not module.track_running_stats:
        # one group per channel is instance norm; F.instance_norm would run batch norm on
        # a (1, B*C, *) copy, which is slower
        return F.group_norm(inputs, inputs.shape[1], eps=module.eps)
    # the running statistics are only read (training=False): no update here
    return F.batch_norm(inputs, module.running_mean.to(inputs.dtype),
                        module.running_var.to(inputs.dtype), training=False, eps=module.eps)


def instance_norm_contributions(module: nn.modules.instancenorm._InstanceNorm,
                                inputs: Tensor, grad_output: Tensor,
                                requested: frozenset[str]) -> dict[str, Tensor]:
    """Per-example ``{"weight": ..., "bias": ...}`` (those requested), ``(B, C)``, for
    inputs and output gradients ``(B, C, *)``."""
    x_hat = instance_normalized_input(module, inputs) if "weight" in requested else None
    return affine_contributions(x_hat, grad_output, channel_summed_dims(inputs),
                                bias="bias" in requested)


@register_extension
class InstanceNormExtension(AffineNormExtension):
    """``nn.InstanceNorm1d/2d/3d`` with ``affine=True``, with or without
    ``track_running_stats``, in train or eval mode."""

    module_types = tuple(UNBATCHED_DIMS)

    def batch_axes(self, module: nn.Module, inputs: Tensor) -> tuple[int, ...]:
        """Only dim 0 (``(N, C, *)``)."""
        return (0,)

    def batch_axis(self, module: nn.Module, inputs: Tensor, context: LayerContext) -> int:
        """Dim 0; the unbatched ``(C, *)`` input (which the layer accepts) is refused."""
        if inputs.dim() <= UNBATCHED_DIMS[type(module)]:
            raise unbatched_input_error(context.name, type(module).__name__, inputs.shape)
        return super().batch_axis(module, inputs, context)

    def contributions(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                      requested: frozenset[str]) -> dict[str, Tensor]:
        """``c`` of ``weight`` and ``bias`` from the recomputed ``x_hat``."""
        return instance_norm_contributions(module, inputs, grad_output, requested)
