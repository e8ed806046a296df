"""``nn.ConvTranspose1d/2d/3d``: ``sum_n c_n**2`` from the input X and output gradient G.

A transposed convolution is the adjoint of the convolution ``C_W`` with the same weight
``W`` ``(in, out/groups, *k)`` that maps the output's space back to the input's:
``y = C_W^T x``, so ``<G, C_W^T x> = <C_W G, x>`` and example n's weight contribution is
the weight gradient of that convolution *applied to* ``G_n`` *with output gradient*
``X_n``; per spatial dim, within each group,

    c_n[i, o, j] = sum_l X_n[i, l] G_n[o, l * stride - padding + j * dilation],

where positions outside ``G_n`` count as zero. Its bias contribution is
``sum_l G_n[:, l]``, as for a convolution. Two exact ways to form a chunk's per-example
weight gradients, then squared and summed (the same choices as ``conv.py``):

* grouped transposed convolution: fold the examples into the channels and take the weight
  gradient of one transposed convolution with ``B * groups`` groups (one ATen kernel);
* unfold: the windows of the output gradient at the input's locations,
  ``U_n = patches(G_n)`` ``(out/groups * prod(k), L_in)`` per group, give
  ``c_n = X_n U_n^T``, one ``bmm``.

``output_padding``, and the ``output_size`` argument of ``forward`` that chooses it, only
lengthen the output at its far end; the padding actually applied is read off the shapes
of the input and the output gradient, so both are handled without seeing the arguments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .conv import ConvolutionFamilyExtension, patches, per_example_by_grouped_convolution
from .core import (
    CACHE_BUDGET_ELEMENTS,
    MEMORY_BUDGET_ELEMENTS,
    chunk_size,
    register_extension,
)


#: the grouped-convolution path is used from this many rows per group of the unfolded
#: output gradient (``out_channels / groups * prod(kernel_size)``), unfold + bmm below
#: (measured on 1-, 2- and 3-d layers)
GROUPED_MIN_PATCH = 128


def output_padding_of(module: nn.modules.conv._ConvTransposeNd, inputs: Tensor,
                      grad_output: Tensor) -> list[int]:
    """The ``output_padding`` the forward applied: the output's extent beyond
    ``(L_in - 1) * stride - 2 * padding + dilation * (k - 1) + 1``, per spatial dim."""
    return [
        size_out - ((size_in - 1) * s - 2 * p + d * (k - 1) + 1)
        for size_in, size_out, s, p, d, k in zip(
            inputs.shape[2:], grad_output.shape[2:], module.stride, module.padding,
            module.dilation, module.kernel_size)
    ]


def _per_example_by_grouped_conv(module: nn.modules.conv._ConvTransposeNd, inputs: Tensor,
                                 grad_output: Tensor) -> Tensor:
    """Per-example weight gradients ``(B, in, out/groups, *k)``
    (:func:`~msvag_mb.extensions.conv.per_example_by_grouped_convolution`)."""
    return per_example_by_grouped_convolution(
        module, inputs, grad_output, module.padding,
        output_padding=output_padding_of(module, inputs, grad_output))


def _per_example_by_unfold(module: nn.modules.conv._ConvTransposeNd, inputs: Tensor,
                           grad_output: Tensor) -> Tensor:
    """Per-example weight gradients ``(B, in, out/groups, *k)`` as ``X_n U_n^T`` with the
    output gradient's windows ``U_n`` at the input's locations."""
    # pad by `padding` in front and `padding - output_padding` behind (negative: crop),
    # so that the windows start at -padding and there are exactly L_in of them per dim
    pads = []
    for p, extra in zip(reversed(module.padding),
                        reversed(output_padding_of(module, inputs, grad_output))):
        pads += [p, p - extra]
    windows = patches(F.pad(grad_output, pads), module.kernel_size, module.dilation,
                      module.stride, (0,) * len(module.kernel_size))
    batch, groups = inputs.shape[0], module.groups
    locations = windows.shape[-1]
    per_example = torch.bmm(
        inputs.reshape(batch * groups, module.in_channels // groups, locations),
        windows.view(batch * groups, module.weight[0].numel(), locations).transpose(1, 2))
    return per_example.view(batch, *module.weight.shape)


def conv_transpose_weight_sum_grad_squared(module: nn.modules.conv._ConvTransposeNd,
                                           inputs: Tensor, grad_output: Tensor) -> Tensor:
    """``sum_n (per-example weight gradient)**2``, shaped like ``module.weight``."""
    # weight[0]: out/groups * prod(k), the rows of one group's unfolded output gradient
    grouped = module.weight[0].numel() >= GROUPED_MIN_PATCH
    per_example_weights = _per_example_by_grouped_conv if grouped else _per_example_by_unfold
    locations = math.prod(inputs.shape[2:])
    step = min(chunk_size(module.weight.numel(), CACHE_BUDGET_ELEMENTS),
               chunk_size(module.out_channels * module.weight[0, 0].numel() * locations,
                          MEMORY_BUDGET_ELEMENTS))
    result = None
    for start in range(0, inputs.shape[0], step):
        per_example = per_example_weights(module, inputs[start:start + step],
                                          grad_output[start:start + step])
        if result is None:
            result = per_example.square_().sum(0)
        else:
            result += per_example.square_().sum(0)
    return result


@register_extension
class ConvTransposeExtension(ConvolutionFamilyExtension):
    """``nn.ConvTranspose1d/2d/3d`` with any stride, padding, output padding (or
    ``output_size``), dilation and groups."""

    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    def weight_sum_grad_squared(self, module: nn.Module, inputs: Tensor,
                                grad_output: Tensor) -> Tensor:
        """The adjoint convolution's per-example gradients
        (:func:`conv_transpose_weight_sum_grad_squared`)."""
        return conv_transpose_weight_sum_grad_squared(module, inputs, grad_output)
