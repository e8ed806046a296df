"""``nn.EmbeddingBag``: ``sum_n c_n**2`` from the bags' entries and the output gradient.

The examples are the bags: a 2-d input ``(B, L)`` holds one bag per row; a 1-d input with
``offsets`` holds the entries of all bags back to back, and is accepted when it is a
flattened view of a tensor with the examples along dim 0, every bag lying inside its own
example's block of entries (e.g. ``emb(x.reshape(-1), offsets=arange(0, B * L, L))``).

Every entry ``j`` of bag ``n`` adds ``a_j g_n`` to row ``v_j`` of the weight gradient,
where ``g_n`` is the bag's output gradient and ``a_j`` is ``per_sample_weights[j]`` (or
1) in mode ``'sum'``, one over the bag's number of entries in mode ``'mean'``, and 0 for
``padding_idx`` entries (which autograd gives no gradient and the mean does not count).
All entries of one example share ``g_n``, so with ``A[n, v] = sum_{j in n, v_j = v} a_j``

    sum_n c_n[v]**2 = sum_n A[n, v]**2 g_n**2,

a product of the squared coefficients with the squared output gradients, without any
per-example table. ``A`` is added up per (example, row) pair in a dense
``(B, num_embeddings)`` buffer when that is not much larger than the number of entries, else per distinct pair
(``torch.unique``), as for ``nn.Embedding``.

In mode ``'max'`` each dimension ``d`` of a non-empty bag takes its gradient from one row,
the row that held the maximum (the indices autograd saved for its own backward pass), so
``sum_n c_n[v, d]**2`` is the sum of ``g_n[d]**2`` over the bags whose maximum in ``d``
came from row ``v``: one ``scatter_add``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from msvag_mb.model_checks import FREQUENCY_SCALING_REASON, UnsupportedModelError

from .core import LayerContext, ModuleExtension, Removable, register_extension
from .layout import ExampleLayouts

#: use the dense ``(B, num_embeddings)`` coefficient buffer while it has at most this many
#: times as many elements as the bags have entries
DENSE_ROWS_FACTOR = 4


def entries_of_bags(indices: Tensor, offsets: Tensor | None, include_last_offset: bool,
                    ) -> tuple[Tensor, Tensor]:
    """``(rows, bags)``: the looked-up row and the bag of every entry that is in a bag
    (1-d: the entries from ``offsets[0]`` up to the end, or up to the last offset with
    ``include_last_offset``)."""
    if indices.dim() == 2:
        batch, length = indices.shape
        bags = torch.arange(batch, device=indices.device).repeat_interleave(length)
        return indices.reshape(-1), bags
    starts = offsets[:-1] if include_last_offset else offsets
    positions = torch.arange(indices.numel(), device=indices.device)
    bags = torch.searchsorted(starts, positions, right=True) - 1
    if include_last_offset:  # the entries in bags are a prefix (offsets[0] is 0)
        end = int(offsets[-1])
        return indices[:end], bags[:end]
    return indices, bags


def entry_coefficients(mode: str, rows: Tensor, bags: Tensor, batch: int,
                       per_sample_weights: Tensor | None, padding_idx: int | None,
                       dtype: torch.dtype) -> Tensor:
    """``a_j`` of every entry (see the module docstring) for modes ``'sum'`` and ``'mean'``."""
    if per_sample_weights is not None:
        coefficients = per_sample_weights.to(dtype)
    else:
        coefficients = torch.ones(rows.shape, dtype=dtype, device=rows.device)
    if padding_idx is not None:
        coefficients = coefficients * (rows != padding_idx)
    if mode == "mean":
        # here the coefficients are 1 per counted entry, 0 per padding entry
        counted = coefficients.new_zeros(batch).index_add_(0, bags, coefficients)
        coefficients = coefficients / counted.clamp_(min=1).index_select(0, bags)
    return coefficients


def weighted_rows_sum_grad_squared(rows: Tensor, bags: Tensor, coefficients: Tensor,
                                   grad_output: Tensor, num_embeddings: int) -> Tensor:
    """``sum_n A[n, v]**2 g_n**2`` ``(num_embeddings, D)`` for entries ``(rows, bags,
    coefficients)`` and output gradients ``g`` ``(B, D)``."""
    batch, dim = grad_output.shape
    keys = bags * num_embeddings + rows
    squared = grad_output.square()
    if batch * num_embeddings <= DENSE_ROWS_FACTOR * max(1, keys.numel()):
        per_pair = coefficients.new_zeros(batch * num_embeddings).index_add_(0, keys,
                                                                             coefficients)
        return torch.mm(per_pair.view(batch, num_embeddings).square_().t(), squared)
    distinct, position = torch.unique(keys, return_inverse=True)
    per_pair = coefficients.new_zeros(distinct.numel()).index_add_(0, position, coefficients)
    # index_select: much faster than advanced indexing on CPU (measured)
    contributions = per_pair.square_().unsqueeze(1) * squared.index_select(
        0, distinct // num_embeddings)
    result = grad_output.new_zeros(num_embeddings, dim)
    return result.index_add_(0, distinct % num_embeddings, contributions)


def max_rows_sum_grad_squared(max_indices: Tensor, filled: Tensor, grad_output: Tensor,
                              num_embeddings: int) -> Tensor:
    """Mode ``'max'``: ``sum_n g_n[d]**2`` into row ``max_indices[n, d]`` for the bags that
    are ``filled`` (have an entry other than ``padding_idx``)."""
    squared = grad_output.square() * filled.unsqueeze(1)
    result = grad_output.new_zeros(num_embeddings, grad_output.shape[1])
    return result.scatter_add_(0, max_indices.clamp(min=0), squared)


def bags_within_examples(offsets: Tensor, include_last_offset: bool, entries: int,
                         batch: int) -> bool:
    """Whether bag ``n`` of a flat input made of ``batch`` blocks of ``entries // batch``
    entries lies inside block ``n``, for every ``n`` (one host synchronisation)."""
    starts = offsets[:-1] if include_last_offset else offsets
    if starts.numel() != batch or entries % batch:
        return False
    ends = offsets[1:] if include_last_offset else torch.cat(
        [offsets[1:], offsets.new_full((1,), entries)])
    block = entries // batch
    first = torch.arange(batch, device=offsets.device) * block
    return bool(((starts >= first) & (ends <= first + block)).all())


def _bag_arguments(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(input, offsets, per_sample_weights)`` of a call, positional or by keyword."""
    names = ("input", "offsets", "per_sample_weights")
    values = [kwargs.get(name, args[i] if i < len(args) else None)
              for i, name in enumerate(names)]
    return values[0], values[1], values[2]


@register_extension
class EmbeddingBagExtension(ModuleExtension):
    """``nn.EmbeddingBag`` in modes ``'sum'``, ``'mean'`` and ``'max'``, 2-d input or 1-d
    input with offsets (``include_last_offset`` too), ``per_sample_weights``,
    ``padding_idx`` and ``max_norm``."""

    module_types = (nn.EmbeddingBag,)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Refuse ``sparse=True`` and ``scale_grad_by_freq=True`` (the latter couples examples)."""
        if module.sparse:
            return "has sparse=True (sparse gradients); construct it with sparse=False."
        if module.scale_grad_by_freq:
            return f"has {FREQUENCY_SCALING_REASON}."
        return None

    def parameter_names(self, module: nn.Module) -> frozenset[str]:
        """Only the table."""
        return frozenset({"weight"})

    def check_bags(self, module: nn.Module, indices: Tensor, offsets: Tensor | None,
                   context: LayerContext) -> None:
        """Refuse a call whose bags are not the examples, bag n being example n (the
        output then holds the examples along dim 0)."""
        if indices.dim() == 2:  # one bag per row: the examples must lie along the rows
            context.batch_axis(indices, "EmbeddingBag", (0,))
            return
        # else a 1-d input with offsets (the forward, which ran, refuses anything else)
        batch = context.batch_size
        blocks = indices.view(batch, -1) if indices.numel() % batch == 0 else None
        traced = blocks is not None and context.layouts.layout(blocks) == (
            0, 1, tuple(blocks.shape))
        if not (traced and bags_within_examples(offsets, module.include_last_offset,
                                                indices.numel(), batch)):
            raise UnsupportedModelError(
                f"layer '{context.name}' (EmbeddingBag) got a 1-d input with offsets whose "
                "bags cannot be matched to the examples: the input must be a flattened "
                "view of a tensor with the examples along dim 0 (x.reshape(-1), not a copy "
                "or a masked selection) and bag n must lie inside example n's entries. Pass "
                "the bags as a 2-d (B, L) input (padding_idx for shorter bags), or use "
                "engine='vmap' (engine='auto' falls back to it).")

    def attach(self, module: nn.Module, context: LayerContext) -> list[Removable]:
        """A forward hook (with keyword arguments: offsets, per_sample_weights) that locates
        the bags and hooks the output gradient."""
        handles: list[Removable] = []

        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor):
            context.count_call()
            indices, offsets, weights = _bag_arguments(args, kwargs)
            self.check_bags(module, indices, offsets, context)
            context.layouts.register(output, 0)
            context.uses.record_call(context.name, (args, kwargs), output)
            max_indices = _saved_max_indices(module, output, context)
            saved = [t for t in (indices, offsets, weights) if t is not None]
            versions = [t._version for t in saved]

            def on_output_gradient(grad_output: Tensor) -> None:
                if [t._version for t in saved] != versions:
                    raise RuntimeError(
                        f"the input of layer '{context.name}' was modified in place after "
                        "the layer ran, so its per-example statistics cannot be computed; "
                        "avoid the in-place operation.")
                context.emit("weight", embedding_bag_sum_grad_squared(
                    module, indices, offsets, weights, max_indices,
                    grad_output.detach().to(module.weight.dtype)))

            if output.requires_grad:
                handles.append(output.register_hook(on_output_gradient))

        handles.append(module.register_forward_hook(forward_hook, with_kwargs=True))
        return handles

    def track_layout(self, module: nn.Module, layouts: ExampleLayouts) -> list[Removable]:
        """A frozen EmbeddingBag: its output holds the examples along dim 0 where its 2-d
        input does (a 1-d input's bags are not located: nothing is registered)."""
        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            indices = _bag_arguments(args, kwargs)[0]
            if isinstance(indices, Tensor) and indices.dim() == 2 and \
                    layouts.known_axis(indices) == 0:
                layouts.register(output, 0)

        return [module.register_forward_hook(forward_hook, with_kwargs=True)]


def _saved_max_indices(module: nn.EmbeddingBag, output: Tensor,
                       context: LayerContext) -> Tensor | None:
    """Mode ``'max'``: the rows of the maxima, ``(B, D)``, as autograd saved them for the
    backward pass (so ties are broken as its own backward breaks them); refused if absent."""
    if module.mode != "max":
        return None
    saved = getattr(output.grad_fn, "_saved_result3", None)
    if not isinstance(saved, Tensor) or saved.shape != output.shape:
        raise UnsupportedModelError(
            f"layer '{context.name}' (EmbeddingBag) in mode='max': the rows of the maxima "
            "that autograd saves were not found on its output (another torch version, or a "
            "hook that wraps the output); use mode='sum' or 'mean', or engine='vmap'.")
    return saved


def embedding_bag_sum_grad_squared(module: nn.EmbeddingBag, indices: Tensor,
                                   offsets: Tensor | None, per_sample_weights: Tensor | None,
                                   max_indices: Tensor | None, grad_output: Tensor) -> Tensor:
    """``sum_n c_n**2`` of the table, for output gradients ``(B, D)`` (one bag per example)."""
    rows, bags = entries_of_bags(indices, offsets, module.include_last_offset)
    batch = grad_output.shape[0]
    if max_indices is not None:
        counted = (torch.ones(rows.shape, dtype=grad_output.dtype, device=rows.device)
                   if module.padding_idx is None else (rows != module.padding_idx)
                   .to(grad_output.dtype))
        filled = grad_output.new_zeros(batch).index_add_(0, bags, counted).clamp_(max=1)
        return max_rows_sum_grad_squared(max_indices, filled, grad_output,
                                         module.num_embeddings)
    weights = None
    if per_sample_weights is not None:
        # the entries in bags are a prefix of the input (offsets[0] is 0)
        weights = per_sample_weights.detach().reshape(-1)[:rows.numel()]
    coefficients = entry_coefficients(module.mode, rows, bags, batch, weights,
                                      module.padding_idx, grad_output.dtype)
    return weighted_rows_sum_grad_squared(rows, bags, coefficients, grad_output,
                                          module.num_embeddings)
