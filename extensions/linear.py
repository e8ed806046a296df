"""``nn.Linear``: ``sum_n c_n**2`` from the layer input X and the output gradient G.

Example n's weight contribution is ``G_n^T X_n`` (``G_n``: ``(T, out)``, ``X_n``: ``(T, in)``,
``T`` = product of the extra sequence dims, 1 without them); its bias contribution is
``sum_t G_n[t]``. G already carries the loss's scaling (1/B for a mean), so these are the
contributions c_n themselves.

* No sequence dims (T = 1): ``sum_n (g_n x_n^T)**2 = (G**2)^T (X**2)``, one matmul the size of
  the weight gradient's, without materialising per-example matrices.
* Sequence dims: per-example matrices by ``bmm`` (``B*T*out*in`` multiply-adds), in
  cache-sized chunks of examples. The "Gram" alternative,
  ``sum_{n,t,s} (G_nt * G_ns)^T (X_nt * X_ns)``, needs ``B*T^2*out*in`` multiply-adds, T times
  more, and saves only memory that chunking already bounds; it was much slower where
  measured (docs/benchmarks.md; ``benchmarks/bench_engines.py --linear-variants``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from msvag_mb.model_checks import unbatched_input_error
from msvag_mb.ops import SMALL_ELEMENTS, at_most_threads

from .core import (
    CACHE_BUDGET_ELEMENTS,
    LayerContext,
    OutputGradientExtension,
    chunk_size,
    register_extension,
)


def linear_weight_sum_grad_squared(inputs: Tensor, grad_output: Tensor) -> Tensor:
    """``sum_n (G_n^T X_n)**2`` for inputs ``(B, *, in)`` and output gradients ``(B, *, out)``."""
    return linear_sum_grad_squared(inputs, grad_output, weight=True, bias=False)[0]


def linear_sum_grad_squared(inputs: Tensor, grad_output: Tensor, weight: bool = True,
                            bias: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """``(weight's, bias's)`` ``sum_n c_n**2`` (``None`` where not wanted) for inputs
    ``(B, *, in)`` and output gradients ``(B, *, out)``.

    Without sequence dims both come from ``G**2``, squared once: the weight's is
    ``(G**2)^T (X**2)`` and the bias's the column sums of ``G**2``. Every elementwise
    kernel costs a wake-up of the worker threads (as much as a small kernel itself), so
    the MLP path runs three kernels per layer, the two squares and the matmul, plus the
    bias's column sums, and the elementwise ones on one thread when the tensors are small
    (:func:`msvag_mb.ops.at_most_threads`).
    """
    batch = inputs.shape[0]
    x = inputs.reshape(batch, -1, inputs.shape[-1])
    g = grad_output.reshape(batch, -1, grad_output.shape[-1])
    if x.shape[1] == 1:  # one row per example: no per-example matrices needed
        x, g = x[:, 0], g[:, 0]
        small = x.device.type == "cpu" and max(x.numel(), g.numel()) < SMALL_ELEMENTS
        with at_most_threads(1 if small else None):
            g_squared = g.square()
            x_squared = x.square() if weight else None
            bias_sq = g_squared.sum(0) if bias else None
        weight_sq = torch.mm(g_squared.t(), x_squared) if weight else None
        return weight_sq, bias_sq
    weight_sq = None
    if weight:
        out_features, in_features = g.shape[-1], x.shape[-1]
        step = chunk_size(out_features * in_features, CACHE_BUDGET_ELEMENTS)
        for start in range(0, batch, step):
            per_example = torch.bmm(g[start:start + step].transpose(1, 2),
                                    x[start:start + step])
            chunk = per_example.square_().sum(0)
            weight_sq = chunk if weight_sq is None else weight_sq.add_(chunk)
    bias_sq = g.sum(1).square_().sum(0) if bias else None
    return weight_sq, bias_sq


def linear_per_example(inputs: Tensor, grad_output: Tensor, weight: bool = True,
                       bias: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """The contributions themselves, ``(B, out, in)`` for the weight (``G_n^T X_n``, one
    ``bmm``) and ``(B, out)`` for the bias (``sum_t G_n[t]``), ``None`` where not wanted,
    for inputs ``(B, *, in)`` and output gradients ``(B, *, out)``."""
    batch = inputs.shape[0]
    x = inputs.reshape(batch, -1, inputs.shape[-1])
    g = grad_output.reshape(batch, -1, grad_output.shape[-1])
    return (torch.bmm(g.transpose(1, 2), x) if weight else None,
            g.sum(1) if bias else None)


@register_extension
class LinearExtension(OutputGradientExtension):
    """``nn.Linear`` with any number of extra (sequence) dims between batch and features."""

    module_types = (nn.Linear,)

    def batch_axis(self, module: nn.Module, inputs: Tensor, context: LayerContext) -> int:
        """The examples' axis of ``inputs`` (any but the features'); an unbatched feature
        vector is refused."""
        if inputs.dim() < 2:  # a single unbatched feature vector holds no examples
            raise unbatched_input_error(context.name, "Linear", inputs.shape)
        return super().batch_axis(module, inputs, context)

    def sum_grad_squared(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                         requested: frozenset[str]) -> dict[str, Tensor]:
        """``sum_n c_n**2`` of ``weight`` and ``bias`` from ``X`` and ``G``."""
        weight_sq, bias_sq = linear_sum_grad_squared(inputs, grad_output,
                                                     weight="weight" in requested,
                                                     bias="bias" in requested)
        result = {}
        if weight_sq is not None:
            result["weight"] = weight_sq
        if bias_sq is not None:
            result["bias"] = bias_sq
        return result

    def per_example_contributions(self, module: nn.Module, inputs: Tensor,
                                  grad_output: Tensor,
                                  requested: frozenset[str]) -> dict[str, Tensor]:
        """``c_n`` of ``weight`` and ``bias`` (see :func:`linear_per_example`)."""
        weight, bias = linear_per_example(inputs, grad_output, "weight" in requested,
                                          "bias" in requested)
        return {name: value for name, value in (("weight", weight), ("bias", bias))
                if value is not None}
