"""``nn.Embedding``: ``sum_n c_n**2`` from the looked-up indices and the output gradient.

Example n's contribution to row v of the weight is the sum of the output gradients at the
positions where example n looks up v; a row that example n uses several times gets the sum
*before* squaring. ``padding_idx`` positions contribute nothing (autograd gives that row no
gradient). Two equivalent ways to add up per (example, row) pair:

* dense: ``index_add`` into a ``(B * num_embeddings, dim)`` buffer, when that buffer is not
  much larger than the output gradient (small vocabularies such as characters);
* sparse: ``torch.unique`` on the ``(example, row)`` keys, then ``index_add`` into one row per
  distinct pair (large vocabularies: memory stays the size of the output gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .core import OutputGradientExtension, register_extension

#: use the dense buffer while it has at most this many times the output gradient's rows
DENSE_ROWS_FACTOR = 4


def embedding_sum_grad_squared(indices: Tensor, grad_output: Tensor, num_embeddings: int,
                               padding_idx: int | None = None) -> Tensor:
    """``sum_n c_n**2`` for ``weight`` from ``indices`` ``(B, *)`` and ``grad_output``
    ``(B, *, D)``; ``padding_idx`` positions contribute nothing."""
    batch, dim = indices.shape[0], grad_output.shape[-1]
    rows = indices.reshape(batch, -1)
    grads = grad_output.reshape(batch, -1, dim)
    # one key per (example, row) pair
    keys = rows + num_embeddings * torch.arange(batch, device=rows.device).unsqueeze(1)
    keys, grads = keys.reshape(-1), grads.reshape(-1, dim)
    if padding_idx is not None:
        used = rows.reshape(-1) != padding_idx
        keys, grads = keys[used], grads[used]
    if batch * num_embeddings <= DENSE_ROWS_FACTOR * max(1, keys.numel()):
        per_pair = grads.new_zeros(batch * num_embeddings, dim).index_add_(0, keys, grads)
        return per_pair.view(batch, num_embeddings, dim).square().sum(0)
    distinct, position = torch.unique(keys, return_inverse=True)
    per_pair = grads.new_zeros(distinct.numel(), dim).index_add_(0, position, grads)
    result = grads.new_zeros(num_embeddings, dim)
    return result.index_add_(0, distinct % num_embeddings, per_pair.square_())


def embedding_per_example(indices: Tensor, grad_output: Tensor, num_embeddings: int,
                          padding_idx: int | None = None) -> Tensor:
    """The contributions themselves, ``(B, num_embeddings, D)``: ``c_n[v]`` is the sum of
    the output gradients where example n looks up row v (one ``index_add``, no one-hot),
    for ``indices`` ``(B, *)`` and ``grad_output`` ``(B, *, D)``."""
    batch, dim = indices.shape[0], grad_output.shape[-1]
    rows = indices.reshape(batch, -1)
    keys = rows + num_embeddings * torch.arange(batch, device=rows.device).unsqueeze(1)
    keys, grads = keys.reshape(-1), grad_output.reshape(-1, dim)
    if padding_idx is not None:
        used = rows.reshape(-1) != padding_idx
        keys, grads = keys[used], grads[used]
    table = grads.new_zeros(batch * num_embeddings, dim).index_add_(0, keys, grads)
    return table.view(batch, num_embeddings, dim)


@register_extension
class EmbeddingExtension(OutputGradientExtension):
    """``nn.Embedding`` (dense gradients), with or without ``padding_idx`` and ``max_norm``."""

    module_types = (nn.Embedding,)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Refuse ``sparse=True`` and ``scale_grad_by_freq=True`` (the latter couples examples)."""
        if module.sparse:
            return "has sparse=True; construct it with sparse=False or use engine='vmap'."
        if module.scale_grad_by_freq:
            # the gradient is divided by each index's count in the whole batch, which
            # couples the examples: per-example contributions are not independent
            return ("has scale_grad_by_freq=True, which scales each example's gradient by "
                    "counts over the whole batch (examples are not independent); construct "
                    "it with scale_grad_by_freq=False.")
        return None

    def batch_axes(self, module: nn.Module, inputs: Tensor) -> range:
        """Any axis of the index tensor (``(B, T)``, ``(T, B)``, ...)."""
        return range(inputs.dim())

    def sum_grad_squared(self, module: nn.Module, inputs: Tensor, grad_output: Tensor,
                         requested: frozenset[str]) -> dict[str, Tensor]:
        """``sum_n c_n**2`` of the table (rows of ``padding_idx`` get no contribution)."""
        if "weight" not in requested:
            return {}
        return {"weight": embedding_sum_grad_squared(inputs, grad_output,
                                                     module.num_embeddings, module.padding_idx)}

    def per_example_contributions(self, module: nn.Module, inputs: Tensor,
                                  grad_output: Tensor,
                                  requested: frozenset[str]) -> dict[str, Tensor]:
        """``c_n`` of the table (see :func:`embedding_per_example`)."""
        if "weight" not in requested:
            return {}
        return {"weight": embedding_per_example(inputs, grad_output, module.num_embeddings,
                                                module.padding_idx)}
