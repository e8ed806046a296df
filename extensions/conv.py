"""``nn.Conv1d/2d/3d``: ``sum_n c_n**2`` from the input X and the output gradient G.

Example n's weight contribution is the weight gradient of the convolution applied to that
example alone; its bias contribution is ``sum_l G_n[:, l]`` over the output locations l.
Two exact ways to get the per-example weight gradients of a chunk of examples, which are
then squared and summed:

* grouped convolution: fold the examples into the channels, ``(1, B*in, *S)``, and take the
  weight gradient of a convolution with ``B * groups`` groups: one oneDNN/ATen kernel;
* unfold: a convolution is a Linear layer applied to the unfolded input patches
  ``U_n = unfold(X_n)`` ``(in*k, L)``, so the contribution is ``G_n U_n^T``, one ``bmm``
  (``F.unfold`` exists for 2-d inputs only; :func:`patches` builds them for 1, 2 or 3
  spatial dims).

The per-example weights of a chunk of examples are squared and summed while they are
still in cache (:data:`~msvag_mb.extensions.core.CACHE_BUDGET_ELEMENTS` bounds a chunk's
per-example weights); the patches are built from ``Tensor.unfold`` windows with one copy
(faster than ``F.unfold``); unfold + bmm is used for small patches, where it beat the
grouped convolution, and the grouped convolution for large ones
(:data:`GROUPED_MIN_PATCH`; :data:`GROUPED_MIN_PATCH_3D` for Conv3d). The measurements
behind these choices are in docs/benchmarks.md, "Measured choices in the extensions".

Non-zero padding modes and ``padding='same'`` (possibly asymmetric) are applied with
``F.pad`` exactly as the module's forward does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from msvag_mb.model_checks import unbatched_input_error

from .core import (
    CACHE_BUDGET_ELEMENTS,
    MEMORY_BUDGET_ELEMENTS,
    LayerContext,
    OutputGradientExtension,
    chunk_size,
    register_extension,
)

#: the grouped-convolution path is used for layers with at least this many input values
#: per patch and group (``in_channels / groups * prod(kernel_size)``), unfold + bmm below:
#: unfold + bmm won on small patches, the grouped convolution on large ones (measured)
GROUPED_MIN_PATCH = 256

#: the same threshold for Conv3d, whose unfolded patches (``prod(kernel_size)`` copies of
#: the input, 27 for a 3x3x3 kernel) cost more to build: the grouped convolution won from
#: fewer input values per patch (measured)
GROUPED_MIN_PATCH_3D = 128


def _padded(module: nn.modules.conv._ConvNd, inputs: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The input and the zero padding that remains to apply, exactly as the module's
    forward pads: symmetric zero padding is left to the kernel, anything else (padding
    modes, possibly asymmetric ``'same'``) is applied here with ``F.pad``."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return inputs, tuple(module.padding)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
    return inputs, (0,) * len(module.kernel_size)


def _per_example_by_grouped_conv(module: nn.modules.conv._ConvNd, inputs: Tensor,
                                 padding: tuple[int, ...], grad_output: Tensor) -> Tensor:
    """Per-example weight gradients ``(B, out, in/groups, *k)``
    (:func:`per_example_by_grouped_convolution`)."""
    return per_example_by_grouped_convolution(module, inputs, grad_output, padding)


def per_example_by_grouped_convolution(module: nn.modules.conv._ConvNd, inputs: Tensor,
                                       grad_output: Tensor, padding, *,
                                       output_padding=None) -> Tensor:
    """Per-example weight gradients, shaped ``(B, *module.weight.shape)``, as the weight
    gradient of one convolution (transposed where ``module`` is) whose groups are
    (example, group) pairs: the batch is folded into the channels, so each example's
    output gradient only meets that example's input. ``output_padding``: a transposed
    convolution's, for this input and output gradient."""
    batch, groups, transposed = inputs.shape[0], module.groups, module.transposed
    channels = module.in_channels if transposed else module.out_channels
    weight_shape = (batch * channels, *module.weight.shape[1:])
    per_example = torch.ops.aten.convolution_backward(
        grad_output.reshape(1, -1, *grad_output.shape[2:]),
        inputs.reshape(1, -1, *inputs.shape[2:]),
        grad_output.new_empty(weight_shape),  # only its shape is used (uninitialised)
        None, list(module.stride), list(padding), list(module.dilation), transposed,
        list(output_padding) if transposed else [0] * len(padding), batch * groups,
        (False, True, False),
    )[1]
    return per_example.view(batch, *module.weight.shape)


def patches(inputs: Tensor, kernel_size, dilation, stride, padding) -> Tensor:
    """``F.unfold``'s patches ``(B, C * prod(kernel_size), L)`` (also for 1 and 3 spatial
    dims; ``padding``: symmetric zero padding per spatial dim), built from
    ``Tensor.unfold`` windows and one copy (measured faster than ``F.unfold``)."""
    if any(padding):
        pads = [side for p in reversed(padding) for side in (p, p)]
        inputs = F.pad(inputs, pads)
    windows = inputs
    for axis, (k, d, s) in enumerate(zip(kernel_size, dilation, stride), start=2):
        # windows of the dilated extent, then every d-th element: (..., L_axis, k)
        windows = windows.unfold(axis, (k - 1) * d + 1, s)[..., ::d]
    spatial = len(kernel_size)
    batch, channels = inputs.shape[:2]
    # (B, C, *L, *k) -> (B, C, *k, *L) -> (B, C * prod(k), prod(L))
    order = (0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial))
    return windows.permute(order).reshape(batch, channels * math.prod(kernel_size), -1)


def _per_example_by_unfold(module: nn.modules.conv._ConvNd, inputs: Tensor,
                           padding: tuple[int, ...], grad_output: Tensor) -> Tensor:
    """Per-example weight gradients ``(B, out, in/groups, *k)`` as ``G_n U_n^T`` with the
    unfolded input patches ``U_n``."""
    unfolded = patches(inputs, module.kernel_size, module.dilation, module.stride, padding)
    batch, groups = inputs.shape[0], module.groups
    out_per_group = module.out_channels // groups
    patch_per_group = module.weight[0].numel()  # in_channels/groups * prod(kernel_size)
    locations = unfolded.shape[-1]
    per_example = torch.bmm(
        grad_output.reshape(batch * groups, out_per_group, locations),
        unfolded.view(batch * groups, patch_per_group, locations).transpose(1, 2))
    return per_example.view(batch, *module.weight.shape)


def conv_weight_sum_grad_squared(module: nn.modules.conv._ConvNd, inputs: Tensor,
                                 grad_output: Tensor) -> Tensor:
    """``sum_n (per-example weight gradient)**2``, shaped like ``module.weight``."""
    inputs, padding = _padded(module, inputs)
    locations = grad_output[0, 0].numel()
    threshold = GROUPED_MIN_PATCH_3D if len(module.kernel_size) == 3 else GROUPED_MIN_PATCH
    grouped = module.weight[0].numel() >= threshold
    per_example_weights = _per_example_by_grouped_conv if grouped else _per_example_by_unfold
    batch = inputs.shape[0]
    # per-example weights of one chunk stay in cache while squared and summed; the
    # unfolded patches (unfold path) are bounded too
    step = min(chunk_size(module.weight.numel(), CACHE_BUDGET_ELEMENTS),
               chunk_size(module.in_channels * locations * module.weight[0, 0].numel(),
                          MEMORY_BUDGET_ELEMENTS))
    result = None
    for start in range(0, batch, step):
        per_example = per_example_weights(module, inputs[start:start + step], padding,
                                          grad_output[start:start + step])
        if result is None:
            result = per_example.square_().sum(0)
        else:
            result += per_example.square_().sum(0)
    return result


def conv_bias_sum_grad_squared(grad_output: Tensor) -> Tensor:
    """``sum_n (sum_l G_n[:, l])**2`` for output gradients ``(B, out, *spatial)``."""
    per_example = grad_output.flatten(2).sum(2)
    return per_example.square().sum(0)


class ConvolutionFamilyExtension(OutputGradientExtension):
    """Convolutions and transposed convolutions: examples on dim 0 only, the weight's
    statistic from :meth:`weight_sum_grad_squared`, the bias's from the output gradient."""

    def batch_axis(self, module: nn.Module, inputs: Tensor, context: LayerContext) -> int:
        """Dim 0; an unbatched input (no examples dim) is refused."""
        if inputs.dim() != 2 + len(module.kernel_size):
            raise unbatched_input_error(context.name, type(module).__name__, inputs.shape)
        return super().batch_axis(module, inputs, context)

    def batch_axes(self, module: nn.Module, inputs: Tensor) -> tuple[int, ...]:
        """Only dim 0: a (transposed) convolution mixes the entries of every other dim."""
        return (0,)

    def weight_sum_grad_squared(self, module: nn.Module, inputs: Tensor,
                                grad_output: Tensor) -> Tensor:
        """``sum_n c_n**2`` of the weight (the layer type's maths)."""
        raise NotImplementedError

    def sum_grad_squared(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                         requested: frozenset[str]) -> dict[str, Tensor]:
        """``sum_n c_n**2`` of ``weight`` (per-example gradients in chunks) and ``bias``."""
        result = {}
        if "weight" in requested:
            result["weight"] = self.weight_sum_grad_squared(module, inputs, grad_output)
        if "bias" in requested:
            result["bias"] = conv_bias_sum_grad_squared(grad_output)
        return result


@register_extension
class ConvExtension(ConvolutionFamilyExtension):
    """``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` with any padding (and padding mode),
    stride, dilation and groups."""

    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def weight_sum_grad_squared(self, module: nn.Module, inputs: Tensor,
                                grad_output: Tensor) -> Tensor:
        """Unfolded patches against the output gradient (:func:`conv_weight_sum_grad_squared`)."""
        return conv_weight_sum_grad_squared(module, inputs, grad_output)
