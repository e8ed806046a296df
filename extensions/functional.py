"""Parameters used by operations outside their layers: per-example contributions by rule.

A bare ``nn.Parameter`` used in ``forward`` (a positional embedding ``x + self.pos[:T]``,
a learnable scale ``h * self.gain``), or a layer's parameter used functionally (an output
head tied to the input embedding, ``F.linear(h, self.emb.weight)``) is found in the
autograd graph before the backward pass (:meth:`~msvag_mb.extensions.uses.
ParameterUses.find`) as an input of a *consumer*, an operation whose output holds the
examples, computed from parameters only (the *parameter side*: ``pos[:T]``,
``emb.weight.t()``, ``bias * weight.sum()``). Per consumer type, the contribution of
example n to that input, ``dQ_n``, follows from the consumer's output gradient ``G``
(hooked with :meth:`torch.autograd.graph.Node.register_prehook`) and its saved operands:

* ``Q`` broadcast into ``x + Q``, ``x - Q``, ``x * Q``, ``x / Q``, ``Q / x``:
  ``dQ_n = sum over the broadcast dims of G_n * (d out / d Q)``, ``G_n`` the part of G that
  belongs to example n (``Q`` must not vary along the examples' axis);
* ``Q`` the weight of a matrix product (``F.linear``, ``matmul``: ``mm``/``addmm`` rows
  ``x_r``): ``dQ_n = sum_{r in n} x_r^T g_r`` (or its transpose), kept *factored*
  (:class:`~msvag_mb.extensions.reuse.ProductUse`) where the parameter side is only a
  transpose or a cast; ``addmm``'s bias: ``dQ_n = beta sum_{r in n} g_r``;
* ``Q`` the table of ``F.embedding``: scattered by the indices
  (:class:`~msvag_mb.extensions.reuse.IndexUse`).

From ``dQ_n`` to the parameters, the parameter side is linear in its output gradient:
its own autograd nodes are called under ``torch.func.vmap`` over the examples (tried once
on zeros before the backward pass, so that a node without a batching rule is refused
then). Any other consumer is refused before the backward pass, naming the parameter.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from msvag_mb.model_checks import no_examples_use_error, unsupported_use_error

from .core import MEMORY_BUDGET_ELEMENTS, chunk_size
from .layout import MIXED, UNTRACKED
from .reuse import DenseUse, IndexUse, PerExampleUse, ProductUse
from .uses import _LEAF, FunctionalUse

#: nodes on the parameter side that change nothing but the dtype (autocast's weight cast)
_CASTS = frozenset({"ToCopyBackward0", "AliasBackward0"})


def operation(node) -> str:
    """``"MmBackward0"`` -> ``"Mm"``."""
    name = type(node).__name__
    cut = name.rfind("Backward")
    return name[:cut] if cut > 0 else name


def _shape(edge) -> tuple[int, ...]:
    node, output_nr = edge
    if type(node) is _LEAF:
        return tuple(node.variable.shape)
    return tuple(node._input_metadata[output_nr].shape)


class ParameterSide:
    """The operations between a consumer's input ``Q`` and the parameters it is computed
    from: per-example ``dQ_n`` to per-example contributions of each tracked parameter."""

    def __init__(self, entry: tuple[object, int], parameters: list[nn.Parameter]) -> None:
        self.entry, self.shape = entry, _shape(entry)
        self.wanted = {id(p): p for p in parameters}
        self.order = self._topological(entry[0])

    @staticmethod
    def _topological(start) -> list:
        if type(start) is _LEAF:
            return []
        order, seen, stack = [], set(), [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            stack.extend((child, False) for child, _ in node.next_functions
                         if child is not None and type(child) is not _LEAF)
        return order[::-1]  # every node before the nodes it feeds into

    def _one_example(self, grad: Tensor) -> dict[int, Tensor]:
        pending: dict[tuple[object, int], Tensor] = {self.entry: grad}
        found: dict[int, Tensor] = {}
        if type(self.entry[0]) is _LEAF:
            return {id(self.entry[0].variable): grad}
        for node in self.order:
            metadata = node._input_metadata
            grads = [pending.pop((node, k), None) for k in range(len(metadata))]
            if all(g is None for g in grads):
                continue
            grads = [g if g is not None else torch.zeros(tuple(m.shape), dtype=grad.dtype,
                                                         device=grad.device)
                     for g, m in zip(grads, metadata)]
            results = node(*grads)
            results = results if isinstance(results, tuple) else (results,)
            for (child, output_nr), result in zip(node.next_functions, results):
                if child is None or result is None:
                    continue
                expected = _shape((child, output_nr))
                if tuple(result.shape) != expected:  # as the engine does: broadcast inputs
                    result = result.sum_to_size(expected)
                key = id(child.variable) if type(child) is _LEAF else None
                if key is not None:
                    if key in self.wanted:
                        found[key] = found[key] + result if key in found else result
                    continue
                edge = (child, output_nr)
                pending[edge] = pending[edge] + result if edge in pending else result
        return found

    def contributions(self, per_example: Tensor) -> dict[nn.Parameter, Tensor]:
        """``{parameter: (B, *shape)}`` from ``per_example`` ``(B, *Q.shape)``, in chunks of
        examples (:data:`~msvag_mb.extensions.core.MEMORY_BUDGET_ELEMENTS`)."""
        per_param = sum(p.numel() for p in self.wanted.values()) + math.prod(self.shape)
        step = chunk_size(per_param, MEMORY_BUDGET_ELEMENTS)
        batched = torch.func.vmap(self._one_example)
        chunks: dict[int, list[Tensor]] = {}
        with torch.no_grad():
            for start in range(0, per_example.shape[0], step):
                for key, value in batched(per_example[start:start + step]).items():
                    chunks.setdefault(key, []).append(value)
        return {self.wanted[key]: torch.cat(values) for key, values in chunks.items()}


def _factored_orientation(entry, parameters: list[nn.Parameter]) -> tuple[bool, object] | None:
    """For a matrix product's weight input: ``(transposed, parameter)`` if the parameter
    side is the parameter itself, possibly transposed and cast; else ``None``."""
    node, transposed = entry[0], False
    while type(node) is not _LEAF:
        name = type(node).__name__
        if name == "TBackward0":
            transposed = not transposed
        elif name not in _CASTS:
            return None
        if len(node.next_functions) != 1 or node.next_functions[0][0] is None:
            return None
        node = node.next_functions[0][0]
    param = next((p for p in parameters if p is node.variable), None)
    return None if param is None else (transposed, param)


class FunctionalRule:
    """How one functional use turns its consumer's output gradient into per-example uses
    of its parameters (built before the backward pass, which refuses what it cannot do)."""

    def __init__(self, use: FunctionalUse, layouts, names: dict[nn.Parameter, str]) -> None:
        self.use, self.layouts = use, layouts
        self.batch = layouts.batch_size
        self.name = names.get(use.parameters[0], str(tuple(use.parameters[0].shape)))
        self.dtype = use.parameters[0].dtype
        self.kind = operation(use.consumer)
        self.side: ParameterSide | None = None
        builder = _BUILDERS.get((self.kind, use.index)) or _BUILDERS.get((self.kind, None))
        if builder is None:
            self.refuse("its per-example contributions have no rule here")
        self.on_gradient: Callable[[Tensor], list[tuple[nn.Parameter, PerExampleUse]]] = \
            builder(self)

    def refuse(self, why: str):
        """Raise the refusal of this use."""
        raise unsupported_use_error(self.name, self.kind, why)

    def dense(self) -> Callable[[Tensor], list[tuple[nn.Parameter, PerExampleUse]]]:
        """Per-example ``dQ_n`` through the parameter side (tried once on zeros now)."""
        self.side = ParameterSide(self.use.entry, self.use.parameters)
        try:
            parameter = self.use.parameters[0]
            self.side.contributions(torch.zeros(1, *self.side.shape, dtype=self.dtype,
                                                device=parameter.device))
        except Exception as error:  # noqa: BLE001  (a node vmap cannot run: refused now)
            self.refuse(f"the operations on the parameter before it cannot be batched "
                        f"over examples ({type(error).__name__}: {error})")
        return lambda per_example: [(p, DenseUse(v)) for p, v in
                                    self.side.contributions(per_example).items()]

    def output_axis(self, shape: tuple[int, ...], operand: Tensor | None = None) -> int:
        """The examples' axis of the consumer's output (traced; else that of a saved
        operand holding examples; else the one axis of size B), refused if unknown."""
        traced = self.layouts.child((self.use.consumer, 0), 0)
        if (not isinstance(traced, tuple) and traced is not MIXED and operand is not None
                and operand.dim() <= len(shape)):
            found = self.layouts.layout(operand)
            if isinstance(found, tuple):
                traced = (found[0] + len(shape) - operand.dim(), found[1], shape)
        if isinstance(traced, tuple):
            axis, within, _ = traced
            if within != 1 or shape[axis] != self.batch:
                self.refuse("the examples are merged with another axis of its output")
            return axis
        if traced is MIXED:
            self.refuse("its output combines tensors whose examples lie along different axes")
        candidates = [a for a, size in enumerate(shape) if size == self.batch]
        if not shape:  # combined with the examples only after they were reduced (the loss)
            raise no_examples_use_error(self.name)
        if len(candidates) != 1:
            self.refuse(f"the examples' axis of its output {shape} cannot be located (no "
                        f"axis or several axes of size {self.batch}, not traced back to "
                        "the model's inputs)")
        return candidates[0]

    def rows(self, tensor: Tensor) -> int:
        """Where the examples are among the rows of a matrix product's left factor
        ``(rows, k)``: row r belongs to example ``(r // within) % B`` (``within``
        returned: consecutive rows of one example; ``rows / (within * B)`` such blocks,
        e.g. the ``(T * B, k)`` of a sequence-first input has ``within = 1``)."""
        traced = self.layouts.layout(tensor)
        count = tensor.shape[0]
        base = tensor._base
        if traced is UNTRACKED and base is not None and _reshaped_whole(tensor, base):
            traced = self.layouts.layout(base)  # x.view(-1, k) of a model input
            if isinstance(traced, tuple) and traced[:2] == (0, 1) and count % self.batch == 0:
                return count // self.batch
        if isinstance(traced, tuple):
            axis, within, _ = traced
            if axis == 0 and count % (within * self.batch) == 0:
                return within
        elif (traced is None or traced is UNTRACKED) and count == self.batch and \
                tensor.shape[-1] != self.batch:
            return 1
        self.refuse(f"the examples cannot be located among the {count} rows of its input")

    def by_example(self, rows: Tensor, within: int) -> Tensor:
        """``(B, rows / B, k)``: the rows of each example (see :meth:`rows`)."""
        width = rows.shape[-1]
        blocks = rows.reshape(-1, self.batch, within, width)
        return blocks.transpose(0, 1).reshape(self.batch, -1, width)


def _reshaped_whole(tensor: Tensor, base: Tensor) -> bool:
    """Whether ``tensor`` is all of ``base``, contiguous, in another shape."""
    return (tensor.is_contiguous() and base.is_contiguous() and tensor.numel() == base.numel()
            and tensor.storage_offset() == base.storage_offset())


def per_example_sum_to(values: Tensor, axis: int, shape: tuple[int, ...]) -> Tensor:
    """``(B, *shape)``: ``values`` (examples along ``axis``) summed per example over the
    dims along which a tensor of ``shape`` was broadcast to ``values``' shape."""
    aligned = (1,) * (values.dim() - len(shape)) + tuple(shape)
    dims = [d for d in range(values.dim())
            if d != axis and aligned[d] == 1 and values.shape[d] != 1]
    summed = values.sum(dims, keepdim=True) if dims else values
    return summed.movedim(axis, 0).reshape(values.shape[axis], *shape)


def _broadcast(rule: FunctionalRule):
    """``x + Q``, ``x - Q``, ``x * Q``, ``x / Q`` (and ``Q`` on the left), ``Q / x``."""
    node, index = rule.use.consumer, rule.use.index
    shape = tuple(node._input_metadata[0].shape)
    saved = {name: getattr(node, name) for name in ("_saved_self", "_saved_other")
             if hasattr(node, name)}
    other = saved.get("_saved_other" if index == 0 else "_saved_self")
    axis = rule.output_axis(shape, other)
    q_shape = _shape(rule.use.entry)
    aligned = (1,) * (len(shape) - len(q_shape)) + q_shape
    if len(q_shape) > len(shape) or aligned[axis] != 1:
        rule.refuse(f"the parameter's operand {q_shape} varies along the examples' axis "
                    f"{axis} of the output {shape}")
    alpha = float(getattr(node, "_saved_alpha", 1.0))
    sign = -1.0 if rule.kind == "Sub" and index == 1 else 1.0
    to_side = rule.dense()

    def on_gradient(grad: Tensor):
        grad = grad.to(rule.dtype)
        if rule.kind in ("Add", "Sub"):
            full = grad * (sign * alpha if index == 1 else 1.0)
        elif rule.kind == "Mul":
            full = grad * other.to(rule.dtype)
        elif index == 0:  # Div, Q / x
            full = grad / saved["_saved_other"].to(rule.dtype)
        else:
            numerator, divisor = (saved[n].to(rule.dtype) for n in ("_saved_self", "_saved_other"))
            full = -grad * numerator / divisor.square()
        return to_side(per_example_sum_to(full, axis, q_shape))
    return on_gradient


def _matrix_weight(rule: FunctionalRule):
    """``mm(x, Q)`` / ``addmm(b, x, Q)``: ``dQ_n = sum_{r in n} x_r^T g_r``."""
    node = rule.use.consumer
    x = node._saved_mat1 if rule.kind == "Addmm" else node._saved_self
    if x is None:
        rule.refuse("its input was not saved")
    within = rule.rows(x)
    alpha = float(getattr(node, "_saved_alpha", 1.0))
    x = rule.by_example(x.detach().to(rule.dtype), within)
    factored = _factored_orientation(rule.use.entry, rule.use.parameters)
    to_side = None if factored is not None else rule.dense()

    def on_gradient(grad: Tensor):
        g = rule.by_example(grad.to(rule.dtype) * alpha, within)
        if factored is not None:
            transposed, param = factored
            return [(param, ProductUse(g, x) if transposed else ProductUse(x, g))]
        return to_side(torch.bmm(x.transpose(1, 2), g))
    return on_gradient


def _matrix_bias(rule: FunctionalRule):
    """``addmm(Q, x, W)``: ``dQ_n = beta sum_{r in n} g_r``."""
    node = rule.use.consumer
    if node._saved_mat1 is None:
        rule.refuse("its input was not saved")
    within = rule.rows(node._saved_mat1)
    beta = float(getattr(node, "_saved_beta", 1.0))
    if len(_shape(rule.use.entry)) != 1:
        rule.refuse("its bias is not a vector")
    to_side = rule.dense()

    def on_gradient(grad: Tensor):
        return to_side(rule.by_example(grad.to(rule.dtype), within).sum(1) * beta)
    return on_gradient


def _embedding(rule: FunctionalRule):
    """``F.embedding(indices, Q)``: scattered by the indices (no one-hot)."""
    node = rule.use.consumer
    if node._saved_scale_grad_by_freq or node._saved_sparse:
        rule.refuse("it uses scale_grad_by_freq=True or sparse=True")
    factored = _factored_orientation(rule.use.entry, rule.use.parameters)
    if factored is None or factored[0]:
        rule.refuse("its table is not the parameter itself")
    param = factored[1]
    indices = node._saved_indices
    axis = rule.layouts.batch_axis(indices, rule.name, "F.embedding", range(indices.dim()))
    indices = indices.movedim(axis, 0).reshape(rule.batch, -1)
    padding = int(node._saved_padding_idx)
    padding_idx = None if padding < 0 else padding

    def on_gradient(grad: Tensor):
        g = grad.to(rule.dtype).movedim(axis, 0).reshape(rule.batch, indices.shape[1], -1)
        return [(param, IndexUse(indices, g, param.shape[0], padding_idx))]
    return on_gradient


#: ``(operation, input index or None: any)`` -> the builder of its rule
_BUILDERS: dict[tuple[str, int | None], Callable] = {
    ("Add", None): _broadcast, ("Sub", None): _broadcast, ("Mul", None): _broadcast,
    ("Div", None): _broadcast, ("Mm", 1): _matrix_weight, ("Addmm", 2): _matrix_weight,
    ("Addmm", 0): _matrix_bias, ("Embedding", 0): _embedding,
}
