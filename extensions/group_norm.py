"""``nn.GroupNorm``: ``sum_n c_n**2`` for the per-channel affine ``weight`` and ``bias``.

The layer normalises each example's channels in ``num_groups`` groups, over the group's
channels and all positions, ``x_hat = (x - mean) / sqrt(var + eps)``, and returns
``x_hat * weight[c] + bias[c]``. The statistics are the example's own (unlike BatchNorm in
train mode), so example n's weight contribution is ``sum_l G_n[c, l] * x_hat_n[c, l]`` over
the positions ``l``, its bias contribution ``sum_l G_n[c, l]``
(:func:`~msvag_mb.extensions.normalization_maths.affine_contributions`). The input is
``(N, C, *)`` with the examples along dim 0 (the layer has no unbatched form).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from .core import register_extension
from .normalization_maths import (
    AffineNormExtension,
    affine_contributions,
    channel_summed_dims,
)


def group_norm_contributions(module: nn.GroupNorm, inputs: Tensor, grad_output: Tensor,
                             requested: frozenset[str]) -> dict[str, Tensor]:
    """Per-example ``{"weight": ..., "bias": ...}`` (those requested), ``(B, C)``, for
    inputs and output gradients ``(B, C, *)``."""
    x_hat = (F.group_norm(inputs, module.num_groups, None, None, module.eps)
             if "weight" in requested else None)
    return affine_contributions(x_hat, grad_output, channel_summed_dims(inputs),
                                bias="bias" in requested)


@register_extension
class GroupNormExtension(AffineNormExtension):
    """``nn.GroupNorm`` with ``affine=True``, any number of groups and positions."""

    module_types = (nn.GroupNorm,)

    def batch_axes(self, module: nn.Module, inputs: Tensor) -> tuple[int, ...]:
        """Only dim 0 (``(N, C, *)``: the layer mixes everything else of an example)."""
        return (0,)

    def contributions(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                      requested: frozenset[str]) -> dict[str, Tensor]:
        """``c`` of ``weight`` and ``bias`` from the recomputed ``x_hat``."""
        return group_norm_contributions(module, inputs, grad_output, requested)
