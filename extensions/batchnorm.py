"""``nn.BatchNorm1d/2d/3d`` in eval mode: ``sum_n c_n**2`` for the affine parameters.

In eval mode the layer is the per-channel affine map ``y = x_hat * weight + bias`` with
``x_hat = (x - running_mean) / sqrt(running_var + eps)`` fixed by the running statistics, so
examples are independent: example n's weight contribution is ``sum_l G_n[c, l] x_hat_n[c, l]``
over the spatial/sequence positions l, its bias contribution ``sum_l G_n[c, l]``. In train
mode (or without running statistics) each output depends on the whole batch and there are
no per-example gradients: refused.
"""

from __future__ import annotations

from torch import Tensor, nn

from msvag_mb.model_checks import TRAIN_MODE_BATCHNORM_FIX

from .core import OutputGradientExtension, register_extension


def normalized_input(module: nn.modules.batchnorm._BatchNorm, inputs: Tensor) -> Tensor:
    """``x_hat`` from the running statistics, shaped like ``inputs`` ``(B, C, *)``."""
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    mean = module.running_mean.to(inputs.dtype).view(shape)
    std = (module.running_var.to(inputs.dtype) + module.eps).sqrt().view(shape)
    return (inputs - mean) / std


def batchnorm_sum_grad_squared(module: nn.modules.batchnorm._BatchNorm, inputs: Tensor,
                               grad_output: Tensor,
                               requested: frozenset[str]) -> dict[str, Tensor]:
    """``{"weight": ..., "bias": ...}`` (those requested) for an eval-mode BatchNorm."""
    batch, channels = grad_output.shape[:2]
    g = grad_output.reshape(batch, channels, -1)
    result = {}
    if "weight" in requested:
        x_hat = normalized_input(module, inputs).reshape(batch, channels, -1)
        result["weight"] = (g * x_hat).sum(2).square().sum(0)
    if "bias" in requested:
        result["bias"] = g.sum(2).square().sum(0)
    return result


@register_extension
class BatchNormExtension(OutputGradientExtension):
    """Eval-mode BatchNorm with running statistics (the affine parameters)."""

    module_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Refuse train mode and ``track_running_stats=False`` (batch statistics couple examples)."""
        if module.training:
            return f"is in train mode: {TRAIN_MODE_BATCHNORM_FIX}"
        if module.running_mean is None:
            return ("has track_running_stats=False, so it normalises with batch statistics "
                    "even in eval mode (examples are not independent); use "
                    "track_running_stats=True, or engine=msvag_mb.GhostBatchEngine(groups=K).")
        return None

    def batch_axes(self, module: nn.Module, inputs: Tensor) -> tuple[int, ...]:
        """Only dim 0 (BatchNorm inputs are ``(B, C, *)``)."""
        return (0,)

    def sum_grad_squared(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                         requested: frozenset[str]) -> dict[str, Tensor]:
        """``sum_n c_n**2`` of the affine ``weight`` and ``bias`` from the normalised input."""
        return batchnorm_sum_grad_squared(module, inputs, grad_output, requested)
