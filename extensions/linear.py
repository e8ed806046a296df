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
  more, and saves only memory that chunking already bounds; measured on the char-RNN decoder
  (B=50, T=50, 128->83, float32) bmm took 0.7 ms and the Gram form 80 ms
  (``benchmarks/bench_extensions.py --linear-variants``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from msvag_mb.engines.base import UnsupportedModelError

from .core import (
    CACHE_BUDGET_ELEMENTS,
    LayerContext,
    OutputGradientExtension,
    batch_axis,
    chunk_size,
    register_extension,
)


def linear_weight_sum_grad_squared(inputs: Tensor, grad_output: Tensor) -> Tensor:
    """``sum_n (G_n^T X_n)**2`` for inputs ``(B, *, in)`` and output gradients ``(B, *, out)``."""
    batch = inputs.shape[0]
    x = inputs.reshape(batch, -1, inputs.shape[-1])
    g = grad_output.reshape(batch, -1, grad_output.shape[-1])
    if x.shape[1] == 1:  # one row per example: no per-example matrices needed
        return torch.mm(g[:, 0].square().t(), x[:, 0].square())
    out_features, in_features = g.shape[-1], x.shape[-1]
    result = g.new_zeros(out_features, in_features)
    step = chunk_size(out_features * in_features, CACHE_BUDGET_ELEMENTS)
    for start in range(0, batch, step):
        per_example = torch.bmm(g[start:start + step].transpose(1, 2), x[start:start + step])
        result += per_example.square_().sum(0)
    return result


def linear_bias_sum_grad_squared(grad_output: Tensor) -> Tensor:
    """``sum_n (sum_t G_n[t])**2`` for output gradients ``(B, *, out)``."""
    per_example = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1]).sum(1)
    return per_example.square().sum(0)


@register_extension
class LinearExtension(OutputGradientExtension):
    """``nn.Linear`` with any number of extra (sequence) dims between batch and features."""

    module_types = (nn.Linear,)

    def batch_axis(self, module: nn.Module, inputs: Tensor, context: LayerContext) -> int:
        if inputs.dim() < 2:  # a single unbatched feature vector holds no examples
            raise UnsupportedModelError(
                f"layer '{context.name}' (Linear) got an unbatched input of shape "
                f"{tuple(inputs.shape)}; pass inputs with the examples along dim 0."
            )
        return batch_axis(inputs, context)

    def sum_grad_squared(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                         requested: frozenset[str]) -> dict[str, Tensor]:
        result = {}
        if "weight" in requested:
            result["weight"] = linear_weight_sum_grad_squared(inputs, grad_output)
        if "bias" in requested:
            result["bias"] = linear_bias_sum_grad_squared(grad_output)
        return result
