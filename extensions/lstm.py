"""``nn.LSTM``: per-example ``sum_n c_n**2`` from the per-time-step gate gradients.

For one layer with input ``x_t``, previous hidden state ``h_{t-1}`` (``h_{-1} = h0``, the
carried initial state when one is passed) and gate pre-activations
``a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh`` (gate order i, f, g, o as in PyTorch),
example n's contributions are

    W_ih: sum_t da_nt x_nt^T      W_hh: sum_t da_nt h_n,t-1^T      b_ih, b_hh: sum_t da_nt

where ``da_nt`` is the gradient of the batch loss w.r.t. ``a_nt``. nn.LSTM's fused kernels do
not expose ``da`` (and ``torch.func.vmap`` over them gives wrong per-example gradients), so
while the statistics are collected the module's forward is temporarily replaced by one
built from :class:`LSTMLayerFunction` per layer, with the module's own weights: its
forward is PyTorch's fused single-layer kernel, its backward recomputes the gates and
backpropagates through time by hand, which yields ``da`` for all steps. The per-example
matrices ``da_n^T [x_n, h_n,prev]`` are then formed by ``bmm`` in cache-sized chunks of
examples, squared for the statistics and summed for the weight gradients (which need the
same multiply-adds anyway).

Examples are the sequences along the batch axis (dim 0 with ``batch_first=True``, else
dim 1); row n of ``(h0, c0)`` belongs to example n. Refused: bidirectional, ``proj_size``,
inter-layer dropout in train mode, packed or unbatched input.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from msvag_mb.model_checks import UnsupportedModelError

from .core import (
    CACHE_BUDGET_ELEMENTS,
    LayerContext,
    ModuleExtension,
    Removable,
    at_most_threads,
    chunk_size,
    register_extension,
)

#: emit(weight_ih_sq, weight_hh_sq, bias_sq) for one layer, or None: no statistics wanted
LayerEmitter = Callable[[Tensor, Tensor, Tensor | None], None]


class LSTMLayerFunction(torch.autograd.Function):
    """One LSTM layer: ``(x (T,B,in), W_ih, W_hh, b_ih, b_hh, h0, c0, emit)`` ->
    ``(output (T,B,H), h_T, c_T)``; its backward also reports per-example statistics.

    The forward is PyTorch's own fused LSTM kernel (no autograd inside). The backward
    recomputes the gates of all steps at once from the saved outputs (``h_{t-1}`` is known
    for every t, so this is one matmul, not a loop), runs the cell-state recursion, then
    backpropagates through time by hand to get ``da`` for every step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
                bias_hh: Tensor | None, h0: Tensor, c0: Tensor,
                emit: LayerEmitter | None) -> tuple[Tensor, Tensor, Tensor]:
        """Run one LSTM layer with the fused kernel; save its inputs and outputs for backward."""
        weights = [weight_ih, weight_hh] + ([bias_ih, bias_hh] if bias_ih is not None else [])
        output, h_last, c_last = torch.lstm(
            x, (h0.unsqueeze(0), c0.unsqueeze(0)), weights, bias_ih is not None,
            1, 0.0, False, False, False)  # one layer, no dropout, eval, unidirectional, (T,B,F)
        bias = bias_ih + bias_hh if bias_ih is not None else None
        ctx.save_for_backward(x, weight_ih, weight_hh, bias, h0, c0, output)
        ctx.emit = emit
        return output, h_last[0], c_last[0]

    @staticmethod
    def backward(ctx, grad_output: Tensor | None, grad_h_last: Tensor | None,
                 grad_c_last: Tensor | None):
        """Backpropagate through time; emit ``sum_n c_n**2`` for the layer's parameters."""
        x, weight_ih, weight_hh, bias, h0, c0, output = ctx.saved_tensors
        stacked = _stack_inputs(x, h0, output)  # (B, T, in + H)
        factors = _gate_factors(stacked, weight_ih, weight_hh, bias, c0)
        if grad_output is None:
            grad_output = torch.zeros_like(output)
        d_pre, dh0, dc0 = _backprop_through_time(factors, grad_output, grad_h_last,
                                                 grad_c_last, c0, weight_hh)
        del factors  # free the gate buffers before the per-example matrices (peak memory)
        needs = ctx.needs_input_grad
        grad_x, grad_weight_ih, grad_weight_hh, grad_bias = _parameter_gradients(
            ctx, d_pre, stacked, weight_ih, with_bias=bias is not None)
        return (grad_x, grad_weight_ih if needs[1] else None,
                grad_weight_hh if needs[2] else None,
                grad_bias if needs[3] else None, grad_bias if needs[4] else None,
                dh0 if needs[5] else None, dc0 if needs[6] else None, None)


class _GateFactors(NamedTuple):
    """The step-independent factors of one layer's chain rule, all ``(B, T, ., H)``."""

    forget: Tensor  # f_t
    dc_from_dh: Tensor  # o_t (1 - tanh(c_t)^2)
    do_from_dh: Tensor  # tanh(c_t) sigma'(a_o)
    ifg_from_dc: Tensor  # (g_t sigma'(a_i), c_{t-1} sigma'(a_f), i_t (1 - g_t^2))


def _gate_factors(stacked: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
                  c0: Tensor) -> _GateFactors:
    """Recompute the gates of all steps at once from ``stacked = [x_t, h_{t-1}]``, run the
    cell-state recursion and return the chain rule's step-independent factors."""
    batch, steps = stacked.shape[:2]
    hidden = weight_hh.shape[1]
    # Every elementwise kernel over a (B, T, ., H) tensor wakes the worker threads and
    # every fresh multi-MB tensor is page-faulted in: the gate maths below works in
    # place on buffers this function owns and fuses products with addcmul.
    weight = torch.cat([weight_ih, weight_hh], dim=1)  # (4H, in + H)
    flat = stacked.view(batch * steps, -1)
    gates = (torch.addmm(bias, flat, weight.t()) if bias is not None
             else torch.mm(flat, weight.t())).view(batch, steps, 4, hidden)
    # tanh(a) = 2 sigmoid(2a) - 1 (see _tanh): one sigmoid over all four slots
    gates[:, :, 2].mul_(2)
    gates.sigmoid_()
    g = gates[:, :, 2].mul_(2).sub_(1)  # the g slot now holds tanh(a_g)
    i, f, o = gates[:, :, 0], gates[:, :, 1], gates[:, :, 3]
    input_times_g = i * g
    # cells[:, t + 1] = c_t, cells[:, 0] = c_{-1} = c0: c_{t-1} is a view, no copy
    all_cells = torch.empty(batch, steps + 1, hidden, dtype=g.dtype, device=g.device)
    all_cells[:, 0] = c0
    c = c0
    for t in range(steps):  # c_t = f_t c_{t-1} + i_t g_t
        c = torch.addcmul(input_times_g[:, t], f[:, t], c, out=all_cells[:, t + 1])
    cells, previous_cells = all_cells[:, 1:], all_cells[:, :-1]
    tanh_cells = _tanh(cells)
    sigmoid_slope = torch.addcmul(gates, gates, gates, value=-1)  # sigma (1 - sigma)
    o_tanh_cells = o * tanh_cells
    dc_from_dh = torch.addcmul(o, o_tanh_cells, tanh_cells, value=-1)  # o (1 - tanh^2)
    # tanh(c) sigma'(a_o), into the buffer of o tanh(c), which is no longer needed
    do_from_dh = torch.mul(tanh_cells, sigmoid_slope[:, :, 3], out=o_tanh_cells)
    ifg_from_dc = torch.empty(batch, steps, 3, hidden, dtype=g.dtype, device=g.device)
    torch.mul(g, sigmoid_slope[:, :, 0], out=ifg_from_dc[:, :, 0])
    torch.mul(previous_cells, sigmoid_slope[:, :, 1], out=ifg_from_dc[:, :, 1])
    torch.addcmul(i, input_times_g, g, value=-1, out=ifg_from_dc[:, :, 2])  # i (1 - g^2)
    return _GateFactors(f, dc_from_dh, do_from_dh, ifg_from_dc)


def _backprop_through_time(factors: _GateFactors, grad_output: Tensor,
                           grad_h_last: Tensor | None, grad_c_last: Tensor | None, c0: Tensor,
                           weight_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(da (B, T, 4H), dL/dh0, dL/dc0)`` by the step-by-step recursion, last step first."""
    steps, batch, hidden = grad_output.shape
    f = factors.forget
    dh = grad_output[steps - 1] if grad_h_last is None else \
        grad_output[steps - 1] + grad_h_last
    dc_next = grad_c_last if grad_c_last is not None else torch.zeros_like(c0)
    d_pre = torch.empty(batch, steps, 4, hidden, dtype=f.dtype, device=f.device)  # da
    with at_most_threads(LOOP_THREADS if f.device.type == "cpu" else None):
        for t in range(steps - 1, -1, -1):  # dh: gradient w.r.t. h_t, all paths
            dc = torch.addcmul(dc_next, dh, factors.dc_from_dh[:, t])
            torch.mul(factors.ifg_from_dc[:, t], dc.unsqueeze(1), out=d_pre[:, t, :3])
            torch.mul(dh, factors.do_from_dh[:, t], out=d_pre[:, t, 3])
            dc_next = dc * f[:, t]
            d_pre_t = d_pre[:, t].view(batch, 4 * hidden)
            # dh_{t-1} = (output gradient at t-1) + da_t W_hh in one kernel
            dh = torch.addmm(grad_output[t - 1], d_pre_t, weight_hh) if t > 0 \
                else torch.mm(d_pre_t, weight_hh)
    return d_pre.view(batch, steps, 4 * hidden), dh, dc_next


def _parameter_gradients(ctx, d_pre: Tensor, stacked: Tensor, weight_ih: Tensor,
                         with_bias: bool):
    """``(grad x (T, B, in), grad W_ih, grad W_hh, grad bias)`` from ``da``, emitting the
    layer's ``sum_n c_n**2`` when statistics are wanted."""
    batch, steps, four_hidden = d_pre.shape
    in_features = weight_ih.shape[1]
    needs = ctx.needs_input_grad
    grad_x = None
    if needs[0]:
        grad_x = torch.mm(d_pre.view(-1, four_hidden), weight_ih).view(
            batch, steps, in_features).transpose(0, 1)
    grad_weight, sum_grad_squared = lstm_weight_statistics(
        d_pre, stacked, with_statistics=ctx.emit is not None)
    grad_bias = bias_sq = None
    if with_bias and (needs[3] or needs[4]):
        per_example_bias = d_pre.sum(1)  # (B, 4H)
        grad_bias = per_example_bias.sum(0)
        bias_sq = per_example_bias.square_().sum(0)
    if ctx.emit is not None:
        ctx.emit(sum_grad_squared[:, :in_features], sum_grad_squared[:, in_features:],
                 bias_sq)
    return grad_x, grad_weight[:, :in_features], grad_weight[:, in_features:], grad_bias


#: intra-op threads for the backward's step-by-step loop (None: leave torch's setting).
#: Each step's kernels are small (a (B, 4H) x (4H, H) matmul and a few (B, H) products):
#: waking a second thread for each costs about what it saves (docs/benchmarks.md).
LOOP_THREADS: int | None = 1


def _tanh(x: Tensor) -> Tensor:
    """``tanh(x) = 2 sigmoid(2x) - 1``: measured faster than ``torch.tanh`` on large float32
    CPU tensors (docs/benchmarks.md); exact to rounding (absolute error ~ 1 ulp of 1)."""
    return (x * 2).sigmoid_().mul_(2).sub_(1)


def _stack_inputs(x: Tensor, h0: Tensor, output: Tensor) -> Tensor:
    """``[x_t, h_{t-1}]`` for every step, batch-major ``(B, T, in + H)``."""
    previous_hidden = torch.cat([h0.unsqueeze(0), output[:-1]])  # (T, B, H)
    return torch.cat([x, previous_hidden], dim=2).transpose(0, 1).contiguous()


def lstm_weight_statistics(d_pre: Tensor, stacked: Tensor,
                           with_statistics: bool) -> tuple[Tensor, Tensor | None]:
    """``(grad [W_ih, W_hh], sum_n c_n**2)`` of one layer, both ``(4H, in + H)``.

    ``d_pre`` ``(B, T, 4H)``: gate pre-activation gradients; ``stacked`` ``(B, T, in + H)``:
    ``[x_t, h_{t-1}]``. Without statistics, the gradient is one matmul; with them, the
    per-example matrices ``d_pre_n^T stacked_n`` are formed in chunks small enough to stay
    in cache while they are squared and summed.
    """
    if not with_statistics:
        return torch.mm(d_pre.flatten(0, 1).t(), stacked.flatten(0, 1)), None
    batch = d_pre.shape[0]
    grad = d_pre.new_zeros(d_pre.shape[-1], stacked.shape[-1])
    sum_sq = torch.zeros_like(grad)
    step = chunk_size(grad.numel(), CACHE_BUDGET_ELEMENTS)
    for start in range(0, batch, step):
        per_example = torch.bmm(d_pre[start:start + step].transpose(1, 2),
                                stacked[start:start + step])
        grad += per_example.sum(0)
        sum_sq += per_example.square_().sum(0)
    return grad, sum_sq


def lstm_problem(module: nn.LSTM) -> str | None:
    """What in the module's configuration :class:`LSTMLayerFunction` does not cover."""
    if module.bidirectional:
        return "is bidirectional; use bidirectional=False or engine='ghost_batch'."
    if getattr(module, "proj_size", 0):
        return "has proj_size > 0; use proj_size=0 or engine='ghost_batch'."
    if module.dropout > 0 and module.num_layers > 1 and module.training:
        return ("has dropout > 0 between its layers in train mode; use separate nn.LSTM "
                "layers with nn.Dropout modules between them, dropout=0, or model.eval().")
    return None


def _time_major_input(module: nn.LSTM, context: LayerContext, input: Tensor) -> Tensor:
    """The input as ``(T, B, F)``, refused unless its examples are the module's batch axis
    (declared by ``batch_first``; a traced layout must agree)."""
    if isinstance(input, PackedSequence) or input.dim() != 3:
        kind = "a PackedSequence" if isinstance(input, PackedSequence) else \
            f"an unbatched input of shape {tuple(input.shape)}"
        raise UnsupportedModelError(
            f"layer '{context.name}' (LSTM) got {kind}; engine 'extensions' needs padded "
            "input (B, T, F) or (T, B, F) with the examples along the batch axis."
        )
    axis = 0 if module.batch_first else 1
    context.layouts.check_declared(input, context.name, "LSTM", axis)
    if input.shape[axis] != context.batch_size:
        raise UnsupportedModelError(
            f"layer '{context.name}' (LSTM) got a batch of {input.shape[axis]} sequences, not "
            f"the {context.batch_size} examples of the model's input; the examples must be "
            "the sequences."
        )
    return input.transpose(0, 1) if module.batch_first else input


def _unrolled_forward(module: nn.LSTM, context: LayerContext, input: Tensor,
                      hx: tuple[Tensor, Tensor] | None = None):
    """Drop-in for ``nn.LSTM.forward`` built from :class:`LSTMLayerFunction`."""
    context.count_call()
    x = _time_major_input(module, context, input)
    batch = x.shape[1]
    dtype = module.weight_ih_l0.dtype
    # the layer's maths runs in the parameters' precision, also under autocast
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(dtype)
        if hx is None:
            h0 = x.new_zeros(module.num_layers, batch, module.hidden_size)
            c0 = torch.zeros_like(h0)
        else:
            h0, c0 = (state.to(dtype) for state in hx)
        last_hidden, last_cells = [], []
        for layer in range(module.num_layers):
            weights = [getattr(module, f"{kind}_l{layer}", None)
                       for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            names = [f"{kind}_l{layer}" for kind in ("weight_ih", "weight_hh", "bias_ih",
                                                    "bias_hh")]
            x, h_last, c_last = LSTMLayerFunction.apply(
                x, *weights, h0[layer], c0[layer], _layer_emitter(context, names))
            last_hidden.append(h_last)
            last_cells.append(c_last)
    output = x.transpose(0, 1) if module.batch_first else x
    state = (torch.stack(last_hidden), torch.stack(last_cells))
    for tensor, axis in lstm_output_layouts(module, (output, state)):
        context.layouts.register(tensor, axis)
    context.uses.record_call(context.name, (input, hx), (output, state))
    return output, state


def lstm_output_layouts(module: nn.LSTM, output) -> list[tuple[Tensor, int]]:
    """``(tensor, batch axis)`` of an LSTM's outputs: the sequence in the layout that
    ``batch_first`` declares, ``h_n`` and ``c_n`` ``(num_layers, B, H)`` along dim 1."""
    sequence, state = output
    if isinstance(sequence, PackedSequence):
        return []
    return [(sequence, 0 if module.batch_first else 1)] + [(s, 1) for s in state]


def _layer_emitter(context: LayerContext, names: list[str]) -> LayerEmitter | None:
    """Reports one layer's statistics under the parameter names that were requested."""
    weight_ih, weight_hh, bias_ih, bias_hh = names
    if not context.requested & set(names):
        return None

    def emit(weight_ih_sq: Tensor, weight_hh_sq: Tensor, bias_sq: Tensor | None) -> None:
        for name, value in ((weight_ih, weight_ih_sq), (weight_hh, weight_hh_sq),
                            (bias_ih, bias_sq), (bias_hh, bias_sq)):
            if name in context.requested and value is not None:
                context.emit(name, value)

    return emit


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


@register_extension
class LSTMExtension(ModuleExtension):
    """``nn.LSTM``: any num_layers, batch_first, bias, carried initial state (h0, c0)."""

    module_types = (nn.LSTM,)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """``None`` for the LSTM configurations handled here, else why not."""
        return lstm_problem(module)

    def parameter_names(self, module: nn.Module) -> frozenset[str]:
        """``weight_ih_l<k>``, ``weight_hh_l<k>``, ``bias_ih_l<k>``, ``bias_hh_l<k>``."""
        return frozenset(f"{kind}_l{layer}" for layer in range(module.num_layers)
                         for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def output_layouts(self, module: nn.Module, input_axis: int | None,
                       output) -> list[tuple[Tensor, int]]:
        """The output sequence in the declared layout, ``h_n`` and ``c_n`` along dim 1."""
        return lstm_output_layouts(module, output)

    def attach(self, module: nn.Module, context: LayerContext) -> list[Removable]:
        """Shadow the module's ``forward`` with an unrolled one that emits the statistics."""
        restore = _RestoreForward(module)
        # an instance attribute shadows the class's forward for this module only
        module.forward = functools.partial(_unrolled_forward, module, context)
        return [restore]
