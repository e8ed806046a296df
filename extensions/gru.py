"""``nn.GRU``: the cell equations for the shared recurrent machinery (``recurrent.py``).

PyTorch's GRU, gate order r, z, n, with the input side ``gi = W_ih x_t + b_ih`` and the
hidden side ``gh = W_hh h_{t-1} + b_hh``:

    r = sigma(gi_r + gh_r)      z = sigma(gi_z + gh_z)      n = tanh(gi_n + r gh_n)
    h_t = (1 - z) n + z h_{t-1}

The reset gate scales the hidden side of n, so the two sides' gradients differ in the n
slot. With ``dh`` the gradient w.r.t. ``h_t`` (all paths):

    d gi_n = dh (1 - z)(1 - n^2)                     d gh_n = d gi_n r
    d gi_r = d gh_r = d gi_n gh_n r (1 - r)          d gi_z = d gh_z = dh (h_{t-1} - n) z (1 - z)
    dh_{t-1} = (output gradient at t - 1) + dh z + d gh W_hh

The backward recomputes ``gi`` and ``gh`` of all steps with one matmul each from the saved
outputs (no recursion is needed: ``h_{t-1}`` is known for every t), so the loop over the
steps does one ``(B, 3H) x (3H, H)`` matmul and two elementwise kernels per step.
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
    previous_hidden,
)


def _side(inputs: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``inputs W^T + b`` for all steps at once into ``out`` ``(T B, 3H)`` (rows may be
    strided: the matmul writes them in place)."""
    flat = inputs.flatten(0, 1)
    if bias is None:
        return torch.mm(flat, weight.t(), out=out)
    return torch.addmm(bias, flat, weight.t(), out=out)


def _rolled(bias: Tensor | None, hidden: int) -> Tensor | None:
    """The input side's bias in the rolled row order n, r, z (``None`` stays ``None``)."""
    return None if bias is None else bias.roll(hidden, 0)


#: the slots of the factor buffer: d gi_n, d gi_r = d gh_r, d gi_z = d gh_z, d gh_n (each
#: divided by dh), z, and one spare (the second side's pre-activations need six). The
#: input side (n, r, z: the gate rows rolled by H) and the hidden side (r, z, n) are both
#: views of the first four consecutive slots.
_SLOTS = 6


def _gate_factors(x: Tensor, previous: Tensor, weights: LayerWeights) -> Tensor:
    """``(T, B, 6, H)``: the gates recomputed from ``x_t`` and ``h_{t-1}``, turned into the
    step-independent factors that make the gate gradients from ``dh`` (:data:`_SLOTS`).

    One buffer holds both sides' pre-activations (the input side's rows rolled by H to
    n, r, z) and is turned into the factors in place, so no gate-sized temporaries."""
    length, batch, hidden = previous.shape
    buffer = x.new_empty(length, batch, _SLOTS, hidden)
    rows = buffer.view(length * batch, _SLOTS * hidden)
    _side(x, weights.weight_ih.roll(hidden, 0), _rolled(weights.bias_ih, hidden),
          out=rows[:, :3 * hidden])
    _side(previous, weights.weight_hh, weights.bias_hh, out=rows[:, 3 * hidden:])
    slot = buffer.unbind(2)  # n_i, r_i, z_i, r_h, z_h, n_h
    reset, update, spare = slot[1], slot[4], slot[3]
    reset.add_(slot[3]).sigmoid_()
    update.add_(slot[2]).sigmoid_()
    reset_hidden = slot[5].mul_(reset)  # r gh_n
    new = fast_tanh_(slot[0].add_(reset_hidden))  # n
    keep = torch.neg(update, out=spare).add_(1)  # 1 - z
    torch.sub(previous, new, out=slot[2]).mul_(update).mul_(keep)  # (h - n) z (1 - z)
    reset_hidden.addcmul_(reset_hidden, reset, value=-1)  # r (1 - r) gh_n
    torch.addcmul(keep, keep, new.square_(), value=-1, out=slot[0])  # (1 - z)(1 - n^2)
    torch.mul(slot[0], reset, out=slot[3])  # d gh_n / dh
    torch.mul(slot[0], reset_hidden, out=slot[1])  # d gi_r / dh
    return buffer


def _backprop_through_time(factors: Tensor, grad_output: Tensor, grad_last: Tensor | None,
                           weight_hh: Tensor, steps: Steps) -> Tensor:
    """``dL/dh0`` by the shared recursion (:func:`~.recurrent.backprop_through_time`);
    turns the factors' first four slots into the gate gradients, in place."""
    hidden = factors.shape[-1]

    def step(t: int, active: int, dh: Tensor) -> tuple[Tensor, Tensor]:
        gates = factors[t, :active, :4]
        gates.mul_(dh.unsqueeze(1))
        return gates[:, 1:].view(active, 3 * hidden), factors[t, :active, 4]  # d gh, z

    return backprop_through_time(step, factors[:, :, :4], grad_output, grad_last,
                                 weight_hh, steps)


class GRUCell(RecurrentCell):
    """The GRU cell."""

    kernel = staticmethod(torch.gru)

    def backward(self, x: Tensor, output: Tensor, weights: LayerWeights,
                 state: tuple[Tensor, ...], grad_output: Tensor,
                 grad_final: tuple[Tensor | None, ...], steps: Steps) -> CellGradients:
        """Recompute the gates, backpropagate through time (module docstring)."""
        previous = previous_hidden(state[0], output)
        factors = _gate_factors(x, previous, weights)
        dh0 = _backprop_through_time(factors, grad_output, grad_final[0], weights.weight_hh,
                                     steps)
        length, batch, _, hidden = factors.shape
        input_side = factors[:, :, :3].view(length, batch, 3 * hidden)  # rows n, r, z
        hidden_side = factors[:, :, 1:4].view(length, batch, 3 * hidden)  # rows r, z, n
        return CellGradients(input_side, hidden_side, x, previous, (dh0,), input_roll=hidden)


@register_extension
class GRUExtension(RecurrentExtension):
    """``nn.GRU``: every configuration."""

    module_types = (nn.GRU,)
    cell_type = GRUCell
