"""``nn.LSTM``: the cell equations for the shared recurrent machinery (``recurrent.py``).

PyTorch's LSTM, gate order i, f, g, o: with ``a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh``,

    i, f, o = sigma(a_i), sigma(a_f), sigma(a_o)      g = tanh(a_g)
    c_t = f c_{t-1} + i g                             m_t = o tanh(c_t)
    h_t = m_t, or h_t = W_hr m_t with proj_size > 0

Both sides of ``a_t`` have the same gradient ``da_t``. The backward recomputes the gates of
all steps at once from the saved outputs (``h_{t-1}`` is known for every t: one matmul per
side, not a loop), runs the cell-state recursion, then backpropagates through time by hand:

    dm_t = dh_t  (W_hr^T dh_t with a projection)
    dc_t = dc_{t+1} f_{t+1} + dm_t o (1 - tanh(c_t)^2)
    da_o = dm_t tanh(c_t) sigma'(a_o)   da_i = dc_t g sigma'(a_i)
    da_f = dc_t c_{t-1} sigma'(a_f)     da_g = dc_t i (1 - g^2)
    dh_{t-1} = (output gradient at t - 1) + da_t W_hh

The recomputed gates are written into one buffer that becomes all step-independent factors
in place, its first four slots then ``da`` during the recursion (:data:`_SLOTS`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .core import register_extension
from .recurrent import (
    CellGradients,
    LayerWeights,
    RecurrentCell,
    RecurrentExtension,
    Steps,
    backprop_through_time,
    fast_tanh_,
    gate_buffer,
    previous_hidden,
)


#: the slots of the factor buffer, each ``(T, B, H)``: the gate gradients divided by the
#: cell-state gradient (i, f, g) or by dm (o), in gate order, so that the first four slots
#: become ``da`` in place; then dc/dm = o (1 - tanh(c)^2) and the forget gate f
_SLOTS = 6


def _cell_states(input_times_g: Tensor, forget: Tensor, c0: Tensor, steps: Steps) -> Tensor:
    """``(T + 1, B, H)``: ``[c_{-1} = c0, c_0, ..., c_{T-1}]`` by ``c_t = f_t c_{t-1} + i_t
    g_t``; a row inactive at step t (packed) keeps its cell state."""
    length, batch, hidden = input_times_g.shape
    cells = torch.empty(length + 1, batch, hidden, dtype=c0.dtype, device=c0.device)
    cells[0] = c0
    for t in range(length):
        active = steps.active(t)
        torch.addcmul(input_times_g[t, :active], forget[t, :active], cells[t, :active],
                      out=cells[t + 1, :active])
        if active < batch:
            cells[t + 1, active:] = cells[t, active:]
    return cells


def _gates(x: Tensor, previous: Tensor, weights: LayerWeights, out: Tensor) -> Tensor:
    """``i, f, g, o`` of all steps at once from ``x_t`` and ``h_{t-1}``, written into
    ``out`` ``(T, B, 4, H)`` (a view of the factor buffer; its rows may be strided)."""
    rows = out.flatten(0, 1).flatten(1)
    flat = x.flatten(0, 1)
    if weights.bias_ih is not None:
        torch.addmm(weights.bias_ih + weights.bias_hh, flat, weights.weight_ih.t(), out=rows)
    else:
        torch.mm(flat, weights.weight_ih.t(), out=rows)
    rows.addmm_(previous.flatten(0, 1), weights.weight_hh.t())
    # tanh(a) = 2 sigmoid(2a) - 1 (see fast_tanh_): one sigmoid over all four slots
    out[:, :, 2].mul_(2)
    out.sigmoid_()
    out[:, :, 2].mul_(2).sub_(1)  # the g slot now holds tanh(a_g)
    return out


def _gate_factors(x: Tensor, previous: Tensor, weights: LayerWeights, c0: Tensor,
                  steps: Steps) -> tuple[Tensor, Tensor | None]:
    """``(factors (T, B, 6, H) in the slots of :data:`_SLOTS`, m_t = o_t tanh(c_t) for a
    projection or None)``: the gates recomputed from ``x_t`` and ``h_{t-1}``, the
    cell-state recursion run, and the chain rule's step-independent factors."""
    # One buffer holds the gates and becomes the factors in place (each gate is read for
    # the last time as its slot is overwritten), so no gate-sized temporaries; products
    # are fused with addcmul (each elementwise kernel over (T, B, H) is a memory pass).
    length, batch, hidden = previous.shape[0], previous.shape[1], c0.shape[-1]
    factors = x.new_empty(length, batch, _SLOTS, hidden)
    slot = _gates(x, previous, weights, out=factors[:, :, :4]).unbind(2)
    i, f, g, o = slot
    forget = factors[:, :, 5].copy_(f)
    input_times_g = torch.mul(i, g, out=factors[:, :, 4])
    all_cells = _cell_states(input_times_g, forget, c0, steps)
    # sigma'(a) = sigma (1 - sigma) for i, f, o. g sigma'(a_i) is rounded as g (i - i^2),
    # the order that made the committed P4 records (not i g - i (i g)); it and i (1 - g^2)
    # each overwrite an input of the other, so the latter waits in slot 4 (free until m_t)
    torch.addcmul(i, input_times_g, g, value=-1, out=factors[:, :, 4])  # i (1 - g^2)
    torch.addcmul(i, i, i, value=-1, out=slot[0]).mul_(g)  # g sigma'(a_i)
    slot[2].copy_(factors[:, :, 4])
    torch.addcmul(f, f, f, value=-1, out=slot[1]).mul_(all_cells[:-1])  # c_{t-1} sigma'(a_f)
    tanh_cells = fast_tanh_(all_cells[1:])
    projected = weights.weight_hr is not None
    hidden_cells = torch.mul(o, tanh_cells, out=None if projected else factors[:, :, 4])
    torch.addcmul(o, hidden_cells, tanh_cells, value=-1, out=factors[:, :, 4])  # o (1 - tanh^2)
    torch.addcmul(o, o, o, value=-1, out=slot[3]).mul_(tanh_cells)  # tanh(c) sigma'(a_o)
    return factors, (hidden_cells if projected else None)


class _StepBackward:
    """The LSTM's step of the shared recursion (:func:`~.recurrent.backprop_through_time`):
    carries ``dc = dL/dc_t`` from step to step and, with a projection, records ``dL/dh_t``
    (``dh_steps``) for ``W_hr``; turns the factors' first four slots into ``da``."""

    def __init__(self, factors: Tensor, grad_c_last: Tensor | None, steps: Steps,
                 projection: Tensor | None) -> None:
        length, batch, _, hidden = factors.shape
        self.factors, self.projection, self.batch = factors, projection, batch
        self.dc_next = grad_c_last if grad_c_last is not None else \
            factors.new_zeros(batch, hidden)
        self.dh_steps = None if projection is None else \
            gate_buffer(steps, length, batch, projection.shape[0], like=factors)

    def __call__(self, t: int, active: int, dm: Tensor) -> tuple[Tensor, None]:
        """``da_t`` of the active rows as ``(active, 4 H)``, from ``dh_t`` of them."""
        step = self.factors[t, :active]
        if self.projection is not None:
            self.dh_steps[t, :active] = dm
            dm = torch.mm(dm, self.projection)
        dc = torch.addcmul(self.dc_next[:active], dm, step[:, 4])
        step[:, :3].mul_(dc.unsqueeze(1))
        step[:, 3].mul_(dm)
        dc = dc.mul_(step[:, 5])
        self.dc_next = dc if active == self.batch else torch.cat([dc, self.dc_next[active:]])
        return step[:, :4].view(active, 4 * step.shape[-1]), None


class LSTMCell(RecurrentCell):
    """The LSTM cell (with or without a projection ``W_hr``)."""

    state_size = 2
    kernel = staticmethod(torch.lstm)

    def backward(self, x: Tensor, output: Tensor, weights: LayerWeights,
                 state: tuple[Tensor, ...], grad_output: Tensor,
                 grad_final: tuple[Tensor | None, ...], steps: Steps) -> CellGradients:
        """Recompute the gates, backpropagate through time (module docstring)."""
        h0, c0 = state
        previous = previous_hidden(h0, output)
        factors, hidden_cells = _gate_factors(x, previous, weights, c0, steps)
        grad_h_last, grad_c_last = grad_final
        step = _StepBackward(factors, grad_c_last, steps, weights.weight_hr)
        dh0 = backprop_through_time(step, factors[:, :, :4], grad_output, grad_h_last,
                                    weights.weight_hh, steps)
        length, batch, _, hidden = factors.shape
        d_pre = factors[:, :, :4].view(length, batch, 4 * hidden)  # da
        projection = None if step.dh_steps is None else (step.dh_steps, hidden_cells)
        return CellGradients(d_pre, None, x, previous, (dh0, step.dc_next), projection)


@register_extension
class LSTMExtension(RecurrentExtension):
    """``nn.LSTM``: every configuration (``proj_size`` too)."""

    module_types = (nn.LSTM,)
    cell_type = LSTMCell
