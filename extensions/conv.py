"""``nn.Conv1d`` / ``nn.Conv2d``: ``sum_n c_n**2`` from the input X and output gradient G.

Example n's weight contribution is the weight gradient of the convolution applied to that
example alone; its bias contribution is ``sum_l G_n[:, l]`` over the output locations l.
Two exact ways to get the per-example weight gradients of a chunk of examples, which are
then squared and summed:

* grouped convolution: fold the examples into the channels, ``(1, B*in, *S)``, and take the
  weight gradient of a convolution with ``B * groups`` groups: one oneDNN/ATen kernel;
* unfold: a convolution is a Linear layer applied to the unfolded input patches
  ``U_n = unfold(X_n)`` ``(in*k, L)``, so the contribution is ``G_n U_n^T``, one ``bmm``.

Measured (float32, one thread, batch 64-128): the grouped convolution is 1.5-2.4x faster
for layers with >= 196 output locations (the 2c2d and 3c3d layers), unfold + bmm 1.2x
faster at 8x8; :data:`GROUPED_MIN_LOCATIONS` picks between them. Non-zero padding modes
and ``padding='same'`` (possibly asymmetric) are applied with ``F.pad`` exactly as the
module's forward does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from msvag_mb.engines.base import UnsupportedModelError

from .core import (
    LayerContext,
    OutputGradientExtension,
    batch_axis,
    chunk_size,
    register_extension,
)

#: output locations from which the grouped-convolution path is used (else unfold + bmm)
GROUPED_MIN_LOCATIONS = 128


def _padded(module: nn.Conv1d | nn.Conv2d, inputs: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The input and the zero padding that remains to apply, exactly as the module's
    forward pads: symmetric zero padding is left to the kernel, anything else (padding
    modes, possibly asymmetric ``'same'``) is applied here with ``F.pad``."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return inputs, tuple(module.padding)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
    return inputs, (0,) * len(module.kernel_size)


def _per_example_by_grouped_conv(module: nn.Conv1d | nn.Conv2d, inputs: Tensor,
                                 padding: tuple[int, ...], grad_output: Tensor) -> Tensor:
    """Per-example weight gradients ``(B, out, in/groups, *k)`` as the weight gradient of
    one convolution whose groups are (example, group) pairs: the batch is folded into the
    channels, so each example's output gradient only meets that example's input."""
    batch, groups = inputs.shape[0], module.groups
    weight_shape = (batch * module.out_channels, *module.weight.shape[1:])
    per_example = torch.ops.aten.convolution_backward(
        grad_output.reshape(1, -1, *grad_output.shape[2:]),
        inputs.reshape(1, -1, *inputs.shape[2:]),
        grad_output.new_empty(weight_shape),  # only its shape is used (uninitialised)
        None, list(module.stride), list(padding), list(module.dilation), False,
        [0] * len(padding), batch * groups, (False, True, False),
    )[1]
    return per_example.view(batch, *module.weight.shape)


def _per_example_by_unfold(module: nn.Conv1d | nn.Conv2d, inputs: Tensor,
                           padding: tuple[int, ...], grad_output: Tensor) -> Tensor:
    """Per-example weight gradients ``(B, out, in/groups, *k)`` as ``G_n U_n^T`` with the
    unfolded input ``U_n`` (Conv1d runs as a Conv2d of height 1: unfold is 2-D only)."""
    kernel_size, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, nn.Conv1d):
        inputs = inputs.unsqueeze(2)
        kernel_size, dilation, stride, padding = ((1, *kernel_size), (1, *dilation),
                                                  (1, *stride), (0, *padding))
    patches = F.unfold(inputs, kernel_size=tuple(kernel_size), dilation=tuple(dilation),
                       padding=tuple(padding), stride=tuple(stride))
    batch, groups = inputs.shape[0], module.groups
    out_per_group = module.out_channels // groups
    patch_per_group = module.weight[0].numel()  # in_channels/groups * prod(kernel_size)
    locations = patches.shape[-1]
    per_example = torch.bmm(
        grad_output.reshape(batch * groups, out_per_group, locations),
        patches.view(batch * groups, patch_per_group, locations).transpose(1, 2))
    return per_example.view(batch, *module.weight.shape)


def conv_weight_sum_grad_squared(module: nn.Conv1d | nn.Conv2d, inputs: Tensor,
                                 grad_output: Tensor) -> Tensor:
    """``sum_n (per-example weight gradient)**2``, shaped like ``module.weight``."""
    inputs, padding = _padded(module, inputs)
    locations = grad_output[0, 0].numel()
    # measured (float32, 1 thread): the grouped convolution is 1.5-2.4x faster from 196
    # output locations up (2c2d, 3c3d layers), unfold + bmm 1.2x faster at 8x8
    per_example_weights = _per_example_by_grouped_conv if locations >= GROUPED_MIN_LOCATIONS \
        else _per_example_by_unfold
    batch = inputs.shape[0]
    result = torch.zeros_like(module.weight, dtype=grad_output.dtype)
    # bound the per-example weights (and unfolded patches) of one chunk of examples
    step = chunk_size(module.weight.numel() + module.in_channels * locations
                      * module.weight[0, 0].numel())
    for start in range(0, batch, step):
        per_example = per_example_weights(module, inputs[start:start + step], padding,
                                          grad_output[start:start + step])
        result += per_example.square_().sum(0)
    return result


def conv_bias_sum_grad_squared(grad_output: Tensor) -> Tensor:
    """``sum_n (sum_l G_n[:, l])**2`` for output gradients ``(B, out, *spatial)``."""
    per_example = grad_output.flatten(2).sum(2)
    return per_example.square().sum(0)


@register_extension
class ConvExtension(OutputGradientExtension):
    """``nn.Conv1d`` and ``nn.Conv2d`` with any padding, stride, dilation and groups."""

    module_types = (nn.Conv1d, nn.Conv2d)

    def batch_axis(self, module: nn.Module, inputs: Tensor, context: LayerContext) -> int:
        if inputs.dim() != (3 if isinstance(module, nn.Conv1d) else 4):
            raise UnsupportedModelError(
                f"layer '{context.name}' ({type(module).__name__}) got an unbatched input of "
                f"shape {tuple(inputs.shape)}; pass inputs with the examples along dim 0."
            )
        return batch_axis(inputs, context, sequence_first=False)

    def sum_grad_squared(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                         requested: frozenset[str]) -> dict[str, Tensor]:
        result = {}
        if "weight" in requested:
            result["weight"] = conv_weight_sum_grad_squared(module, inputs, grad_output)
        if "bias" in requested:
            result["bias"] = conv_bias_sum_grad_squared(grad_output)
        return result
