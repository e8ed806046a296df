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
  apart again, as inside ``F.linear`` on a 3-d input), concatenation, stacking, slicing,
  reductions over other axes, pooling, padding, normalisation over other axes, matrix
  products with a parameter, attention.

Any other operation leaves the layout *unknown*: then, and only then, the shape decides
where exactly one axis has size ``B``, and a layer whose input has several axes of size
``B`` and an unknown layout is refused (:func:`~msvag_mb.model_checks.
ambiguous_batch_axis_error`), never guessed; so is one whose traced input holds no examples
or combines tensors whose examples lie along different axes (:data:`MIXED`: e.g. an
embedding of ``torch.arange(T)`` positions with ``T == B``, taken for per-example
features, added to the token embeddings). A tensor that requires no gradient and is not a
view of a known tensor (an integer index tensor copied with ``.contiguous()``) is unknown
too. Inputs to an operation that require no gradient (masks, constants) are assumed to
broadcast without moving the examples.

The trace usually ends after an operation or two, at the output of the layer before (each
hooked layer registers its output), so it costs microseconds per layer.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Container, Sequence

from torch import Tensor

from msvag_mb.model_checks import (
    ambiguous_batch_axis_error,
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
#: tensors whose examples lie along different axes were combined (e.g. positions that
#: hold no examples, taken for examples because their length equals B, added to features)
MIXED = _Kind("mixed")

#: a layout, a sentinel, or ``None``: unknown (an operation the trace does not follow)
Traced = "Layout | _Kind | None"

#: longest chain of untracked operations followed back from one layer input
MAX_DEPTH = 256


class ExampleLayouts:
    """The examples' axis of the tensors of one forward pass (see the module docstring)."""

    def __init__(self, batch_size: int, inputs: Sequence[Tensor]) -> None:
        self.batch_size = batch_size
        self._nodes: dict[tuple[object, int], Traced] = {}
        #: storage address -> [(tensor (weak), its batch axis)]
        self._storages: dict[int, list[tuple[weakref.ref, int]]] = {}
        for tensor in inputs:
            if isinstance(tensor, Tensor) and tensor.dim() >= 1:
                self.register(tensor, 0)

    # -- what is known --------------------------------------------------------------------
    def register(self, tensor: Tensor, axis: int) -> None:
        """Record that ``tensor`` holds the examples along ``axis``."""
        if not isinstance(tensor, Tensor) or tensor.shape[axis] != self.batch_size:
            return
        if tensor.grad_fn is not None:
            self._nodes[(tensor.grad_fn, tensor.output_nr)] = (axis, 1, tuple(tensor.shape))
        entries = self._storages.setdefault(_storage_of(tensor), [])
        entries.append((weakref.ref(tensor), axis))

    def layout(self, tensor: Tensor) -> Traced:
        """The examples' layout in ``tensor``: a :data:`Layout`, :data:`NO_EXAMPLES`,
        :data:`MIXED`, :data:`UNTRACKED` (no gradient, not a view of a known tensor) or
        ``None`` (traced to an operation that the trace does not follow)."""
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
        elif layout is NO_EXAMPLES or layout is MIXED:
            raise no_examples_error(layer, kind, shape, mixed=layout is MIXED)
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
        if traced is NO_EXAMPLES or traced is MIXED:
            raise no_examples_error(layer, kind, shape, mixed=traced is MIXED)
        if isinstance(traced, tuple):
            if traced[1] != 1 or shape[traced[0]] != self.batch_size:
                raise merged_examples_error(layer, shape, self.batch_size)
            if traced[0] != axis:
                raise wrong_batch_axis_error(layer, kind, shape, traced[0])

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


def _dim(value, ndim: int) -> int:
    """A saved dim (negative ones come back as large unsigned numbers) in ``[0, ndim)``."""
    value = int(value)
    if value >= 1 << 63:
        value -= 1 << 64
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
    broadcasting, trailing dims first, if ``shift``); :data:`MIXED` if they disagree."""
    found, untracked = None, False
    for edge in edges:
        traced = layouts.child(edge, depth)
        if traced is None or traced is MIXED:
            return traced
        if traced is NO_EXAMPLES or traced is UNTRACKED:
            untracked = untracked or traced is UNTRACKED
            continue
        axis, within, child_shape = traced
        aligned_axis = axis + (len(shape) - len(child_shape) if shift else 0)
        if not 0 <= aligned_axis < len(shape) or shape[aligned_axis] != child_shape[axis]:
            return None
        aligned = (aligned_axis, within, shape)
        if found is not None and found != aligned:
            return MIXED
        found = aligned
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


def _along_other_dim(keeps_rank: bool) -> Rule:
    """Ops along one dim (slice, split, softmax, cat; ``keeps_rank=False``: select and
    unbind, which remove it): the examples must lie along another."""
    def rule(layouts, node, output_nr, shape, depth):
        if keeps_rank:
            traced = _combined(layouts, node.next_functions, shape, depth, shift=False)
        else:
            traced = _first_input(layouts, node, depth)
        if not isinstance(traced, tuple):
            return traced
        axis = traced[0]
        dim = _dims(node, len(shape) + (0 if keeps_rank else 1))[0]
        if dim == axis:
            return None
        return (axis if keeps_rank else axis - (dim < axis), traced[1], shape)
    return rule


def _stacked(layouts, node, output_nr, shape, depth):
    dim = _dims(node, len(shape))[0]
    traced = _combined(layouts, node.next_functions, shape[:dim] + shape[dim + 1:], depth,
                       shift=False)
    if not isinstance(traced, tuple):
        return traced
    return (traced[0] + (dim <= traced[0]), traced[1], shape)


def _reduced(layouts, node, output_nr, shape, depth):
    """Sum and mean over some dims, not the examples' (over all dims: unknown)."""
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    if not hasattr(node, "_saved_dim"):
        return None
    axis = traced[0]
    dims = _dims(node, len(traced[2]))
    if axis in dims:
        return None
    keepdim = bool(getattr(node, "_saved_keepdim", False))
    return (axis if keepdim else axis - sum(d < axis for d in dims), traced[1], shape)


def _leading_kept(count: int) -> Rule:
    """Pooling, padding, upsampling, group and batch norm: dims before ``count`` kept."""
    def rule(layouts, node, output_nr, shape, depth):
        traced = _first_input(layouts, node, depth) if output_nr == 0 else None
        if not isinstance(traced, tuple):
            return traced
        axis, within, child_shape = traced
        if axis >= count or len(child_shape) != len(shape) or shape[axis] != child_shape[axis]:
            return None
        return (axis, within, shape)
    return rule


def _layer_norm(layouts, node, output_nr, shape, depth):
    """Normalised over the trailing ``normalized_shape`` dims: the examples before them."""
    traced = _first_input(layouts, node, depth) if output_nr == 0 else None
    if not isinstance(traced, tuple):
        return traced
    normalized = len(node._saved_normalized_shape)
    return (traced[0], traced[1], shape) if traced[0] < len(shape) - normalized else None


def _matrix_product(layouts, node, output_nr, shape, depth):
    """``mm(x, W)``, ``addmm(b, x, W)``, ``bmm(x, y)``: the examples along a free dim of one
    factor while the other holds none (an untracked factor is assumed to hold none), or
    along the batch dim of both factors of a ``bmm``."""
    edges = node.next_functions
    if _op_name(node) == "Addmm":
        if layouts.child(edges[0], depth) not in (NO_EXAMPLES, UNTRACKED):
            return None  # a bias with examples
        edges = edges[1:]
    left, right = (layouts.child(edge, depth) for edge in edges[:2])
    for traced in (left, right):
        if traced is None or traced is MIXED:
            return traced
    if not isinstance(left, tuple) and not isinstance(right, tuple):
        return NO_EXAMPLES if left is right is NO_EXAMPLES else UNTRACKED
    if isinstance(left, tuple) and isinstance(right, tuple):
        batched = left[0] == right[0] == 0 and left[1] == right[1] and len(shape) == 3
        return (0, left[1], shape) if batched else None
    if isinstance(left, tuple):
        traced, contracted = left, len(left[2]) - 1
    else:
        traced, contracted = right, len(right[2]) - 2
    return None if traced[0] == contracted else (traced[0], traced[1], shape)


def _attention(layouts, node, output_nr, shape, depth):
    """Scaled dot-product attention ``(N, heads, T, d)``: the examples along N or heads."""
    if output_nr != 0:
        return None
    traced = _combined(layouts, node.next_functions[:3], shape, depth, shift=False)
    if not isinstance(traced, tuple):
        return traced
    return traced if traced[0] < len(shape) - 2 else None


def _convolution(layouts, node, output_nr, shape, depth):
    """A convolution keeps its input's dim 0 (N, possibly several rows per example)."""
    traced = _first_input(layouts, node, depth)
    if not isinstance(traced, tuple):
        return traced
    return (0, traced[1], shape) if traced[0] == 0 else None


_ELEMENTWISE = """Abs Add Addcdiv Addcmul Alias Celu Clamp ClampMax ClampMin Clone Cos Div Elu
    Erf Exp Expand Expm1 Gelu Hardsigmoid Hardswish Hardtanh LeakyRelu Lerp Log Log1p
    LogSigmoid Maximum Minimum Mish Mul NativeDropout Neg Pow PreluKernel Reciprocal Relu
    Rsqrt Rsub Selu Sigmoid Silu Sin Softplus Sqrt Square Sub Tanh Threshold ToCopy Where
    """.split()
_VIEWS = "View UnsafeView Reshape ReshapeAlias Unsqueeze Squeeze".split()
_SPATIAL = """AdaptiveAvgPool2D AdaptiveAvgPool3D AdaptiveMaxPool2D AdaptiveMaxPool3D
    AvgPool2D AvgPool3D ConstantPadNd MaxPool2DWithIndices MaxPool3DWithIndices
    ReflectionPad1D ReflectionPad2D ReflectionPad3D ReplicationPad1D ReplicationPad2D
    ReplicationPad3D UpsampleBilinear2D UpsampleLinear1D UpsampleNearest1D
    UpsampleNearest2D UpsampleNearest3D""".split()

#: operation (its autograd node's name without ``Backward<n>``) -> how it moves the
#: examples' axis
_RULES: dict[str, Rule] = {
    **{name: _elementwise for name in _ELEMENTWISE},
    **{name: _reinterpreted for name in _VIEWS},
    **{name: _leading_kept(2) for name in _SPATIAL},
    "NativeGroupNorm": _leading_kept(1), "NativeBatchNorm": _leading_kept(1),
    "CudnnBatchNorm": _leading_kept(1), "MiopenBatchNorm": _leading_kept(1),
    "Transpose": _transposed, "T": _transposed, "Permute": _permuted,
    "Select": _along_other_dim(False), "Unbind": _along_other_dim(False),
    "Slice": _along_other_dim(True), "Split": _along_other_dim(True),
    "SplitWithSizes": _along_other_dim(True), "Cat": _along_other_dim(True),
    "Softmax": _along_other_dim(True), "LogSoftmax": _along_other_dim(True),
    "Stack": _stacked, "Sum": _reduced, "Mean": _reduced,
    "NativeLayerNorm": _layer_norm, "Mm": _matrix_product, "Addmm": _matrix_product,
    "Bmm": _matrix_product, "Convolution": _convolution,
    "ScaledDotProductFlashAttentionForCpu": _attention,
    "ScaledDotProductFlashAttention": _attention,
    "ScaledDotProductEfficientAttention": _attention,
    "ScaledDotProductCudnnAttention": _attention,
    "BackwardHookFunction": _identity_per_output,
}
