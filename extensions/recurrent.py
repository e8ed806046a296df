"""What ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` share: an unrolled forward whose backward
yields the per-time-step gate gradients, and the statistics made from them.

For one layer and direction with input ``x_t``, previous hidden state ``h_{t-1}``
(``h_{-1} = h0``) and gate pre-activations split as torch writes them, an input side
``W_ih x_t + b_ih`` and a hidden side ``W_hh h_{t-1} + b_hh``, example n's contributions are
Linear-type contractions over time:

    W_ih: sum_t gi_nt x_nt^T      W_hh: sum_t gh_nt h_n,t-1^T
    b_ih: sum_t gi_nt             b_hh: sum_t gh_nt

where ``gi`` and ``gh`` are the gradients of the batch loss w.r.t. the two sides (equal for
LSTM and RNN cells, different in the GRU's n slot, where the hidden side is scaled by the
reset gate), and, for an LSTM with ``proj_size``, ``W_hr: sum_t dh_nt m_nt^T`` with
``h_t = W_hr m_t``. The fused kernels do not expose these gradients, so while statistics
are collected the module's ``forward`` is replaced by :func:`unrolled_forward`: one
:class:`RecurrentLayerFunction` per layer (all its directions), with the module's own
weights. Its forward is torch's fused one-layer kernel, which saves only the layer's input
and output; its backward (each cell type's module: ``lstm``, ``gru``, ``rnn``) recomputes
the gates of all steps from the saved outputs with one matmul per side, as cuDNN does,
into one buffer that becomes the chain rule's factors in place, and backpropagates
through time by hand, one direction after the other (the step loop every cell shares:
:func:`backprop_through_time`); the contractions above are then formed for all steps at
once by ``bmm`` over cache-sized chunks of examples (:func:`sequence_weight_statistics`),
squared for the statistics and summed for the weight gradients.

A parameter used several times in one forward pass (the module called on two inputs, an
encoder run again from its own final state, a weight tied to another layer's or also
used outside the layer) needs ``sum_n (sum_u c_nu)**2`` over its uses ``u``: its call
hands over the factors of the contraction instead, ``ProductUse(L = gate gradients
(B, T, rows), R = inputs or h_{t-1} (B, T, cols))`` for a weight and the time-summed gate
gradients for a bias (:class:`LayerStatistics`, :mod:`~msvag_mb.extensions.reuse`), with
the rows in the examples' order (a PackedSequence's sorting undone); parameters used once
keep the squared path above.

Examples are the sequences along the batch axis (dim 0 with ``batch_first=True``, else
dim 1); row n of the initial state belongs to example n. The reverse direction of a
bidirectional layer is the forward recursion on each sequence reversed within its length.
A :class:`~torch.nn.utils.rnn.PackedSequence` is held padded between the layers (each
layer's fused kernel runs on the packed data), sorted by decreasing length as packed data
is: at step t the first ``batch_sizes[t]`` sequences are active, the others carry their
state unchanged (:class:`Steps`); the statistics do not depend on the order of the
examples. Inter-layer dropout in train mode is drawn here
(:func:`inter_layer_dropout`), so the statistics are exact for the gradient of the forward
that ran. Refused while running: unbatched input, a batch of other than ``B`` sequences,
an input whose traced layout contradicts ``batch_first`` (or the packing's); refused
before: one trainable Parameter under two names of one module.
"""

from __future__ import annotations

import functools
import warnings
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from msvag_mb.model_checks import UnsupportedModelError
from msvag_mb.ops import at_most_threads

from .core import (
    CACHE_BUDGET_ELEMENTS,
    LayerContext,
    ModuleExtension,
    Removable,
    chunk_size,
)
from .reuse import DenseUse, ProductUse

#: per-example matrices of this many elements per chunk (4 MB in float32): half the
#: layers' common :data:`~msvag_mb.extensions.core.CACHE_BUDGET_ELEMENTS`, measured faster
#: for the gate-sized matrices here ((3H or 4H) x in or H, from T = 50 steps each)
STATISTICS_CHUNK_ELEMENTS = CACHE_BUDGET_ELEMENTS // 2

#: intra-op threads for the backward's step-by-step loops (None: leave torch's setting).
#: Each step's kernels are small (a (B, G H) x (G H, H) matmul and a few (B, H) products):
#: waking a second thread for each costs about what it saves (docs/benchmarks.md).
LOOP_THREADS: int | None = 1


class LayerWeights(NamedTuple):
    """One layer and direction's parameters (or their names, gradients or statistics),
    in torch's order; ``None`` where the module has none (``bias=False``, no projection)."""

    weight_ih: object
    weight_hh: object
    bias_ih: object = None
    bias_hh: object = None
    weight_hr: object = None

    def flat(self) -> list:
        """The present ones, in the order torch's fused kernels take them."""
        return [w for w in self if w is not None]


def layer_parameter_names(module: nn.RNNBase, layer: int, direction: int) -> LayerWeights:
    """``weight_ih_l<k>[_reverse]``, ... of one layer and direction (``None``: absent)."""
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    biases = (f"bias_ih{suffix}", f"bias_hh{suffix}") if module.bias else (None, None)
    projection = f"weight_hr{suffix}" if getattr(module, "proj_size", 0) else None
    return LayerWeights(f"weight_ih{suffix}", f"weight_hh{suffix}", *biases, projection)


def all_parameter_names(module: nn.RNNBase) -> frozenset[str]:
    """The names of every layer's and direction's parameters."""
    directions = 2 if module.bidirectional else 1
    return frozenset(name for layer in range(module.num_layers)
                     for direction in range(directions)
                     for name in layer_parameter_names(module, layer, direction).flat())


# -- which examples are active at each step ---------------------------------------------
class Steps:
    """The time steps of one call: all ``B`` sequences active at every step (padded input),
    or, for a PackedSequence (sorted by decreasing length), the first ``batch_sizes[t]``
    at step t. Converts between padded ``(T, B, F)`` tensors and packed data.
    ``example_rows[n]``: the row that holds example n (``None``: row n; a PackedSequence's
    ``unsorted_indices``)."""

    def __init__(self, length: int, batch: int, batch_sizes: Tensor | None = None,
                 device: torch.device | None = None,
                 example_rows: Tensor | None = None) -> None:
        self.length, self.batch = length, batch
        self.batch_sizes = batch_sizes
        self.example_rows = example_rows
        self.sizes = None if batch_sizes is None else batch_sizes.tolist()
        if batch_sizes is not None:
            active = torch.arange(batch) < batch_sizes.unsqueeze(1)  # (T, B)
            self._packed_index = active.flatten().nonzero().squeeze(1).to(device)
            lengths, step = active.sum(0), torch.arange(length).unsqueeze(1)
            # step t of sequence n reversed within its length, padding left in place
            source = torch.where(step < lengths, lengths - 1 - step, step)
            self._reversal = (source * batch + torch.arange(batch)).flatten().to(device)

    @property
    def packed(self) -> bool:
        """Whether sequences end at different steps."""
        return self.sizes is not None

    def active(self, step: int) -> int:
        """How many sequences (a prefix of the rows) are active at ``step``."""
        return self.batch if self.sizes is None else self.sizes[step]

    def pack(self, padded: Tensor) -> Tensor:
        """Packed data ``(N, F)`` of a padded ``(T, B, F)`` tensor."""
        return padded.flatten(0, 1).index_select(0, self._packed_index)

    def unpack(self, data: Tensor) -> Tensor:
        """The padded ``(T, B, F)`` tensor of packed data, zeros where inactive."""
        padded = data.new_zeros(self.length * self.batch, data.shape[-1])
        return padded.index_copy(0, self._packed_index, data).view(
            self.length, self.batch, -1)

    def in_example_order(self, rows: Tensor) -> Tensor:
        """``rows`` ``(B, ...)``, one per sequence in this call's order, reordered so that
        row n is example n's."""
        return rows if self.example_rows is None else rows.index_select(0, self.example_rows)

    def reverse(self, padded: Tensor) -> Tensor:
        """Each sequence of ``(T, B, F)`` reversed in time within its own length."""
        if not self.packed:
            return padded.flip(0)
        return padded.flatten(0, 1).index_select(0, self._reversal).view(padded.shape)


# -- one layer and direction --------------------------------------------------------------
class CellGradients(NamedTuple):
    """A cell's backward, time-major ``(T, B, .)`` like the layer's tensors, in the form the
    shared statistics take (a gate's columns may be a view into a larger buffer)."""

    gates: Tensor  # (T, B, G H): gradient w.r.t. the input side W_ih x_t + b_ih
    hidden_gates: Tensor | None  # the same w.r.t. the hidden side, where it differs (GRU)
    inputs: Tensor  # (T, B, in): x_t
    previous_hidden: Tensor  # (T, B, H_out): h_{t-1}
    initial_state: tuple[Tensor, ...]  # gradients w.r.t. h0 (and c0)
    projection: tuple[Tensor, Tensor] | None = None  # (dL/dh_t, m_t) for W_hr: h_t = W_hr m_t
    #: ``gates`` holds the input side's rows rolled by this many (``torch.roll``), so that
    #: a cell can hand over a view of its buffer instead of a reordered copy (GRU)
    input_roll: int = 0


class RecurrentCell(ABC):
    """One cell type's equations: the fused forward (torch's own kernel) and the
    hand-written backward."""

    #: the state tensors a layer carries: 1 (h), or 2 (h, c)
    state_size: ClassVar[int] = 1

    #: torch's fused one-layer kernel (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``)
    kernel: Callable

    @classmethod
    def for_module(cls, module: nn.RNNBase) -> "RecurrentCell":
        """The cell of ``module`` (default: the cell has no options)."""
        return cls()

    def run(self, x: Tensor, steps: Steps, weights: Sequence[LayerWeights],
            state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``(output (T, B, D H_out), final state)`` of one layer with the ``D =
        len(weights)`` directions' weights for input ``x (T, B, in)`` and the initial
        ``state``, each ``(D, B, .)``, by :attr:`kernel`; padded output is zero where
        inactive."""
        hx = list(state) if self.state_size > 1 else state[0]
        output, *final = fused_layer(self.kernel, x, steps, hx, weights)
        return output, tuple(final)

    @abstractmethod
    def backward(self, x: Tensor, output: Tensor, weights: LayerWeights,
                 state: tuple[Tensor, ...], grad_output: Tensor,
                 grad_final: tuple[Tensor | None, ...], steps: Steps) -> CellGradients:
        """Backpropagation through time: the gate gradients of every step."""


def fused_layer(kernel: Callable, x: Tensor, steps: Steps, hx,
                weights: Sequence[LayerWeights]):
    """torch's fused kernel (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ...) for one
    layer of ``len(weights)`` directions without dropout, on padded ``(T, B, F)`` input;
    its output ``(T, B, D H_out)`` and states ``(D, B, .)``."""
    has_bias = weights[0].bias_ih is not None
    flat = [w for direction in weights for w in direction.flat()]
    bidirectional = len(weights) == 2
    with warnings.catch_warnings():
        # cuDNN compacts the separate weights of one layer on every call, as it must here
        warnings.filterwarnings("ignore", message="RNN module weights are not part")
        if not steps.packed:
            return kernel(x, hx, flat, has_bias, 1, 0.0, False, bidirectional, False)
        data, *states = kernel(steps.pack(x), steps.batch_sizes, hx, flat, has_bias, 1,
                               0.0, False, bidirectional)
    return (steps.unpack(data), *states)


class LayerCall(NamedTuple):
    """The non-tensor arguments of :class:`RecurrentLayerFunction`: the cell, the steps,
    and where each direction's statistics go (``len(statistics)`` is the number of
    directions)."""

    cell: RecurrentCell
    steps: Steps
    statistics: tuple[LayerStatistics | None, ...]


class RecurrentLayerFunction(torch.autograd.Function):
    """One layer, all its directions: ``(call, x (T, B, in), *weights, *state)`` ->
    ``(output (T, B, D H_out), *final state)``, with ``weights`` the five
    :class:`LayerWeights` entries of each direction in turn and each state ``(D, B, .)``;
    the backward also emits ``sum_n c_n**2`` of the parameters.

    Both directions run in one fused kernel and share the saved input and output (no
    reversed or concatenated copies held for the backward); the backward reverses a
    direction's sequences only while it is being processed."""

    @staticmethod
    def forward(ctx, call: LayerCall, x: Tensor, *tensors: Tensor | None):
        """Run the fused kernel; save its inputs and output for the backward."""
        directions = len(call.statistics)
        weights = [LayerWeights(*tensors[5 * d:5 * d + 5]) for d in range(directions)]
        state = tuple(tensors[5 * directions:])
        output, final = call.cell.run(x, call.steps, weights, state)
        ctx.save_for_backward(x, output, *tensors)
        ctx.call = call
        return (output, *final)

    @staticmethod
    def backward(ctx, grad_output: Tensor | None, *grad_final: Tensor | None):
        """Backpropagate through time, one direction after the other; emit the
        statistics; return the gradients."""
        x, output, *tensors = ctx.saved_tensors
        call, needs = ctx.call, ctx.needs_input_grad
        directions = len(call.statistics)
        if grad_output is None:
            grad_output = torch.zeros_like(output)
        grad_x, parameter_grads, state_grads = None, [None] * directions, [None] * directions
        # the reverse direction first: its reversed copies are held while no grad_x is yet
        for d in reversed(range(directions)):
            weights = LayerWeights(*tensors[5 * d:5 * d + 5])
            state = tuple(s[d] for s in tensors[5 * directions:])
            final = tuple(None if g is None else g[d] for g in grad_final)
            state_grads[d], grad_x_d, parameter_grads[d] = direction_backward(
                call, d, x, output, grad_output, weights, state, final,
                needs[1], needs[2 + 5 * d:7 + 5 * d])
            grad_x = grad_x_d if grad_x is None else grad_x.add_(grad_x_d)
            del grad_x_d
        initial = [torch.stack(g) for g in zip(*state_grads)]
        initial = [g if need else None for g, need in zip(initial, needs[2 + 5 * directions:])]
        return (None, grad_x, *(g for each in parameter_grads for g in each), *initial)


def direction_backward(call: LayerCall, direction: int, x: Tensor, output: Tensor,
                       grad_output: Tensor, weights: LayerWeights,
                       state: tuple[Tensor, ...], grad_final: tuple[Tensor | None, ...],
                       need_x: bool, needs: Sequence[bool]
                       ) -> tuple[tuple[Tensor, ...], Tensor | None, LayerWeights]:
    """One direction of a layer: ``(dL/d initial state, its part of dL/dx or None, its
    parameters' gradients)``; emits their statistics. The reverse direction is the forward
    recursion on each sequence reversed within its length (:meth:`Steps.reverse`).

    Each tensor is dropped as soon as nothing further needs it (the reversed copies after
    the recursion, the cell's inputs before ``dL/dx``): this keeps the peak memory of the
    backward pass low."""
    steps, directions, shape = call.steps, len(call.statistics), x.shape
    width = output.shape[-1] // directions
    columns = slice(direction * width, (direction + 1) * width)
    output, grad_output = output[..., columns], grad_output[..., columns]
    if direction == 1:
        x, output, grad_output = (steps.reverse(t) for t in (x, output, grad_output))
    grads = call.cell.backward(x, output, weights, state, grad_output, grad_final, steps)
    del x, output, grad_output
    # the statistics first: their chunk buffer is freed before grad_x is allocated
    parameter_grads = parameter_gradients(grads, weights, needs, call.statistics[direction],
                                          steps)
    gates, roll, initial = grads.gates, grads.input_roll, grads.initial_state
    del grads
    grad_x = None
    if need_x:
        weight_ih = weights.weight_ih.roll(roll, 0) if roll else weights.weight_ih
        grad_x = torch.mm(gates.flatten(0, 1), weight_ih).view(shape)
        grad_x = grad_x if direction == 0 else steps.reverse(grad_x)
    return initial, grad_x, parameter_grads


# -- the statistics -----------------------------------------------------------------------
def sequence_weight_statistics(grad_pre: Tensor, inputs: Tensor, with_statistics: bool
                               ) -> tuple[Tensor, Tensor | None]:
    """``(sum_n G_n^T X_n, sum_n (G_n^T X_n)**2)`` for ``grad_pre`` ``(T, B, out)`` and
    ``inputs`` ``(T, B, in)`` (``G_n``: ``grad_pre[:, n]``): a weight's gradient and its
    statistic (``None`` without).

    Without statistics, the gradient is one matmul over all ``T B`` rows; with them, the
    per-example matrices are formed by ``bmm`` in chunks of examples small enough to stay
    in cache while they are squared and summed (their sum is the gradient: the same
    multiply-adds). ``bmm`` takes the time-major chunks as strided batches, no copy, and
    writes every chunk into one buffer (a new tensor per chunk would hold two chunks at
    once while the next is computed).
    """
    if not with_statistics:
        return torch.mm(grad_pre.flatten(0, 1).t(), inputs.flatten(0, 1)), None
    batch = grad_pre.shape[1]
    grad = grad_pre.new_zeros(grad_pre.shape[-1], inputs.shape[-1])
    sum_sq = torch.zeros_like(grad)
    step = min(batch, chunk_size(grad.numel(), STATISTICS_CHUNK_ELEMENTS))
    buffer = grad_pre.new_empty(step, *grad.shape)
    for start in range(0, batch, step):
        stop = min(start + step, batch)
        per_example = torch.bmm(grad_pre[:, start:stop].permute(1, 2, 0),
                                inputs[:, start:stop].transpose(0, 1),
                                out=buffer[:stop - start])
        grad += per_example.sum(0)
        sum_sq += per_example.square_().sum(0)
    return grad, sum_sq


# -- where the statistics go ------------------------------------------------------------
#: what a direction's backward forms for a requested parameter: ``sum_n c_n**2`` (used
#: once: emitted), or the per-example contributions ``c_n`` (used several times: handed
#: over to be added up before squaring, :mod:`~msvag_mb.extensions.reuse`)
SQUARED, PER_EXAMPLE = "squared", "per-example"


class LayerStatistics:
    """Where one layer and direction's statistics go, under the module's parameter names
    ``names``: ``sum_n c_n**2`` is emitted for a parameter used once; for one used several
    times (:meth:`LayerContext.reused`: known once the forward pass has been checked, so
    asked in the backward pass) its per-example contributions are handed over
    (:meth:`LayerContext.add_use`)."""

    def __init__(self, context: LayerContext, names: LayerWeights) -> None:
        self.context, self.names = context, names

    def forms(self) -> LayerWeights:
        """:data:`SQUARED`, :data:`PER_EXAMPLE`, or ``None`` (not requested), per parameter."""
        requested, reused = self.context.requested, self.context.reused()
        return LayerWeights(*(None if name not in requested else
                              PER_EXAMPLE if name in reused else SQUARED
                              for name in self.names))

    def report(self, forms: LayerWeights, statistics: dict[str, object]) -> None:
        """Emit or hand over each parameter's statistic (keyed by :class:`LayerWeights`
        field), as its form says."""
        for field, value in statistics.items():
            name, form = getattr(self.names, field), getattr(forms, field)
            if form is SQUARED:
                self.context.emit(name, value)
            elif form is PER_EXAMPLE:
                self.context.add_use(name, value)


def layer_statistics(context: LayerContext, names: LayerWeights) -> LayerStatistics | None:
    """One layer and direction's :class:`LayerStatistics` (``None``: none requested)."""
    return LayerStatistics(context, names) if context.requested & set(names.flat()) else None


def weight_terms(grad_pre: Tensor, inputs: Tensor, form: str | None,
                 steps: Steps) -> tuple[Tensor, object]:
    """``(gradient, statistic)`` of a weight whose example-n contribution is ``G_n^T X_n``
    (``grad_pre`` ``(T, B, out)``, ``inputs`` ``(T, B, in)``): ``sum_n c_n**2``
    (:data:`SQUARED`), the factors as a :class:`~.reuse.ProductUse` (:data:`PER_EXAMPLE`;
    in the examples' order, to be added to the other uses' row by row), or ``None``."""
    if form is PER_EXAMPLE:
        grad, _ = sequence_weight_statistics(grad_pre, inputs, False)
        return grad, ProductUse(steps.in_example_order(grad_pre.transpose(0, 1)),
                                steps.in_example_order(inputs.transpose(0, 1)))
    return sequence_weight_statistics(grad_pre, inputs, form is SQUARED)


def bias_terms(grad_pre: Tensor, form: str | None, steps: Steps) -> tuple[Tensor, object]:
    """``(gradient, statistic)`` of a bias with ``g_n = sum_t grad_pre[t, n]``:
    ``sum_n g_n**2`` (:data:`SQUARED`), the ``g_n`` as a :class:`~.reuse.DenseUse`
    (:data:`PER_EXAMPLE`, in the examples' order), or ``None``."""
    per_example = grad_pre.sum(0)
    grad = per_example.sum(0)
    if form is PER_EXAMPLE:
        return grad, DenseUse(steps.in_example_order(per_example))
    return grad, (per_example.square_().sum(0) if form is SQUARED else None)


def _input_side(grads: CellGradients, form: str | None) -> Tensor:
    """The input side's gate gradients, in the weights' row order for per-example
    contributions (held rolled where :attr:`CellGradients.input_roll` says so)."""
    if form is PER_EXAMPLE and grads.input_roll:
        return grads.gates.roll(-grads.input_roll, -1)
    return grads.gates


def _weight_results(grads: CellGradients, need: LayerWeights, forms: LayerWeights,
                    steps: Steps) -> dict[str, tuple[Tensor, object]]:
    """``{field: (gradient, statistic)}`` of the needed weights: ``W_ih`` from the input
    side's gate gradients and ``x_t``, ``W_hh`` from the hidden side's and ``h_{t-1}``,
    ``W_hr`` from ``dL/dh_t`` and ``m_t``."""
    hidden_gates = grads.gates if grads.hidden_gates is None else grads.hidden_gates
    factors = {"weight_ih": (_input_side(grads, forms.weight_ih), grads.inputs),
               "weight_hh": (hidden_gates, grads.previous_hidden),
               "weight_hr": grads.projection}  # None without a projection (not needed)
    return {name: weight_terms(*factors[name], getattr(forms, name), steps)
            for name in factors if getattr(need, name)}


def _bias_results(grads: CellGradients, need: LayerWeights, forms: LayerWeights,
                  steps: Steps) -> dict[str, tuple[Tensor, object]]:
    """``{field: (gradient, statistic)}`` of the needed biases."""
    results = {}
    if need.bias_ih:
        side = _input_side(grads, forms.bias_ih)
        results["bias_ih"] = bias_terms(side, forms.bias_ih, steps)
    if need.bias_hh:
        if grads.hidden_gates is not None:
            results["bias_hh"] = bias_terms(grads.hidden_gates, forms.bias_hh, steps)
        elif need.bias_ih and forms.bias_hh is forms.bias_ih:
            # equal values, own tensors: p.grad is modified in place (clipping, unscaling)
            results["bias_hh"] = tuple(v.clone() if isinstance(v, Tensor) else v
                                       for v in results["bias_ih"])
        else:
            results["bias_hh"] = bias_terms(grads.gates, forms.bias_hh, steps)
    return results


def parameter_gradients(grads: CellGradients, weights: LayerWeights, needs: Sequence[bool],
                        statistics: LayerStatistics | None, steps: Steps) -> LayerWeights:
    """The parameters' gradients (``None`` where not needed); reports their statistics."""
    need = LayerWeights(*(n and w is not None for n, w in zip(needs, weights)))
    forms = statistics.forms() if statistics is not None else LayerWeights(*(None,) * 5)
    forms = LayerWeights(*(form if n else None for form, n in zip(forms, need)))
    results = {**_weight_results(grads, need, forms, steps),
               **_bias_results(grads, need, forms, steps)}
    if grads.input_roll:  # back to the weights' row order (per-example ones are already)
        for name in ("weight_ih", "bias_ih"):
            if name in results and getattr(forms, name) is not PER_EXAMPLE:
                results[name] = tuple(None if v is None else v.roll(-grads.input_roll, 0)
                                      for v in results[name])
    if statistics is not None:
        statistics.report(forms, {name: value for name, (_, value) in results.items()})
    return LayerWeights(**{name: results[name][0] if name in results else None
                           for name in LayerWeights._fields})


# -- shared pieces of the cells' backward ------------------------------------------------
def fast_tanh_(x: Tensor) -> Tensor:
    """``tanh(x) = 2 sigmoid(2x) - 1`` in place: measured faster than ``torch.tanh`` on large
    float32 CPU tensors (docs/benchmarks.md); exact to rounding (absolute error ~ 1 ulp
    of 1)."""
    return x.mul_(2).sigmoid_().mul_(2).sub_(1)


def previous_hidden(h0: Tensor, output: Tensor) -> Tensor:
    """``h_{t-1}`` for every step, ``(T, B, H_out)``; for a row active at step t > 0 it is
    the output at t - 1 (the row was active then too)."""
    return torch.cat([h0.unsqueeze(0), output[:-1]])


def carry_back(dh: Tensor, gate_grad: Tensor, weight: Tensor, grad_below: Tensor | None,
               active: int, direct: Tensor | None = None) -> Tensor:
    """``dL/dh_{t-1}`` from ``dh = dL/dh_t`` ``(B, H)``: for the ``active`` rows
    ``grad_below + direct * dh + gate_grad @ weight`` (``grad_below``: the output gradient
    at t - 1, ``None`` at t = 0; ``direct``: the GRU's ``z_t``), one kernel where it can;
    the inactive rows carry ``dh`` unchanged (plus ``grad_below``)."""
    rows = dh[:active]
    base = None if grad_below is None else grad_below[:active]
    if direct is not None:
        base = rows * direct if base is None else torch.addcmul(base, rows, direct)
    new = torch.mm(gate_grad, weight) if base is None else torch.addmm(base, gate_grad, weight)
    if active == dh.shape[0]:
        return new
    rest = dh[active:] if grad_below is None else dh[active:] + grad_below[active:]
    return torch.cat([new, rest])


def initial_gradient(grad_output: Tensor, grad_last: Tensor | None) -> Tensor:
    """``dL/dh`` at the last step ``T - 1``: its output gradient plus that of the final
    state (for a shorter packed sequence the latter passes through its padding steps)."""
    return grad_output[-1] if grad_last is None else grad_output[-1] + grad_last


#: ``step(t, active, dh)`` of a cell's backward, with ``dh = dL/dh_t`` of the ``active``
#: rows: turns the cell's factors at step t into its gate gradients in place and returns
#: ``(their hidden side (active, G H), the direct path's factor of dh_{t-1} or None)``
StepBackward = Callable[[int, int, Tensor], tuple[Tensor, Tensor | None]]


def backprop_through_time(step: StepBackward, gates: Tensor, grad_output: Tensor,
                          grad_last: Tensor | None, weight_hh: Tensor, steps: Steps) -> Tensor:
    """``dL/dh0`` by the recursion all cells share, last step first: at step t the cell's
    ``step`` makes the gate gradients, which ``gates`` ``(T, B, ...)`` holds (zeroed in
    the inactive rows: no contribution), then ``dh_{t-1}`` follows by :func:`carry_back`."""
    length, batch = grad_output.shape[:2]
    dh = initial_gradient(grad_output, grad_last)
    with loop_threads(grad_output.device):
        for t in range(length - 1, -1, -1):  # dh: gradient w.r.t. h_t, all paths
            active = steps.active(t)
            hidden_side, direct = step(t, active, dh[:active])
            if active < batch:
                gates[t, active:].zero_()
            dh = carry_back(dh, hidden_side, weight_hh,
                            grad_output[t - 1] if t > 0 else None, active, direct)
    return dh


def gate_buffer(steps: Steps, *shape: int, like: Tensor) -> Tensor:
    """A buffer for per-step gate gradients: zeros where rows are inactive (packed)."""
    make = torch.zeros if steps.packed else torch.empty
    return make(*shape, dtype=like.dtype, device=like.device)


def loop_threads(device: torch.device):
    """The thread limit for a step-by-step loop on ``device`` (:data:`LOOP_THREADS`)."""
    return at_most_threads(LOOP_THREADS if device.type == "cpu" else None)


# -- the module's forward -----------------------------------------------------------------
class SequenceInput(NamedTuple):
    """A module call's input as padded time-major ``(T, B, F)``, sorted for packed input."""

    x: Tensor
    steps: Steps
    packed: PackedSequence | None  # the original, for its batch sizes and permutations


def sequence_input(module: nn.RNNBase, context: LayerContext, kind: str,
                   input) -> SequenceInput:
    """The input as :class:`SequenceInput`, refused unless it is batched, its examples are
    the module's sequences (a traced layout must agree with ``batch_first`` or with the
    packing's) and there are ``B`` of them."""
    if isinstance(input, PackedSequence):
        batch_sizes = input.batch_sizes
        steps = Steps(len(batch_sizes), int(batch_sizes[0]), batch_sizes, input.data.device,
                      input.unsorted_indices)
        _check_packed_layout(context, kind, input.data)
        result = SequenceInput(steps.unpack(input.data), steps, input)
    elif not isinstance(input, Tensor) or input.dim() != 3:
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise UnsupportedModelError(
            f"layer '{context.name}' ({kind}) got an unbatched input of shape {shape}; "
            "engine 'extensions' needs batched input, (B, T, F) with batch_first=True or "
            "(T, B, F), or a PackedSequence, with the examples as the sequences: add the "
            "batch dim (x.unsqueeze(0)).")
    else:
        axis = 0 if module.batch_first else 1
        context.layouts.check_declared(input, context.name, kind, axis)
        x = input.transpose(0, 1) if module.batch_first else input
        result = SequenceInput(x, Steps(x.shape[0], x.shape[1]), None)
    if result.steps.batch != context.batch_size:
        raise UnsupportedModelError(
            f"layer '{context.name}' ({kind}) got a batch of {result.steps.batch} sequences, "
            f"not the {context.batch_size} examples of the model's input; the examples must "
            "be the sequences.")
    return result


def _check_packed_layout(context: LayerContext, kind: str, data: Tensor) -> None:
    """Where the packed data's padded source can be traced (it needs a gradient), its
    examples must lie along the axis that the packing took as the batch."""
    node = data.grad_fn
    if node is None or type(node).__name__ != "PackPaddedSequenceBackward0":
        return  # untraced: the packing's declaration stands, as batch_first does
    padded = node.next_functions[0]
    shape = tuple(node._saved_input_sym_sizes)
    declared = 0 if node._saved_batch_first else 1
    traced = context.layouts.child(padded, 0)
    if isinstance(traced, tuple) and (traced[1] != 1 or traced[0] != declared):
        raise UnsupportedModelError(
            f"layer '{context.name}' ({kind}) got a PackedSequence packed from a tensor of "
            f"shape {shape} along dim {declared} (batch_first="
            f"{bool(node._saved_batch_first)}), but its examples lie along dim "
            f"{traced[0]}; pack with the examples as the sequences, or use engine='vmap'.")


def initial_states(module: nn.RNNBase, cell: RecurrentCell, sequence: SequenceInput,
                   hx, dtype: torch.dtype) -> list[Tensor]:
    """The initial state tensors ``(L D, B, .)`` (zeros where none is passed), in the
    parameters' dtype and, for packed input, in the sorted order of its data."""
    directions = 2 if module.bidirectional else 1
    hidden_out = getattr(module, "proj_size", 0) or module.hidden_size
    sizes = (hidden_out, module.hidden_size)[:cell.state_size]
    x, packed = sequence.x, sequence.packed
    if hx is None:
        return [x.new_zeros(module.num_layers * directions, sequence.steps.batch, size,
                            dtype=dtype) for size in sizes]
    states = list(hx) if cell.state_size > 1 else [hx]
    if packed is not None:
        module.check_forward_args(packed.data, hx, packed.batch_sizes)
    else:  # torch's own checks, on the input in the module's layout
        module.check_forward_args(x.transpose(0, 1) if module.batch_first else x, hx, None)
    if packed is not None and packed.sorted_indices is not None:
        states = [s.index_select(1, packed.sorted_indices) for s in states]
    return [s.to(dtype) for s in states]


def inter_layer_dropout(x: Tensor, p: float) -> Tensor:
    """The dropout between layers in train mode, drawn here (a differentiable op outside
    the layers, so the statistics are those of the gradient this forward produces)."""
    return F.dropout(x, p, training=True)


def run_layers(module: nn.RNNBase, context: LayerContext, cell: RecurrentCell,
               sequence: SequenceInput, states: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """All layers and directions: ``(output (T, B, D H_out), final states (L D, B, .))``."""
    directions = 2 if module.bidirectional else 1
    x = sequence.x
    finals: list[list[Tensor]] = [[] for _ in states]
    for layer in range(module.num_layers):
        names = [layer_parameter_names(module, layer, d) for d in range(directions)]
        weights = [None if n is None else getattr(module, n) for each in names for n in each]
        state = [s[layer * directions:(layer + 1) * directions] for s in states]
        call = LayerCall(cell, sequence.steps,
                         tuple(layer_statistics(context, n) for n in names))
        x, *final = RecurrentLayerFunction.apply(call, x, *weights, *state)
        for collected, tensor in zip(finals, final):
            collected.append(tensor)
        if module.training and module.dropout > 0 and layer < module.num_layers - 1:
            x = inter_layer_dropout(x, module.dropout)
    return x, [torch.cat(collected) for collected in finals]


def unrolled_forward(module: nn.RNNBase, context: LayerContext, cell: RecurrentCell,
                     input, hx=None):
    """Drop-in for the module's ``forward``, built from :class:`RecurrentLayerFunction`."""
    context.count_call()
    kind = type(module).__name__
    sequence = sequence_input(module, context, kind, input)
    dtype = module.weight_ih_l0.dtype
    # the layer's maths runs in the parameters' precision, also under autocast
    with torch.autocast(device_type=sequence.x.device.type, enabled=False):
        states = initial_states(module, cell, sequence, hx, dtype)
        sequence = sequence._replace(x=sequence.x.to(dtype))
        output, finals = run_layers(module, context, cell, sequence, states)
    packed = sequence.packed
    if packed is not None:
        if packed.unsorted_indices is not None:
            finals = [s.index_select(1, packed.unsorted_indices) for s in finals]
        output = PackedSequence(sequence.steps.pack(output), packed.batch_sizes,
                                packed.sorted_indices, packed.unsorted_indices)
    elif module.batch_first:
        output = output.transpose(0, 1)
    result = (output, tuple(finals) if cell.state_size > 1 else finals[0])
    for tensor, axis in recurrent_output_layouts(module, result):
        context.layouts.register(tensor, axis)
    context.uses.record_call(context.name, (input, hx), result)
    return result


def recurrent_output_layouts(module: nn.RNNBase, output) -> list[tuple[Tensor, int]]:
    """``(tensor, batch axis)`` of a recurrent module's outputs: the sequence in the layout
    that ``batch_first`` declares (none for packed output), the final states along dim 1."""
    sequence, state = output
    states = list(state) if isinstance(state, tuple) else [state]
    declared = [] if isinstance(sequence, PackedSequence) else \
        [(sequence, 0 if module.batch_first else 1)]
    return declared + [(s, 1) for s in states]


# -- the extension ------------------------------------------------------------------------
class _RestoreForward:
    """Undo the temporary replacement of ``module.forward``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.had_own_forward = "forward" in module.__dict__
        self.own_forward = module.__dict__.get("forward")

    def remove(self) -> None:
        """Put the module's own ``forward`` back."""
        if self.had_own_forward:
            self.module.forward = self.own_forward
        else:
            self.module.__dict__.pop("forward", None)


class RecurrentExtension(ModuleExtension):
    """A recurrent module type: any num_layers, batch_first, bias, bidirectional,
    inter-layer dropout, initial state, padded or packed input, a module called several
    times or with parameters tied to other layers; subclasses name the module types and
    the cell (:attr:`cell_type`)."""

    #: the cell equations of the handled module types
    cell_type: ClassVar[type[RecurrentCell]]

    #: parameters used several times get per-example contributions (:class:`LayerStatistics`)
    supports_reuse = True

    def cell_for(self, module: nn.Module) -> RecurrentCell:
        """The cell equations of ``module`` (:meth:`RecurrentCell.for_module`)."""
        return self.cell_type.for_module(module)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Refuses one trainable ``Parameter`` under two of the module's names
        (``weight_hh_l1 = weight_hh_l0``): its uses are counted per call of the module,
        which would miss one per name."""
        holders: dict[int, str] = {}
        for name in sorted(self.parameter_names(module)):
            param = getattr(module, name)
            if not param.requires_grad:
                continue
            first = holders.setdefault(id(param), name)
            if first != name:
                return (f"holds one Parameter as both '{first}' and '{name}', which engine "
                        "'extensions' cannot add up; give each its own Parameter, or use "
                        "engine='ghost_batch'.")
        return None

    def parameter_names(self, module: nn.Module) -> frozenset[str]:
        """``weight_ih_l<k>``, ``weight_hh_l<k>``, ``bias_ih_l<k>``, ``bias_hh_l<k>`` (and
        ``weight_hr_l<k>``), each also with ``_reverse`` when bidirectional."""
        return all_parameter_names(module)

    def output_layouts(self, module: nn.Module, input_axis: int | None,
                       output) -> list[tuple[Tensor, int]]:
        """The output sequence in the declared layout, the final states along dim 1."""
        return recurrent_output_layouts(module, output)

    def attach(self, module: nn.Module, context: LayerContext) -> list[Removable]:
        """Shadow the module's ``forward`` with an unrolled one that emits the statistics."""
        restore = _RestoreForward(module)
        # an instance attribute shadows the class's forward for this module only
        module.forward = functools.partial(unrolled_forward, module, context,
                                           self.cell_for(module))
        return [restore]
