"""The per-example maths shared by the normalisation layers (LayerNorm, RMSNorm, GroupNorm,
InstanceNorm).

Each of them normalises each example on its own and then applies an elementwise affine map,
``y = x_hat * weight + bias``, with the parameters indexed by some axes of the input (the
*parameter axes*: LayerNorm's and RMSNorm's ``normalized_shape``, the channels of GroupNorm
and InstanceNorm) and shared over the others (the *summed axes*: sequence positions,
spatial positions). Since ``x_hat`` of example ``n`` depends on example ``n`` only, its
contributions to the batch gradient are

* ``weight``: ``c_n = sum_s G_n[s, p] * x_hat_n[s, p]`` over the summed positions ``s``;
* ``bias``: ``c_n = sum_s G_n[s, p]``;

with ``G`` the gradient w.r.t. the layer's output (it carries the loss's scaling), and
``sum_n c_n**2`` follows from these ``(B, parameter shape)`` tensors (which are also what a
layer called several times adds up over its calls before squaring). The only temporary the
size of the input is ``x_hat`` itself, recomputed once by torch's own normalisation kernel
with the module's ``eps`` (so it is the ``x_hat`` the forward pass computed, up to rounding)
and multiplied by ``G`` in place.
"""

from __future__ import annotations

from abc import abstractmethod

from torch import Tensor, nn

from .core import OutputGradientExtension


def sum_over(values: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``values`` summed over ``dims``; a copy when ``dims`` is empty (``Tensor.sum(())``
    would sum over everything, and the caller may change the result in place)."""
    return values.sum(dims) if dims else values.clone()


def affine_contributions(x_hat: Tensor | None, grad_output: Tensor,
                         summed_dims: tuple[int, ...], bias: bool) -> dict[str, Tensor]:
    """Per-example contributions ``{"weight": sum_s G_n x_hat_n, "bias": sum_s G_n}``,
    ``(B, *parameter shape)`` each.

    ``x_hat`` and ``grad_output``: the examples along dim 0, the parameter axes and the
    ``summed_dims`` (neither containing 0) in between; ``x_hat`` is ``None`` when the weight
    is not wanted, and it is overwritten (the caller's own temporary). ``bias``: whether the
    bias's is wanted.
    """
    result = {}
    if x_hat is not None:
        result["weight"] = sum_over(x_hat.mul_(grad_output), summed_dims)
    if bias:
        result["bias"] = sum_over(grad_output, summed_dims)
    return result


def sum_of_squares(contributions: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sum_n c_n**2`` of each parameter's per-example contributions ``c`` (dim 0: n)."""
    return {name: c.square_().sum(0) for name, c in contributions.items()}


def channel_summed_dims(inputs: Tensor) -> tuple[int, ...]:
    """The summed axes of a ``(B, C, *)`` input whose parameters index the channels."""
    return tuple(range(2, inputs.dim()))


def leading_summed_dims(inputs: Tensor, parameter_dims: int) -> tuple[int, ...]:
    """The summed axes of a ``(B, *, *normalized_shape)`` input whose parameters index the
    last ``parameter_dims`` axes (LayerNorm, RMSNorm)."""
    return tuple(range(1, inputs.dim() - parameter_dims))


class AffineNormExtension(OutputGradientExtension):
    """Glue shared by the normalisation layers: both the statistics and the per-example
    contributions (for a layer called several times) come from :meth:`contributions`."""

    @abstractmethod
    def contributions(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                      requested: frozenset[str]) -> dict[str, Tensor]:
        """Per-example contributions ``(B, *shape)`` of the requested parameters (see
        :func:`affine_contributions`)."""

    def sum_grad_squared(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                         requested: frozenset[str]) -> dict[str, Tensor]:
        """``sum_n c_n**2`` of the requested affine parameters."""
        return sum_of_squares(self.contributions(module, inputs, grad_output, requested))

    def per_example_contributions(self, module: nn.Module, inputs: Tensor,
                                  grad_output: Tensor,
                                  requested: frozenset[str]) -> dict[str, Tensor]:
        """``c`` of the requested affine parameters, in closed form (no re-run of the
        layer, which would also update an InstanceNorm's running statistics)."""
        return self.contributions(module, inputs, grad_output, requested)
