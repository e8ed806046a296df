"""Parameters used several times in one forward pass: add per example, then square.

A parameter ``p`` that the forward pass uses more than once -- a layer called twice, a
module registered twice, two modules sharing one ``Parameter``, an output head tied to the
input embedding by ``F.linear(h, emb.weight)``, a bare ``nn.Parameter`` used in
``forward`` -- receives in example ``n``'s gradient the sum of the contributions of all
its uses, ``c_n = sum_u c_nu``. The statistic is ``sum_n c_n**2``, which is *not*
``sum_u sum_n c_nu**2``: the cross terms ``2 c_nu c_nv`` matter. Each use therefore hands
over its per-example contributions in a form that can be evaluated for any range of
examples, and :class:`Accumulator` forms, chunk by chunk of examples,
``sum_u c_nu`` for the examples of the chunk, squares and sums it. The forms:

* :class:`~msvag_mb.extensions.core.LayerCallUse`: one call of a hooked layer, from its
  saved input and output gradient (:meth:`~msvag_mb.extensions.core.OutputGradientExtension.
  per_example_contributions`);
* :class:`ProductUse`: a factored contribution ``c_n = L_n^T R_n`` (``L_n``: ``(rows, p)``,
  ``R_n``: ``(rows, q)``), e.g. ``F.linear(h, W)`` with ``L = G`` (output gradient) and
  ``R = H``; several such uses are just more rows;
* :class:`IndexUse`: an embedding lookup, ``c_n[v] = sum_{t: i_nt = v} G_nt`` (a Linear use
  with a one-hot input, scattered instead of materialised);
* :class:`DenseUse`: contributions already formed, ``(B, *p.shape)`` (bare parameters
  broadcast into per-example tensors);
* :class:`RowBlocksUse`: one call that uses disjoint row blocks of the parameter through
  separate maps (the packed in-projection of ``nn.MultiheadAttention`` on distinct query,
  key and value): ``c_n`` is the blocks' contributions at their row offsets, zero in the
  rows no block of the call reached.

Chunks hold :data:`~msvag_mb.extensions.core.CACHE_BUDGET_ELEMENTS` per-example elements,
so memory beyond the saved tensors stays bounded (a dense use holds its ``B`` copies).
A parameter used once keeps its layer's own single-use maths (no accumulator).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

from .core import CACHE_BUDGET_ELEMENTS, LayerCallUse, chunk_size  # noqa: F401
from .embedding import embedding_per_example
from .linear import linear_weight_sum_grad_squared


class PerExampleUse(Protocol):
    """One use of a parameter whose per-example contributions can be formed on demand."""

    def per_example(self, start: int, stop: int) -> Tensor:
        """``c_n`` of this use for examples ``start <= n < stop``: ``(stop - start, *shape)``."""


class ProductUse:
    """``c_n = L_n^T R_n`` for ``left`` ``(B, rows, p)`` and ``right`` ``(B, rows, q)``."""

    def __init__(self, left: Tensor, right: Tensor) -> None:
        self.left, self.right = left, right

    def per_example(self, start: int, stop: int) -> Tensor:
        """``(stop - start, p, q)`` by one batched matrix product."""
        return torch.bmm(self.left[start:stop].transpose(1, 2), self.right[start:stop])

    def sum_grad_squared(self) -> Tensor:
        """``sum_n c_n**2`` of this use alone: the Linear layer's maths (``L`` plays the
        output gradient, ``R`` the input)."""
        return linear_weight_sum_grad_squared(self.right, self.left)


class IndexUse:
    """``c_n[v] = sum_{t: indices[n, t] = v} grads[n, t]`` for ``indices`` ``(B, rows)`` and
    ``grads`` ``(B, rows, dim)``, a table of ``num_rows`` rows; ``padding_idx`` rows get
    nothing (as autograd gives them)."""

    def __init__(self, indices: Tensor, grads: Tensor, num_rows: int,
                 padding_idx: int | None = None) -> None:
        self.indices, self.grads, self.num_rows = indices, grads, num_rows
        self.padding_idx = padding_idx

    def per_example(self, start: int, stop: int) -> Tensor:
        """``(stop - start, num_rows, dim)`` by one ``index_add`` (no one-hot)."""
        return embedding_per_example(self.indices[start:stop], self.grads[start:stop],
                                     self.num_rows, self.padding_idx)


class DenseUse:
    """Contributions formed already: ``values`` ``(B, *shape)``."""

    def __init__(self, values: Tensor) -> None:
        self.values = values

    def per_example(self, start: int, stop: int) -> Tensor:
        """A slice of the stored contributions."""
        return self.values[start:stop]

    def sum_grad_squared(self) -> Tensor:
        """``sum_n c_n**2`` of this use alone."""
        return self.values.square().sum(0)


class RowBlocksUse:
    """One call's use of a parameter of ``shape`` in disjoint row blocks: ``c_n[o:o+r] =
    c_nb`` for the block ``b`` placed at row offset ``o`` (``r`` its rows), zero elsewhere.

    The call counts as one use of the parameter, handed over once its blocks' gradients
    are in; a block whose gradient never came (its rows did not reach the loss) is left
    out and contributes nothing, exactly as autograd gives it.
    """

    def __init__(self, shape: torch.Size) -> None:
        self.shape = tuple(shape)
        self.blocks: dict[int, PerExampleUse] = {}

    def place(self, offset: int, use: PerExampleUse) -> None:
        """The use of the block starting at row ``offset``."""
        if offset in self.blocks:
            raise RuntimeError(f"two uses for the row block at offset {offset}")
        self.blocks[offset] = use

    def per_example(self, start: int, stop: int) -> Tensor:
        """``(stop - start, *shape)``: each block's contributions in its rows."""
        count, result = stop - start, None
        for offset, use in sorted(self.blocks.items()):
            values = use.per_example(start, stop).reshape(count, -1, *self.shape[1:])
            if result is None:
                result = values.new_zeros(count, *self.shape)
            result[:, offset:offset + values.shape[1]] = values
        return result


class Accumulator:
    """``sum_n (sum_u c_nu)**2`` over the uses ``u`` of one parameter.

    ``expected`` uses were found in the autograd graph before the backward pass; the
    result is formed as soon as that many have arrived (their saved tensors are released
    then), or on :meth:`finish` (a use whose gradient never came contributes nothing).
    """

    def __init__(self, shape: torch.Size, batch_size: int, expected: int) -> None:
        self.shape, self.batch_size, self.expected = tuple(shape), batch_size, expected
        self.uses: list[PerExampleUse] = []
        self.result: Tensor | None = None

    def add(self, use: PerExampleUse) -> None:
        """Record one use's contributions; combine when all expected uses are in."""
        if self.result is not None:
            raise RuntimeError("a use arrived after the parameter's statistics were formed")
        self.uses.append(use)
        if len(self.uses) >= self.expected:
            self.finish()

    def finish(self) -> Tensor | None:
        """The statistic (``None``: no use arrived), formed once."""
        if self.result is None and self.uses:
            self.result = self._combine()
            self.uses.clear()
        return self.result

    def _combine(self) -> Tensor:
        if len(self.uses) == 1 and hasattr(self.uses[0], "sum_grad_squared"):
            return self.uses[0].sum_grad_squared().reshape(self.shape)
        step = chunk_size(math.prod(self.shape), CACHE_BUDGET_ELEMENTS)
        result = None
        for start in range(0, self.batch_size, step):
            stop = min(start + step, self.batch_size)
            total = None
            for use in self.uses:
                values = use.per_example(start, stop).reshape(stop - start, *self.shape)
                total = values if total is None else total + values
            chunk = total.square().sum(0)
            result = chunk if result is None else result.add_(chunk)
        return result


class ReuseState:
    """Which parameters have several uses in this forward pass (decided from the autograd
    graph before the backward pass), and their accumulators."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.analysed = False
        self.accumulators: dict[nn.Parameter, Accumulator] = {}

    def plan(self, param: nn.Parameter, expected: int) -> None:
        """Accumulate ``param``'s ``expected`` uses (instead of its layer's single-use maths)."""
        self.accumulators[param] = Accumulator(param.shape, self.batch_size, expected)

    def is_reused(self, param: nn.Parameter) -> bool:
        """Whether ``param``'s contributions go to an accumulator."""
        return param in self.accumulators

    def add(self, param: nn.Parameter, use: PerExampleUse) -> None:
        """One use of an accumulated parameter."""
        self.accumulators[param].add(use)

    def finished(self) -> dict[nn.Parameter, Tensor]:
        """``{param: sum_n c_n**2}`` of every accumulated parameter that got a use."""
        results = {}
        for param, accumulator in self.accumulators.items():
            value = accumulator.finish()
            if value is not None:
                results[param] = value.detach()
        return results
