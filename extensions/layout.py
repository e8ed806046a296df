"""Where the examples are: the batch axis of a layer's input, known rather than guessed.

The model's inputs hold the ``B`` examples along dim 0 (``GradientVariance``'s contract).
A layer further in sees a tensor whose examples may lie along another axis (a
sequence-first ``(T, B, F)`` layout), or in no axis of their own (``x.flatten(0, 1)``).
A shape alone cannot tell them apart where several axes have size ``B`` (``T == B``, or a
channel or feature count equal to ``B``), nor a merged layout whose other axis happens to
have size ``B``. :class:`ExampleLayouts` traces every layer input back to what is known:

* a model input, or a view of one (``x.t()``, ``x.transpose(0, 1)``): the same storage, so
  the axis whose stride is the input's dim-0 stride holds the examples;
* the output of a hooked layer, registered with its batch axis by the layer's extension
  (a Linear or an Embedding keeps its input's layout; an LSTM declares it by
  ``batch_first``);
* through the autograd graph between them, operation by operation, for the operations in
  :data:`_RULES`: elementwise ops (with broadcasting), transposes and permutations, views
  and reshapes (the examples may be merged with a neighbouring axis on the way and come
  apart again, as inside ``F.linear`` on a 3-d input), concatenation, stacking, slicing
  and indexing, reductions, cumulative and sorting operations, rolls and flips, pooling,
  padding, normalisation, matrix products, attention.

An operation *along* the examples' axis combines, reorders or selects the examples: a
statistic over it (``h - h.mean(0)``, ``h / h.norm(dim=0)``, ``h.max(0)``, ``h.std(0)``,
``h.logsumexp(0)``), a softmax, cumulative sum or product, sort or top-k over it, a roll,
flip, slice, split, repeat or concatenation along it, an index, ``index_select`` or
``gather`` along it (except ``h[torch.arange(B), j]``, one row per example), a matrix
product that contracts it (``ones(B, B) @ h``, ``h @ h.t()``), pooling, normalisation or
attention across it. Its result is :data:`MIXED`; a reduction over all dims (the sum of
the whole batch) is :data:`REDUCED`, which becomes :data:`MIXED` as soon as it meets a
tensor with more than one element. A layer whose input is either is refused
(:func:`~msvag_mb.model_checks.examples_combined_error`, naming the operation), as is one
whose input holds no examples or combines tensors whose examples lie along different axes
(also :data:`MIXED`: e.g. an embedding of ``torch.arange(T)`` positions with ``T == B``,
taken for per-example features, added to the token embeddings).

Any other operation leaves the layout *unknown*: then, and only then, the shape decides
where exactly one axis has size ``B``, and a layer whose input has several axes of size
``B`` and an unknown layout is refused (:func:`~msvag_mb.model_checks.
ambiguous_batch_axis_error`), never guessed. A tensor that requires no gradient and is not
a view of a known tensor (an integer index tensor copied with ``.contiguous()``) is unknown
too. Inputs to an operation that require no gradient (masks, constants, indices) are
assumed to broadcast without moving the examples.

The trace usually ends after an operation or two, at the output of the layer before (each
hooked layer registers its output), so it costs microseconds per layer.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Container, Sequence

import torch
from torch import Tensor

from msvag_mb.model_checks import (
    ambiguous_batch_axis_error,
    examples_combined_error,
    merged_examples_error,
    no_examples_error,
    wrong_batch_axis_error,
)

#: ``(axis, within, shape)``: the examples lie along ``axis`` of a tensor of ``shape``, as
#: consecutive blocks of ``within`` entries (``within == 1`` and ``shape[axis] == B``: the
#: axis is the examples' own; larger: merged with the axis's inner part, e.g. the
#: ``(B*T, F)`` of ``x.flatten(0, 1)`` has ``within = T``)
Layout = tuple[int, int, tuple[int, ...]]


class _Kind(str):
    """What a tensor is when it has no layout (the sentinels below)."""


#: a tensor that holds no examples (computed from parameters only)
NO_EXAMPLES = _Kind("no examples")
#: the input of an operation that requires no gradient: assumed to broadcast
UNTRACKED = _Kind("untracked")
#: the examples cannot be told apart any more: an operation acted along their axis (a
#: statistic, softmax, cumulative sum, sort, roll, index or product over it), or tensors
#: whose examples lie along different axes were combined (e.g. positions that hold no
#: examples, taken for examples because their length equals B, added to features)
MIXED = _Kind("mixed")
#: a statistic of all the examples in one element (a reduction over every dim: a loss, the
#: norm of the whole batch); :data:`MIXED` once it meets a tensor of more than one element
REDUCED = _Kind("reduced")

#: a layout, a sentinel, or ``None``: unknown (an operation the trace does not follow)
Traced = "Layout | _Kind | None"

#: longest chain of untracked operations followed back from one layer input
MAX_DEPTH = 256


class ExampleLayouts:
    """The examples' axis of the tensors of one forward pass (see the module docstring)."""

    def __init__(self, batch_size: int, inputs: Sequence[Tensor]) -> None:
        self.batch_size = batch_size
        self._nodes: dict[tuple[object, int], Traced] = {}
        #: node -> the operation along the examples' axis it performs (for the refusal)
        self._combining: dict[object, str] = {}
        #: storage address -> [(tensor (weak), its batch axis)]
        self._storages: dict[int, list[tuple[weakref.ref, int]]] = {}
        for tensor in inputs:
            if isinstance(tensor, Tensor) and tensor.dim() >= 1:
                self.register(tensor, 0)

    def release(self) -> None:
        """Forget this pass's autograd nodes. The gradient hooks and recorded calls of the
        pass reach this object, and the nodes kept here hold those hooks: a reference
        cycle through autograd's C++ graph, which Python's collector cannot see, would
        keep the whole graph and its tensors alive after the pass."""
        self._nodes.clear()
        self._combining.clear()
        self._storages.clear()

    # -- what is known --------------------------------------------------------------------
    def register(self, tensor: Tensor, axis: int) -> None:
        """Record that ``tensor`` holds the examples along ``axis``."""
        if not isinstance(tensor, Tensor) or tensor.shape[axis] != self.batch_size:
            return
        if tensor.grad_fn is not None:
            self._nodes[(tensor.grad_fn, tensor.output_nr)] = (axis, 1, tuple(tensor.shape))
        entries = self._storages.setdefault(_storage_of(tensor), [])
        entries.append((weakref.ref(tensor), axis))

    def register_mixed(self, tensor: Tensor, source: Tensor) -> None:
        """Record that ``tensor``, computed from ``source`` (:data:`MIXED` or
        :data:`REDUCED`), is :data:`MIXED`: e.g. the output of a frozen layer, which cannot
        separate the examples that its input combined."""
        if isinstance(tensor, Tensor) and tensor.grad_fn is not None:
            self._nodes[(tensor.grad_fn, tensor.output_nr)] = MIXED
            operation = self.combining_operation(source)
            if operation is not None:
                self._combining.setdefault(tensor.grad_fn, operation)

    def layout(self, tensor: Tensor) -> Traced:
        """The examples' layout in ``tensor``: a :data:`Layout`, :data:`NO_EXAMPLES`,
        :data:`MIXED`, :data:`REDUCED`, :data:`UNTRACKED` (no gradient, not a view of a
        known tensor) or ``None`` (traced to an operation that the trace does not
        follow)."""
        found = self._view_of_known(tensor)
        if found is not None:
            return found
        if tensor.grad_fn is not None:
            return self._node(tensor.grad_fn, tensor.output_nr, 0)
        return UNTRACKED

    def batch_axis(self, tensor: Tensor, layer: str, kind: str,
                   allowed: Container[int]) -> int:
        """The axis of a layer's input ``tensor`` that holds the examples.

        ``allowed``: the axes the layer can take them from. Raises
        :class:`~msvag_mb.model_checks.UnsupportedModelError` when the examples are merged
        into another axis or mixed, lie along an axis the layer cannot use, or cannot be
        located among several axes of size ``B``.
        """
        shape = tuple(tensor.shape)
        layout = self.layout(tensor)
        if isinstance(layout, tuple):
            if layout[1] != 1 or shape[layout[0]] != self.batch_size:
                raise merged_examples_error(layer, shape, self.batch_size)
            axis = layout[0]
        elif layout is NO_EXAMPLES or layout is MIXED or layout is REDUCED:
            raise self._refusal(tensor, layer, kind, layout)
        else:  # unknown: the shape decides where it can (the examples are somewhere)
            candidates = [a for a, size in enumerate(shape) if size == self.batch_size]
            if not candidates:
                raise merged_examples_error(layer, shape, self.batch_size)
            if len(candidates) > 1:
                raise ambiguous_batch_axis_error(layer, kind, shape, self.batch_size,
                                                 candidates)
            axis = candidates[0]
        if axis not in allowed:
            raise wrong_batch_axis_error(layer, kind, shape, axis)
        return axis

    def known_axis(self, tensor: Tensor) -> int | None:
        """The examples' own axis in ``tensor`` if it is known or the only one of size B,
        else ``None`` (never refuses)."""
        traced = self.layout(tensor)
        if isinstance(traced, tuple):
            clean = traced[1] == 1 and tensor.shape[traced[0]] == self.batch_size
            return traced[0] if clean else None
        if traced is not None and traced is not UNTRACKED:
            return None
        candidates = [a for a, size in enumerate(tensor.shape) if size == self.batch_size]
        return candidates[0] if len(candidates) == 1 else None

    def check_declared(self, tensor: Tensor, layer: str, kind: str, axis: int) -> None:
        """Refuse an input whose traced layout contradicts the axis the layer declares
        (e.g. ``batch_first``); an unknown layout is left to the declaration."""
        traced = self.layout(tensor)
        shape = tuple(tensor.shape)
        if traced is NO_EXAMPLES or traced is MIXED or traced is REDUCED:
            raise self._refusal(tensor, layer, kind, traced)
        if isinstance(traced, tuple):
            if traced[1] != 1 or shape[traced[0]] != self.batch_size:
                raise merged_examples_error(layer, shape, self.batch_size)
            if traced[0] != axis:
                raise wrong_batch_axis_error(layer, kind, shape, traced[0])

    def _refusal(self, tensor: Tensor, layer: str, kind: str, traced: Traced):
        """The error for a layer input that holds no examples, or whose examples were
        combined (naming the operation along their axis where the trace found one)."""
        shape = tuple(tensor.shape)
        if traced is NO_EXAMPLES:
            return no_examples_error(layer, kind, shape)
        operation = self.combining_operation(tensor)
        if operation is None:
            return no_examples_error(layer, kind, shape, mixed=True)
        return examples_combined_error(layer, kind, shape, operation)

    def combining_operation(self, tensor: Tensor) -> str | None:
        """The operation along the examples' axis that made ``tensor`` :data:`MIXED` or
        :data:`REDUCED`, found going back through the traced nodes; ``None`` if there is
        none (e.g. tensors whose examples lie along different axes were combined)."""
        stack, seen = [tensor.grad_fn] if tensor.grad_fn is not None else [], set()
        while stack and len(seen) <= MAX_DEPTH:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in self._combining:
                return self._combining[node]
            stack.extend(child for child, output_nr in node.next_functions if child is not None
                         and self._nodes.get((child, output_nr)) in (MIXED, REDUCED))
        return None

    def combines(self, node, action: str, traced: Layout, verdict: _Kind = MIXED) -> _Kind:
        """Record that ``node`` acts along the examples' axis of its input ``traced``
        (``action``: how, e.g. ``"along dim 0"``) and return ``verdict``."""
        axis, within, shape = traced
        where = f"dim {axis}" if within == 1 else f"dim {axis}, merged with another axis"
        self._combining.setdefault(
            node, f"{type(node).__name__} {action} of a tensor of shape {tuple(shape)} "
                  f"whose examples lie along {where}")
        return verdict

    def _view_of_known(self, tensor: Tensor) -> Layout | None:
        """The layout of a view of a registered tensor (same storage), from its strides."""
        entries = self._storages.get(_storage_of(tensor))
        for reference, axis in entries or ():
            known = reference()
            if known is None:
                continue
            if known is tensor:
                return (axis, 1, tuple(tensor.shape))
            stride, offset = known.stride(axis), known.storage_offset()
            axes = [a for a in range(tensor.dim())
                    if tensor.shape[a] == self.batch_size and tensor.stride(a) == stride]
            if len(axes) == 1 and 0 <= tensor.storage_offset() - offset < max(stride, 1):
                return (axes[0], 1, tuple(tensor.shape))
        return None

    # -- the trace through the autograd graph ------------------------------------------
    def _node(self, node, output_nr: int, depth: int) -> Traced:
        key = (node, output_nr)
        if key in self._nodes:
            return self._nodes[key]
        rule = _RULES.get(_op_name(node)) if depth <= MAX_DEPTH else None
        traced = None
        if rule is not None:
            shape = tuple(node._input_metadata[output_nr].shape)
            traced = rule(self, node, output_nr, shape, depth + 1)
            if isinstance(traced, tuple) and not self._fits(traced):
                traced = None
            if traced is REDUCED and math.prod(shape) > 1:
                traced = MIXED  # a statistic of all the examples, spread over a tensor
        self._nodes[key] = traced
        return traced

    def _fits(self, layout: Layout) -> bool:
        axis, within, shape = layout
        return 0 <= axis < len(shape) and shape[axis] % (within * self.batch_size) == 0

    def child(self, edge: tuple[object, int], depth: int) -> Traced:
        """The layout of what flows along one edge of the graph into an operation."""
        node, output_nr = edge
        if node is None:
            return UNTRACKED
        variable = getattr(node, "variable", None)
        if variable is not None:  # a leaf: a parameter, or a model input needing a gradient
            return self._view_of_known(variable) or NO_EXAMPLES
        return self._node(node, output_nr, depth)


def _storage_of(tensor: Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
        return -1


def _op_name(node) -> str:
    """``"TransposeBackward0"`` -> ``"Transpose"``."""
    name = type(node).__name__
    cut = name.rfind("Backward")
    return name[:cut] if cut > 0 else name


def _signed(value) -> int:
    """A saved integer (negative ones may come back as large unsigned numbers)."""
    value = int(value)
    return value - (1 << 64) if value >= 1 << 63 else value


def _dim(value, ndim: int) -> int:
    """A saved dim in ``[0, ndim)``."""
    value = _signed(value)
    return value % ndim if ndim else 0


def _dims(node, ndim: int) -> list[int]:
    value = node._saved_dim
    values = value if isinstance(value, (tuple, list)) else [value]
    return [_dim(v, ndim) for v in values]


# -- rules: (layouts, node, output_nr, output shape, depth) -> traced ------------------
Rule = Callable[[ExampleLayouts, object, int, tuple, int], Traced]


def _combined(layouts: ExampleLayouts, edges, shape: tuple[int, ...], depth: int,
              shift: bool = True) -> Traced:
    """The one layout of the inputs that hold examples, aligned to ``shape`` (by
    broadcasting, trailing dims first, if ``shift``); :data:`MIXED` if they disagree, if
    one is mixed, or if a statistic of all the examples (:data:`REDUCED`) meets a tensor
    that holds them; else ``None`` if an input's layout is unknown."""
    found, untracked, unknown, reduced = None, False, False, False
    for edge in edges:
        traced = layouts.child(edge, depth)
        if traced is MIXED:
            return MIXED
        if traced is None or traced is REDUCED:
            unknown, reduced = unknown or traced is None, reduced or traced is REDUCED
            continue
        if traced is NO_EXAMPLES or traced is UNTRACKED:
            untracked = untracked or traced is UNTRACKED
            continue
        axis, within, child_shape = traced
        aligned_axis = axis + (len(shape) - len(child_shape) if shift else 0)
        if not 0 <= aligned_axis < len(shape) or shape[aligned_axis] != child_shape[axis]:
            unknown = True
            continue
        aligned = (aligned_axis, within, shape)
        if found is not None and found != aligned:
            return MIXED
        found = aligned
    if reduced:  # spread over more than one element: MIXED (ExampleLayouts._node)
        return MIXED if found is not None else REDUCED
    if unknown:
        return None
    if found is not None:
        return found
    return UNTRACKED if untracked else NO_EXAMPLES


def _elementwise(layouts, node, output_nr, shape, depth):
    return _combined(layouts, node.next_functions, shape, depth)


def _identity_per_output(layouts, node, output_nr, shape, depth):
    """Functions that return their inputs as they are (module backward hooks)."""
    edges = node.next_functions
    if output_nr >= len(edges):
        return None
    return _combined(layouts, edges[output_nr:output_nr + 1], shape, depth)


def _first_input(layouts, node, depth) -> Traced:
    edges = node.next_functions
    return layouts.child(edges[0], depth) if edges else None


def _indexed_input(layouts, node, depth) -> Traced:
    """The first input of an indexing operation; where it holds no examples, unknown:
    the indices may carry them (``table[tokens]``)."""
    traced = _first_input(layouts, node, depth)
    return traced if isinstance(traced, tuple) or traced is MIXED or traced is REDUCED else None


def _reinterpreted(layouts, node, output_nr, shape, depth):
    """Views and reshapes: the same elements in row-major order, regrouped."""
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    axis, within, child_shape = traced
    inner = within * math.prod(child_shape[axis + 1:])
    suffix = 1
    for new_axis in range(len(shape) - 1, -1, -1):
        if suffix <= inner < suffix * shape[new_axis]:
            return (new_axis, inner // suffix, shape) if inner % suffix == 0 else None
        suffix *= shape[new_axis]
    return None


def _transposed(layouts, node, output_nr, shape, depth):
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    if _op_name(node) == "T":
        first, second = 0, 1
    else:
        first, second = _dim(node._saved_dim0, len(shape)), _dim(node._saved_dim1, len(shape))
    axis = {first: second, second: first}.get(traced[0], traced[0])
    return (axis, traced[1], shape)


def _permuted(layouts, node, output_nr, shape, depth):
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    order = [_dim(d, len(shape)) for d in node._saved_dims]
    return (order.index(traced[0]), traced[1], shape)


def _sliced(keeps_rank: bool) -> Rule:
    """Slice and split along ``dim`` (``keeps_rank=False``: select and unbind, which remove
    it): the examples pass along another dim; along theirs only the whole axis keeps one
    example per row (a slice of another length drops or reorders some)."""
    def rule(layouts, node, output_nr, shape, depth):
        traced = _first_input(layouts, node, depth)
        if not isinstance(traced, tuple):
            return traced
        axis, within, child_shape = traced
        dim = _dims(node, len(child_shape))[0]
        if dim != axis:
            return (axis if keeps_rank else axis - (dim < axis), within, shape)
        if keeps_rank and shape[axis] == child_shape[axis]:
            return (axis, within, shape)
        return layouts.combines(node, f"along dim {dim}", traced)
    return rule


def _along_one_dim(layouts, node, output_nr, shape, depth):
    """Softmax, cumulative sums and products, sorts and top-k along ``node._saved_dim``:
    along the examples' axis they combine or reorder the examples."""
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    dim = _dims(node, len(traced[2]))[0]
    if dim == traced[0]:
        return layouts.combines(node, f"along dim {dim}", traced)
    return (traced[0], traced[1], shape)


def _renormed(layouts, node, output_nr, shape, depth):
    """``renorm(p, dim, maxnorm)`` rescales each slice along ``dim`` by its norm over the
    other dims: the examples must lie along ``dim``."""
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    dim = _dims(node, len(traced[2]))[0]
    if dim != traced[0]:
        return layouts.combines(node, f"with norms over all dims but {dim}", traced)
    return (traced[0], traced[1], shape)


def _concatenated(layouts, node, output_nr, shape, depth):
    """Concatenation along ``dim``: the examples pass along another; along theirs the
    result's rows are not one per example (unless the other inputs are empty)."""
    dim = _dims(node, len(shape))[0]
    for edge in node.next_functions:
        traced = layouts.child(edge, depth)
        if isinstance(traced, tuple) and traced[0] == dim and traced[2][dim] != shape[dim]:
            return layouts.combines(node, f"along dim {dim}", traced)
    return _combined(layouts, node.next_functions, shape, depth, shift=False)


def _stacked(layouts, node, output_nr, shape, depth):
    dim = _dims(node, len(shape))[0]
    traced = _combined(layouts, node.next_functions, shape[:dim] + shape[dim + 1:], depth,
                       shift=False)
    if not isinstance(traced, tuple):
        return traced
    return (traced[0] + (dim <= traced[0]), traced[1], shape)


def _reduced(layouts, node, output_nr, shape, depth):
    """Reductions over ``node._saved_dim`` (all dims where it is absent, ``None`` or
    empty): sums, means, norms, extrema, medians, variances, ``logsumexp``, products. Over
    other dims the examples pass; over theirs the result is a statistic of several
    examples (:data:`REDUCED` over all dims, else :data:`MIXED`)."""
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    axis, within, child_shape = traced
    saved = getattr(node, "_saved_dim", None)
    every = saved is None or (isinstance(saved, (tuple, list)) and not saved)
    dims = set(range(len(child_shape))) if every else set(_dims(node, len(child_shape)))
    if axis in dims:
        everything = dims == set(range(len(child_shape)))
        action = "over all dims" if everything else f"over dims {sorted(dims)}"
        return layouts.combines(node, action, traced, REDUCED if everything else MIXED)
    keepdim = bool(getattr(node, "_saved_keepdim", False))
    return (axis if keepdim else axis - sum(d < axis for d in dims), within, shape)


def _rolled(layouts, node, output_nr, shape, depth):
    """``roll(shifts, dims)`` (no dims: the flattened tensor): a shift along the examples'
    axis moves rows to other examples."""
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    axis, within, child_shape = traced
    shifts = [_signed(s) for s in node._saved_shifts]
    dims = [_dim(d, len(child_shape)) for d in node._saved_dims]
    if dims:
        moved = any(d == axis and s % child_shape[axis] for d, s in zip(dims, shifts))
    else:
        moved = any(s % max(math.prod(child_shape), 1) for s in shifts)
    return layouts.combines(node, "by a shift", traced) if moved else (axis, within, shape)


def _flipped(layouts, node, output_nr, shape, depth):
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    axis, within, child_shape = traced
    if axis in {_dim(d, len(child_shape)) for d in node._saved_dims} and child_shape[axis] > 1:
        return layouts.combines(node, f"along dim {axis}", traced)
    return (axis, within, shape)


def _repeated(layouts, node, output_nr, shape, depth):
    """``repeat(*sizes)``: new leading dims copy whole batches (each copy keeps the
    examples apart); a repeat along the examples' axis interleaves copies of the batch."""
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    axis, within, child_shape = traced
    repeats = [_signed(r) for r in node._saved_repeats]
    new_axis = axis + len(repeats) - len(child_shape)
    if repeats[new_axis] != 1:
        return layouts.combines(node, f"{repeats[new_axis]} times along dim {axis}", traced)
    return (new_axis, within, shape)


def _identity_dim(index: Tensor, batch: int) -> int | None:
    """The dim along which an integer ``index`` is ``arange(batch)`` (size 1 elsewhere),
    or ``None``: the one index along the examples' axis that keeps each example in its
    own row (``h[torch.arange(B), last]``)."""
    if index.dtype == torch.bool or index.numel() != batch or batch not in index.shape:
        return None
    expected = torch.arange(batch, device=index.device, dtype=index.dtype)
    same = torch.equal(index.reshape(-1).remainder(batch), expected)  # -1 is B - 1
    return list(index.shape).index(batch) if same else None


def _indexed(layouts, node, output_nr, shape, depth):
    """Advanced indexing ``h[i_0, ..., i_k]`` (``node._saved_indices``: ``None`` for a
    full slice; a boolean mask indexes as many dims as it has). A dim not indexed keeps
    the examples, moved as NumPy's rules move it (after the indices' broadcast dims where
    those are adjacent, else at the front); an index along the examples' axis selects,
    repeats or reorders them, except :func:`_identity_dim`."""
    traced = _indexed_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    axis, within, child_shape = traced
    spans, position = [], 0  # (first dim indexed, index) of each index tensor
    for index in node._saved_indices:
        width = index.dim() if index is not None and index.dtype == torch.bool else 1
        if index is not None:
            spans.append((position, width, index))
        position += width
    indexed = [d for first, width, _ in spans for d in range(first, first + width)]
    if not indexed:
        return None
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    start = indexed[0] if adjacent else 0
    broadcast_rank = len(shape) - (len(child_shape) - len(indexed))
    if axis not in indexed:
        if adjacent:
            return (axis if axis < start else axis - len(indexed) + broadcast_rank,
                    within, shape)
        return (broadcast_rank + sum(d not in indexed for d in range(axis)), within, shape)
    index = next(index for first, width, index in spans if first <= axis < first + width)
    row = _identity_dim(index, layouts.batch_size) if within == 1 else None
    if row is None:
        return layouts.combines(node, f"indexing dim {axis}", traced)
    return (start + broadcast_rank - index.dim() + row, 1, shape)


def _index_selected(layouts, node, output_nr, shape, depth):
    """``index_select(dim, index)``: along the examples' axis only ``arange(B)`` keeps one
    example per row."""
    traced = _indexed_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    axis, within, child_shape = traced
    dim = _dims(node, len(child_shape))[0]
    if dim != axis or (within == 1 and _identity_dim(node._saved_index, layouts.batch_size)
                       == 0):
        return (axis, within, shape)
    return layouts.combines(node, f"along dim {dim}", traced)


def _gathered(layouts, node, output_nr, shape, depth):
    """``gather(dim, index)``: ``out[.., i, ..] = h[.., index[.., i, ..], ..]`` along
    ``dim``, position by position along the others; the examples must lie along another
    dim, all of them kept."""
    traced = _indexed_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    axis, within, child_shape = traced
    dim = _dims(node, len(child_shape))[0]
    if dim != axis and shape[axis] == child_shape[axis]:
        return (axis, within, shape)
    return layouts.combines(node, f"along dim {dim} to shape {shape}", traced)


def _masked_scatter(layouts, node, output_nr, shape, depth):
    """``h.masked_scatter(mask, source)``: the source's elements fill the masked positions
    in order, whatever example they came from; a source that holds no examples is a
    constant for the examples of ``h``."""
    edges = node.next_functions
    source = layouts.child(edges[1], depth) if len(edges) > 1 else NO_EXAMPLES
    if source is None or source is MIXED:
        return source
    if isinstance(source, tuple):
        return layouts.combines(node, "into masked positions, in order", source)
    return _combined(layouts, edges[:1] + ((edges[1],) if source is REDUCED else ()),
                     shape, depth)


def _leading_kept(count: int) -> Rule:
    """Pooling, upsampling, group norm: dims before ``count`` kept; the others are pooled,
    interpolated or normalised over, which combines examples lying along them."""
    def rule(layouts, node, output_nr, shape, depth):
        traced = _first_input(layouts, node, depth) if output_nr == 0 else None
        if not isinstance(traced, tuple):
            return traced
        axis, within, child_shape = traced
        if axis >= count:
            return layouts.combines(node, f"over the dims from {count} on", traced)
        if len(child_shape) != len(shape) or shape[axis] != child_shape[axis]:
            return None
        return (axis, within, shape)
    return rule


def _padded(layouts, node, output_nr, shape, depth):
    """``F.pad`` with a constant (``_saved_pad``: before and after each dim, last dim
    first): padding the examples' axis adds rows that are no examples."""
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    axis, within, child_shape = traced
    pad = [_signed(p) for p in node._saved_pad]
    position = 2 * (len(child_shape) - 1 - axis)
    if any(pad[position:position + 2]):
        return layouts.combines(node, f"padding dim {axis}", traced)
    return (axis, within, shape)


def _batch_norm(layouts, node, output_nr, shape, depth):
    """Batch norm in training (batch statistics over every dim but the channels, dim 1):
    the examples must be the channels (as in ``F.instance_norm``, which views ``(N, C,
    ...)`` as ``(1, N C, ...)``); with running statistics it acts channel by channel."""
    training = getattr(node, "_saved_training", None)
    if training is None:
        return _leading_kept(1)(layouts, node, output_nr, shape, depth)
    traced = _first_input(layouts, node, depth) if output_nr == 0 else None
    if not isinstance(traced, tuple):
        return traced
    if training and traced[0] != 1:
        return layouts.combines(node, "with batch statistics over all dims but 1", traced)
    return (traced[0], traced[1], shape)


def _layer_norm(layouts, node, output_nr, shape, depth):
    """Normalised over the trailing ``normalized_shape`` dims: the examples before them."""
    traced = _first_input(layouts, node, depth) if output_nr == 0 else None
    if not isinstance(traced, tuple):
        return traced
    normalized = len(node._saved_normalized_shape)
    if traced[0] >= len(shape) - normalized:
        return layouts.combines(node, f"normalising the last {normalized} dims", traced)
    return (traced[0], traced[1], shape)


def _matrix_product(layouts, node, output_nr, shape, depth):
    """``mm(x, W)``, ``addmm(b, x, W)``, ``bmm(x, y)``: the examples along a free dim of one
    factor while the other holds none (an untracked factor is assumed to hold none), or
    along the batch dim of both factors of a ``bmm``. A contraction over the examples'
    axis, or examples along free dims of both factors, combines them."""
    edges = node.next_functions
    if _op_name(node) == "Addmm":
        bias = layouts.child(edges[0], depth)
        if bias is MIXED or bias is REDUCED:
            return MIXED
        if bias not in (NO_EXAMPLES, UNTRACKED):
            return None  # a bias with examples
        edges = edges[1:]
    factors = [layouts.child(edge, depth) for edge in edges[:2]]
    for side, traced in enumerate(factors):
        if traced is MIXED or traced is REDUCED:
            return MIXED
        if isinstance(traced, tuple) and traced[0] == len(traced[2]) - 1 - side:
            return layouts.combines(node, f"contracting dim {traced[0]}", traced)
    left, right = factors
    if left is None or right is None:
        return None
    if not isinstance(left, tuple) and not isinstance(right, tuple):
        return NO_EXAMPLES if left is right is NO_EXAMPLES else UNTRACKED
    if isinstance(left, tuple) and isinstance(right, tuple):
        batched = left[0] == right[0] == 0 and left[1] == right[1] and len(shape) == 3
        if batched:
            return (0, left[1], shape)
        return layouts.combines(node, "with another factor that holds examples", left)
    traced = left if isinstance(left, tuple) else right
    return (traced[0], traced[1], shape)


def _matrix_vector(layouts, node, output_nr, shape, depth):
    """``mv(A, v)`` and ``dot(u, v)``: examples along A's rows pass; along the contracted
    dim (A's columns, a vector) they are summed."""
    factors = [layouts.child(edge, depth) for edge in node.next_functions[:2]]
    for traced in factors:
        if traced is None or traced is MIXED or traced is REDUCED:
            return MIXED if traced is not None else None
        if isinstance(traced, tuple) and traced[0] == len(traced[2]) - 1:
            verdict = REDUCED if not shape else MIXED
            return layouts.combines(node, f"contracting dim {traced[0]}", traced, verdict)
    first = factors[0]
    if isinstance(first, tuple):
        return (first[0], first[1], shape)
    return NO_EXAMPLES if first is factors[-1] is NO_EXAMPLES else UNTRACKED


def _attention(layouts, node, output_nr, shape, depth):
    """Scaled dot-product attention ``(N, heads, T, d)``: the examples along N or heads
    (attention across T or d would combine them)."""
    if output_nr != 0:
        return None
    traced = _combined(layouts, node.next_functions[:3], shape, depth, shift=False)
    if not isinstance(traced, tuple):
        return traced
    if traced[0] >= len(shape) - 2:
        return layouts.combines(node, "attending across dims -2 and -1", traced)
    return traced


def _convolution(layouts, node, output_nr, shape, depth):
    """A convolution keeps its input's dim 0 (N, possibly several rows per example); it
    combines its channels and neighbouring positions."""
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    if traced[0] != 0:
        return layouts.combines(node, "over channels and positions", traced)
    return (0, traced[1], shape)


_ELEMENTWISE = """Abs Add Addcdiv Addcmul Alias Celu Clamp ClampMax ClampMin Clone Cos Div Elu
    Erf Exp Expand Expm1 Gelu Hardsigmoid Hardswish Hardtanh LeakyRelu Lerp Log Log1p
    LogSigmoid MaskedFill Maximum Minimum Mish Mul NativeDropout Neg Pow PreluKernel
    Reciprocal Relu Rsqrt Rsub Selu Sigmoid Silu Sin Softplus Sqrt Square Sub Tanh
    Threshold ToCopy Where""".split()
_VIEWS = "View UnsafeView Reshape ReshapeAlias Unsqueeze Squeeze".split()
_SPATIAL = """AdaptiveAvgPool2D AdaptiveAvgPool3D AdaptiveMaxPool2D AdaptiveMaxPool3D
    AvgPool2D AvgPool3D MaxPool2DWithIndices MaxPool3DWithIndices
    ReflectionPad1D ReflectionPad2D ReflectionPad3D ReplicationPad1D ReplicationPad2D
    ReplicationPad3D UpsampleBilinear2D UpsampleLinear1D UpsampleNearest1D
    UpsampleNearest2D UpsampleNearest3D""".split()
#: reductions over ``_saved_dim`` (over all dims in the variants that save none)
_REDUCTIONS = """Sum Mean Nansum Prod Amax Amin Aminmax Max Min Median Nanmedian Kthvalue Mode
    Std Var StdMean VarMean Logsumexp LinalgVectorNorm Norm""".split()
#: operations along one ``_saved_dim`` that keep the other dims apart
_ALONG_ONE_DIM = """Softmax LogSoftmax Cumsum Cumprod Logcumsumexp Cummax Cummin Sort
    Topk""".split()

#: operation (its autograd node's name without ``Backward<n>``) -> how it moves the
#: examples' axis
_RULES: dict[str, Rule] = {
    **{name: _elementwise for name in _ELEMENTWISE},
    **{name: _reinterpreted for name in _VIEWS},
    **{name: _leading_kept(2) for name in _SPATIAL},
    **{name: _reduced for name in _REDUCTIONS},
    **{name: _along_one_dim for name in _ALONG_ONE_DIM},
    "ConstantPadNd": _padded, "NativeGroupNorm": _leading_kept(1),
    "NativeBatchNorm": _batch_norm, "CudnnBatchNorm": _batch_norm,
    "MiopenBatchNorm": _batch_norm,
    "Transpose": _transposed, "T": _transposed, "Permute": _permuted,
    "Select": _sliced(False), "Unbind": _sliced(False), "Slice": _sliced(True),
    "Split": _sliced(True), "SplitWithSizes": _sliced(True), "Cat": _concatenated,
    "Stack": _stacked, "Renorm": _renormed, "Roll": _rolled, "Flip": _flipped,
    "Repeat": _repeated, "Index": _indexed, "IndexSelect": _index_selected,
    "Gather": _gathered, "MaskedScatter": _masked_scatter,
    "NativeLayerNorm": _layer_norm, "Mm": _matrix_product, "Addmm": _matrix_product,
    "Bmm": _matrix_product, "Mv": _matrix_vector, "Dot": _matrix_vector,
    "Convolution": _convolution,
    "ScaledDotProductFlashAttentionForCpu": _attention,
    "ScaledDotProductFlashAttention": _attention,
    "ScaledDotProductEfficientAttention": _attention,
    "ScaledDotProductCudnnAttention": _attention,
    "BackwardHookFunction": _identity_per_output,
}
